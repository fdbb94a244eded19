"""What one bad site can do to the global model: every malformed or hostile reply the server has
been fed (huge updates, inflated, negative or zero example counts, extra or missing metric keys)
is named and dropped or bounded, the round goes on with the others, and the robust aggregators
are Flower's own, selectable in the config."""
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from cmvim.protocol import ARRAYS, METRICS, SITE
from cmvim.run_config import StrategyConfig, run_config
from cmvim.server.strategy import make_strategy
from test_recipe import easy_run_config

GLOBAL = {"w": torch.zeros(4, 3)}


def reply(site: str, node: int, arrays: dict, num_examples=10, **metrics) -> Message:
    record = MetricRecord({"num-examples": num_examples, "loss": 1.0, **metrics})
    content = RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: record, SITE: ConfigRecord({"name": site})})
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=metadata)


def honest(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": 1.0 + 0.1 * torch.randn(4, 3, generator=g)}


def started(strategy):
    """What configure_train records of the round's global model (without a Flower grid)."""
    strategy.start_round(ArrayRecord(GLOBAL))
    return strategy


def guarded(min_nodes: int = 2, **cfg):
    return started(make_strategy(StrategyConfig(min_nodes=min_nodes, **cfg)))


def aggregate(strategy, replies):
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays.to_torch_state_dict()["w"] if arrays is not None else None


def rejected(strategy) -> dict:
    return {r["site"]: r["reason"] for r in strategy.round_log.rejected}


def mean_of(*seeds):
    return torch.stack([honest(s)["w"] for s in seeds]).mean(0)


@pytest.mark.parametrize("poison, why", [
    ({"w": torch.full((4, 3), 1e30)}, "update norm"),                 # the 1e30 update
    ({"w": -40 * torch.ones(4, 3)}, "update norm"),                   # a scaled, sign-flipped one
])
def test_a_huge_update_is_rejected_by_name_and_the_round_goes_on(poison, why):
    strategy = guarded()
    out = aggregate(strategy, [reply("A", 1, honest(0)), reply("B", 2, honest(1)), reply("C", 3, honest(2)),
                               reply("D", 4, poison)])
    torch.testing.assert_close(out, mean_of(0, 1, 2))
    assert set(rejected(strategy)) == {"D"} and why in rejected(strategy)["D"]
    assert set(strategy.round_log.train) == {"A", "B", "C"}


def test_a_huge_update_between_two_sites_is_caught_too_and_clip_keeps_it_bounded():
    strategy = guarded()
    assert aggregate(strategy, [reply("A", 1, honest(0)), reply("B", 2, {"w": torch.full((4, 3), 1e30)})]) is None
    assert "norm" in rejected(strategy)["B"]                      # the lower median: the honest site's norm
    clip = guarded(norm_action="clip", norm_bound=2.0)
    out = aggregate(clip, [reply("A", 1, honest(0)), reply("B", 2, honest(1)), reply("C", 3, {"w": torch.full((4, 3), 1e6)})])
    assert out.abs().max() < 3.0 and "clipped to the bound and kept" in rejected(clip)["C"]


def test_example_counts_are_positive_and_capped_at_what_a_site_started_with():
    strategy = guarded()
    replies = [reply("A", 1, honest(0), 10), reply("B", 2, honest(1), -5), reply("C", 3, honest(2), 0),
               reply("D", 4, honest(3), float("nan"))]
    torch.testing.assert_close(aggregate(strategy, replies[:1] + [reply("E", 5, honest(4), 10)]), mean_of(0, 4))
    strategy.round_log.rejected.clear()
    out = aggregate(strategy, replies + [reply("E", 5, honest(4), 10)])
    torch.testing.assert_close(out, mean_of(0, 4))
    assert {"B", "C", "D"} == set(rejected(strategy))
    assert all("not a positive count" in r for r in rejected(strategy).values())
    # round 2: A claims 1e9 examples; it weighs what it weighed in round 1
    out = aggregate(strategy, [reply("A", 1, {"w": torch.full((4, 3), 2.0)}, 1e9), reply("E", 5, {"w": torch.ones(4, 3)}, 10)])
    torch.testing.assert_close(out, torch.full((4, 3), 1.5))
    # a site's first claim is capped at max_examples; equal weighting ignores the claims
    capped = guarded(max_examples=20, norm_bound=None)
    torch.testing.assert_close(aggregate(capped, [reply("A", 1, {"w": torch.full((4, 3), 2.0)}, 1e9),
                                                  reply("B", 2, {"w": torch.ones(4, 3)}, 20)]), torch.full((4, 3), 1.5))
    equal = guarded(weighting="equal", norm_bound=None)
    torch.testing.assert_close(aggregate(equal, [reply("A", 1, {"w": torch.full((4, 3), 4.0)}, 1),
                                                 reply("B", 2, {"w": torch.ones(4, 3)}, 99)]), torch.full((4, 3), 2.5))


def test_extra_or_missing_metric_keys_drop_that_site_not_the_round():
    strategy = guarded()
    out = aggregate(strategy, [reply("A", 1, honest(0)), reply("B", 2, honest(1)),
                               reply("C", 3, honest(2), sneaky=1.0)])
    torch.testing.assert_close(out, mean_of(0, 1))
    assert "extra ['sneaky']" in rejected(strategy)["C"]
    strategy = guarded()
    lacking = reply("C", 3, honest(2))
    del lacking.content[METRICS]["loss"]
    out = aggregate(strategy, [reply("A", 1, honest(0)), reply("B", 2, honest(1)), lacking])
    torch.testing.assert_close(out, mean_of(0, 1))
    assert "missing ['loss']" in rejected(strategy)["C"]
    # evaluation replies too (Flower raised InconsistentMessageReplies and the server app died)
    strategy.aggregate_evaluate(1, [reply("A", 1, {}, 10, auc=0.8), reply("B", 2, {}, 10, auc=0.7),
                                    reply("C", 3, {}, 10, auc=0.9, extra=1.0)])
    assert set(strategy.round_log.evaluate) == {"A", "B"}


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_flowers_robust_aggregators_ignore_one_poisoned_site(name):
    extra = {"trim_beta": 0.25} if name == "fedtrimmedavg" else {}
    strategy = started(make_strategy(StrategyConfig(name=name, min_nodes=5, norm_bound=None, num_malicious=1, **extra)))
    replies = [reply(s, i + 1, honest(i)) for i, s in enumerate("ABCD")] + [reply("E", 5, {"w": -1e6 * torch.ones(4, 3)})]
    out = aggregate(strategy, replies)
    assert out.abs().max() < 2.0 and out.min() > 0, (name, out)     # near the honest sites' values around 1


def test_robust_aggregators_are_checked_against_the_number_of_sites():
    with pytest.raises(ValueError, match="krum with num_malicious 1 needs at least 5 sites"):
        run_config({"strategy": {"name": "krum", "min_nodes": 3}})
    with pytest.raises(ValueError, match="bulyan with num_malicious 1 needs at least 7 sites"):
        run_config({"strategy": {"name": "bulyan", "min_nodes": 4}})
    assert run_config({"strategy": {"name": "fedmedian", "min_nodes": 3}}).strategy.name == "fedmedian"
    with pytest.raises(ValueError, match="norm_bound"):
        run_config({"strategy": {"norm_bound": 0.5}})
    assert np.isfinite(run_config({}).strategy.norm_bound)


def test_a_federation_with_one_poisoned_site_keeps_its_auc_under_the_robust_options(easy_cohort, easy_sites):
    """Real sites, real rounds (linear probing of a frozen encoder, 3 rounds), the server's own
    aggregation path; site C sends its update sign-flipped and scaled by 10. FedAvg without a
    bound follows C; the default norm bound leaves C out and keeps the AUC. (FedMedian of three
    sites does not: a coordinate-wise median of two honest heads and a hostile one lost the AUC
    here, 0.47; docs/robustness.md has the 4-site comparison.)"""
    from cmvim.results import mean_auc, site_entry
    from cmvim.simulations.baselines import server_aggregation, train_rounds
    from cmvim.site_task import SiteTask
    from cmvim.weights import initial_state

    cfg = easy_run_config(easy_cohort, finetune={"rounds": 3, "probe_rounds": 3, "probe_epochs": 30}, finetune_init="fresh")
    tasks = [SiteTask(cfg, [easy_sites[name]], name) for name in "ABC"]

    def flip(site, global_, update):
        return {k: global_[k] - 10 * (update[k] - global_[k]) for k in update} if site == "C" else update

    aucs, rejections = {}, {}
    for label, strategy in (("fedavg, no bound", StrategyConfig(norm_bound=None)), ("fedavg", StrategyConfig())):
        aggregate = server_aggregation(strategy, tamper=flip)
        final, _ = train_rounds(cfg, tasks, "finetune", initial_state(cfg, "finetune"), aggregate=aggregate)
        honest = {t.name: site_entry(dict(t.evaluate("finetune", final, {}, "test").metrics)) for t in tasks[:2]}
        aucs[label] = mean_auc(honest)
        rejections[label] = {r["site"] for r in aggregate.rejected()}
    assert aucs["fedavg"] > 0.9, aucs
    assert aucs["fedavg, no bound"] < aucs["fedavg"] - 0.3, aucs
    assert rejections == {"fedavg, no bound": set(), "fedavg": {"C"}}


class _Grid:
    """A Flower grid stand-in that only knows which nodes are connected."""
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_a_phase_waits_for_sites_with_a_deadline_and_names_who_is_missing(tmp_path):
    from cmvim.server.runner import FederatedRun, SitesMissing
    cfg = run_config({"strategy": {"min_nodes": 3, "wait_for_sites": 0.3},
                      "cohort": {"path": str(tmp_path), "site_names": ["A", "B", "C"]}})
    run = FederatedRun(cfg, tmp_path, _Grid([1]))
    started = time.monotonic()
    with pytest.raises(SitesMissing, match=r"pretrain: 2 of the 3 sites needed .* within 0 s .*1 connected "
                                           r"\(the run expects A, B, C\)"):
        run._wait_for_sites("pretrain", poll=0.05)
    assert time.monotonic() - started < 5
    grid = _Grid([1, 2])
    run = FederatedRun(cfg, tmp_path, grid)
    import threading
    threading.Timer(0.1, lambda: grid.nodes.append(3)).start()      # the third site connects in time
    run._wait_for_sites("pretrain", poll=0.05)


def test_a_round_below_the_quorum_keeps_the_global_model():
    strategy = guarded(min_nodes=3)
    assert aggregate(strategy, [reply("A", 1, honest(0)), reply("B", 2, honest(1))]) is None
    assert aggregate(strategy, [reply("A", 1, honest(0)), reply("B", 2, honest(1)), reply("C", 3, honest(2))]) is not None


def test_cmvim_server_stops_a_run_that_outlives_its_deadline(tmp_path, monkeypatch):
    """The coordinator's wait for the run has a deadline: past it the run is stopped and the
    error says how to resume."""
    import argparse
    from cmvim.server import deploy

    class Stream:            # `flwr log --stream`, not started
        def __init__(self, *args, **kwargs):
            pass

        def poll(self):
            return None

        def stop(self, grace=0):
            pass
    monkeypatch.setattr(deploy, "Child", Stream)
    parser = argparse.ArgumentParser()
    deploy.add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"),
                              "--run-timeout", "0.2", "--insecure"])
    coordinator = deploy.Coordinator(args)
    calls = []

    def flwr(*argv, check=True):
        calls.append(argv)
        return {"runs": [{"status": "running"}]} if argv[0] == "list" else {}
    coordinator.flwr = flwr
    real_sleep = time.sleep
    monkeypatch.setattr(deploy.time, "sleep", lambda s: real_sleep(0.05))
    with pytest.raises(deploy.DeployError, match=r"run 7 had not finished after 0 s \(--run-timeout\): stopped"):
        coordinator.wait_for_run("7")
    assert calls[-1][:2] == ("stop", "7")


def test_cmvim_server_asks_the_run_status_when_the_log_stream_ends_not_every_few_seconds(tmp_path, monkeypatch):
    """`flwr list` is a new interpreter importing flwr (~1 s of a core): while the run's log
    streams the coordinator asks it only every STATUS_POLL s, and at once when the stream ends
    (which it does when the run finishes)."""
    import argparse
    from cmvim.server import deploy
    clock = {"t": 0.0}
    monkeypatch.setattr(deploy.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(deploy.time, "sleep", lambda s: clock.__setitem__("t", clock["t"] + s))
    ends_at = 95.0                                     # the run (and its log stream) ends 95 s in

    class Stream:
        def __init__(self, *args, **kwargs):
            self.stopped = False

        def poll(self):
            return 0 if clock["t"] >= ends_at else None

        def stop(self, grace=0):
            self.stopped = True
    monkeypatch.setattr(deploy, "Child", Stream)
    parser = argparse.ArgumentParser()
    deploy.add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--insecure"])
    coordinator = deploy.Coordinator(args)
    asked = []

    def flwr(*argv, check=True):
        asked.append(clock["t"])
        return {"runs": [{"status": "finished:completed" if clock["t"] >= ends_at else "running"}]}
    coordinator.flwr = flwr
    assert coordinator.wait_for_run("7") == "finished:completed"
    # asked at the start, every 30 s while streaming (30, 60, 90), and once when the stream ended
    assert asked == [0.0, 30.0, 60.0, 90.0, 95.0]


def test_cmvim_server_stops_waiting_for_sites_when_its_proxy_died(tmp_path):
    """Caddy could not bind its port and exited: the sites get 'connection refused' for ever;
    the coordinator says so instead of waiting out --wait-timeout."""
    import argparse
    import subprocess
    import sys
    from cmvim.server import deploy
    parser = argparse.ArgumentParser()
    deploy.add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--insecure"])
    coordinator = deploy.Coordinator(args)
    coordinator.flwr = lambda *argv, check=True: {"nodes": []}
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    dead.wait()
    coordinator.proxy = dead                       # anything with poll(): a Child
    with pytest.raises(deploy.DeployError, match=r"the proxy on the public port \(Caddy\) exited \(status 1\)"):
        coordinator.wait_for_sites(3)
