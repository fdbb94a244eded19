"""Central (site-level) DP with Flower's fixed-clipping wrappers and accountant, inside cmvim's guard.

The wrapper's arithmetic is checked against a reference written here (clip each site's update,
average with equal weights, add Gaussian noise of std sigma * C / n), the accountant against
Opacus' RDP accountant and the Gaussian mechanism's closed form, the client-side clipping mod
on real messages, and a whole simulated run with a budget that stops it early."""
import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import GaussianPrivacyEvent

import test_federated as tf
from cmvim.client.app import central_clipping_mod
from cmvim.config import ConfigError
from cmvim.run_config import CentralDPConfig, StrategyConfig, run_config
from cmvim.protocol import ARRAYS, CONFIG, METRICS, SITE
from cmvim.server.strategy import CentralBudgetSpent, central_accountant, make_strategy

SIGMA, CLIP, DELTA = 0.7, 1.0, 1e-5


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """Flower stamps new messages with the run id of the ServerApp process; these tests are one."""
    from flwr.supercore.task_identity import TaskIdentity
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class NodesOnly:
    """The part of Flower's Grid that configure_train uses."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def dp_strategy(clipping="server", sites=3, max_epsilon=None, min_nodes=2):
    cdp = CentralDPConfig(clipping=clipping, noise_multiplier=SIGMA, clipping_norm=CLIP, delta=DELTA,
                          max_epsilon=max_epsilon)
    accountant = central_accountant(cdp, sites)
    return make_strategy(StrategyConfig(name="fedavg", min_nodes=min_nodes), central_dp=cdp, sites=sites,
                         accountant=accountant), accountant


def reference_epsilon(sigma: float, releases: int, delta: float) -> float:
    """(epsilon, delta) of `releases` Gaussian mechanisms of noise multiplier sigma: RDP
    releases * a / (2 sigma^2), converted with Balle et al. (2020), minimised over a dense grid of a."""
    orders = np.linspace(1.0001, 2000, 2_000_000)
    rdp = releases * orders / (2 * sigma ** 2)
    return float(np.min(rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)))


def test_server_side_clipping_averages_with_equal_weights_and_adds_the_stated_noise():
    strategy, accountant = dp_strategy()
    current = {"w": torch.zeros(4, 3), "b": torch.ones(5)}
    messages = strategy.configure_train(1, ArrayRecord(current), ConfigRecord({}), NodesOnly([11, 12, 13]))
    assert len(messages) == 3
    rng = np.random.default_rng(0)
    updates = [{k: torch.from_numpy(rng.normal(0, scale, tuple(v.shape)).astype(np.float32)) for k, v in current.items()}
               for scale in (0.05, 1.0, 3.0)]        # norms ~0.2 (kept), ~4 and ~12 (clipped to 1)
    replies = [tf._reply(site, {k: current[k] + u[k] for k in current}, node, num_examples=n)
               for site, u, node, n in zip("ABC", updates, (11, 12, 13), (10, 50, 200))]

    np.random.seed(123)                               # Flower draws its noise from numpy's global generator
    arrays, _ = strategy.aggregate_train(1, replies)

    # reference: clip each whole update to CLIP, average with weight 1/3 each (not by num-examples),
    # then noise of std SIGMA * CLIP / 3, drawn in the same order
    clipped = []
    for u in updates:
        flat = np.concatenate([u[k].numpy().ravel() for k in current])
        factor = min(1.0, CLIP / np.linalg.norm(flat))
        clipped.append({k: u[k].numpy() * factor for k in current})
    np.random.seed(123)
    got = arrays.to_torch_state_dict()
    for key in current:
        mean = current[key].numpy() + sum(c[key] for c in clipped) / 3
        expected = mean + np.random.normal(0, SIGMA * CLIP / 3, mean.shape).astype(np.float32)
        np.testing.assert_allclose(got[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(np.concatenate([c[k].ravel() for c in clipped[1:] for k in current])) == \
        pytest.approx(np.sqrt(2) * CLIP, rel=1e-5)   # the two large updates were clipped
    assert accountant.num_releases == 1
    assert set(strategy.round_log.train) == {"A", "B", "C"}


def test_validation_metrics_under_central_dp_stay_weighted_by_num_examples():
    strategy, _ = dp_strategy()
    replies = [tf._reply(site, {"w": torch.zeros(1)}, node, num_examples=n)
               for site, node, n in (("A", 1, 10), ("B", 2, 30))]
    for msg, auc in zip(replies, (0.5, 0.9)):
        msg.content[METRICS]["auc"] = auc
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["auc"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert set(strategy.round_log.evaluate) == {"A", "B"}


def test_accountant_epsilon_is_the_gaussian_mechanisms_and_opacus():
    from opacus.accountants import RDPAccountant
    for sigma, releases, delta in [(0.5, 3, 1e-3), (1.0, 10, 1e-5), (5.0, 100, 1e-6)]:
        accountant = central_accountant(CentralDPConfig(clipping="server", noise_multiplier=sigma, delta=delta), 3)
        accountant.compose(GaussianPrivacyEvent(sigma, 3, 3), releases)
        ours = accountant.get_privacy_spent().epsilon
        opacus = RDPAccountant()
        opacus.history = [(sigma, 1.0, releases)]          # sample rate 1: every site, every round
        assert ours == pytest.approx(opacus.get_epsilon(delta), rel=1e-9)
        assert ours == pytest.approx(reference_epsilon(sigma, releases, delta), rel=1e-3)


def test_a_round_missing_a_site_is_not_released_and_the_site_is_named():
    strategy, accountant = dp_strategy()
    current, trained = {"w": torch.zeros(3, 2)}, {"w": torch.ones(3, 2)}
    strategy.configure_train(1, ArrayRecord(current), ConfigRecord({}), NodesOnly([1, 2, 3]))
    bad = {"w": torch.tensor([[1.0, float("nan")], [0.0, 0.0], [0.0, 0.0]])}
    replies = [tf._reply("A", trained, 11), tf._reply("B", trained, 12), tf._reply("C", bad, 13)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None                                 # the noise is calibrated for 3 sites: no release
    assert accountant.num_releases == 0
    (rejected,) = strategy.round_log.rejected
    assert rejected["site"] == "C" and "NaN" in rejected["reason"]
    # the next round, complete, is released
    strategy.configure_train(2, ArrayRecord(current), ConfigRecord({}), NodesOnly([1, 2, 3]))
    arrays, _ = strategy.aggregate_train(2, replies[:2] + [tf._reply("C", trained, 13)])
    assert arrays is not None and accountant.num_releases == 1
    # a site that sends the global model back unchanged is named, not a crash in Flower's clipping
    strategy.configure_train(3, ArrayRecord(current), ConfigRecord({}), NodesOnly([1, 2, 3]))
    arrays, _ = strategy.aggregate_train(3, replies[:2] + [tf._reply("C", current, 13)])
    assert arrays is None and accountant.num_releases == 1
    assert "unchanged" in strategy.round_log.rejected[-1]["reason"] and strategy.round_log.rejected[-1]["site"] == "C"


def test_the_budget_stops_training_before_the_release_that_would_pass_it():
    one = reference_epsilon(SIGMA, 1, DELTA)
    strategy, accountant = dp_strategy(max_epsilon=one * 1.5)     # one release fits, two do not
    current = {"w": torch.zeros(2)}
    grid = NodesOnly([1, 2, 3])
    strategy.configure_train(1, ArrayRecord(current), ConfigRecord({}), grid)
    strategy.aggregate_train(1, [tf._reply(s, {"w": torch.ones(2)}, n) for s, n in zip("ABC", (1, 2, 3))])
    assert accountant.num_releases == 1
    with pytest.raises(CentralBudgetSpent, match="would exceed max_epsilon"):
        strategy.configure_train(2, ArrayRecord(current), ConfigRecord({}), grid)
    assert accountant.num_releases == 1


def test_client_side_clipping_mod_clips_the_update_and_passes_refusals():
    sent = {"w": torch.zeros(10), "b": torch.ones(3)}
    request = Message(RecordDict({ARRAYS: ArrayRecord(sent), CONFIG: ConfigRecord({"clipping_norm": 0.5})}),
                      dst_node_id=1, message_type=MessageType.TRAIN)
    trained = {"w": torch.full((10,), 2.0), "b": torch.ones(3) * 3}
    metrics = tf._reply("A", trained, 1).content

    def site(msg, context):
        return Message(RecordDict({ARRAYS: ArrayRecord(trained), METRICS: metrics[METRICS], SITE: metrics[SITE]}),
                       reply_to=msg)

    reply = central_clipping_mod(request, None, site)
    out = reply.content[ARRAYS].to_torch_state_dict()
    update = torch.cat([(out[k] - sent[k]).ravel() for k in sent])
    assert float(update.norm()) == pytest.approx(0.5, rel=1e-5)
    direction = torch.cat([(trained[k] - sent[k]).ravel() for k in sent])
    torch.testing.assert_close(update / update.norm(), direction / direction.norm())
    assert reply.content[METRICS]["num-examples"] == 10

    def refusing(msg, context):
        return Message(RecordDict({SITE: ConfigRecord({"name": "A", "error": "refused: policy"})}), reply_to=msg)

    assert central_clipping_mod(request, None, refusing).content[SITE]["error"] == "refused: policy"
    # an unchanged model has nothing to clip (Flower's own clipping would divide by its zero norm)
    unchanged = central_clipping_mod(request, None, lambda msg, context: Message(
        RecordDict({ARRAYS: ArrayRecord(sent), METRICS: metrics[METRICS]}), reply_to=msg))
    torch.testing.assert_close(unchanged.content[ARRAYS].to_torch_state_dict(), sent)
    # without a clipping norm (no central DP) the reply is untouched
    plain = Message(RecordDict({ARRAYS: ArrayRecord(sent), CONFIG: ConfigRecord({})}), dst_node_id=1,
                    message_type=MessageType.TRAIN)
    torch.testing.assert_close(central_clipping_mod(plain, None, site).content[ARRAYS].to_torch_state_dict(), trained)


def test_config_refuses_what_the_accountant_cannot_count():
    with pytest.raises(ValueError, match="fedavg or fedprox"):
        run_config({"central_dp": {"clipping": "server"}, "strategy": {"name": "fedadam"}})
    with pytest.raises(ValueError, match="fraction_train 1.0"):
        run_config({"central_dp": {"clipping": "client"}, "strategy": {"fraction_train": 0.5}})
    with pytest.raises(ValueError, match="delta"):
        run_config({"central_dp": {"clipping": "server", "delta": 1.5}})
    with pytest.raises(ConfigError, match="clipping"):
        run_config({"central_dp": {"clipping": "sever"}})


def test_client_side_central_dp_run_reports_epsilon_and_stops_at_its_budget(easy_cohort, tmp_path):
    """A whole simulated run: client-side clipping, a budget for two of the three planned
    rounds. Pretraining's round and fine-tuning's first are released; the second would pass
    the budget, so training stops, the sites still evaluate, and the results say so."""
    budget = reference_epsilon(0.8, 2, 1e-3) * 1.05
    cfg = tf.tiny_config(easy_cohort, pretrain={"rounds": 1}, finetune={"rounds": 2, "local_epochs": 1},
                         split_fractions=[0.5, 0.2, 0.3], evaluation={"every_round": True},   # validation too
                         central_dp={"clipping": "client", "noise_multiplier": 0.8, "clipping_norm": 2.0,
                                     "delta": 1e-3, "max_epsilon": budget})
    out = tmp_path / "cdp"
    proc = tf.run_sim(tmp_path, cfg, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fixedclipping_mod: parameters are clipped by value: 2.0000" in proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(r["phase"], r["round"]) for r in metrics["rounds"]] == [("pretrain", 1), ("finetune", 1)]
    eps = [r["central_dp"]["epsilon"] for r in metrics["rounds"]]
    assert eps == pytest.approx([reference_epsilon(0.8, 1, 1e-3), reference_epsilon(0.8, 2, 1e-3)], rel=1e-3)
    central = metrics["central_dp"]
    assert central["releases"] == 2 and central["sites"] == 3 and central["epsilon"] <= budget
    assert "central DP budget" in central["stopped"]
    assert set(metrics["sites"]) == {"A", "B", "C"}              # they still evaluated
    assert set(metrics["rounds"][1]["evaluate"]) == {"A", "B", "C"}   # validation after the finetune round
    assert "| central epsilon" in proc.stdout and "no further training" in proc.stdout
    assert "central DP (Flower, client-side clipping" in (out / "summary.md").read_text()


def test_the_central_account_survives_a_checkpoint_and_resume(tmp_path):
    """The accountant's releases go into every checkpoint; a resumed run counts on from them."""
    from cmvim.server.checkpoints import Checkpoint
    from cmvim.server.runner import FederatedRun
    cfg = run_config(tf.tiny_config(tmp_path, central_dp={"clipping": "server", "noise_multiplier": SIGMA,
                                                          "delta": DELTA}))
    first = FederatedRun(cfg, tmp_path, grid=None)
    first.central.start(phase_rounds=4, later_rounds=0, connected=3)
    first.central.accountant.compose(GaussianPrivacyEvent(SIGMA, 3, 3), 4)
    Checkpoint("finetune", 2, {"w": torch.zeros(2)}, {}, [], [], first.central.state()).save(tmp_path / "ck")
    resumed = FederatedRun(cfg, tmp_path, grid=None, resume=True)
    resumed.central.restore(Checkpoint.latest(tmp_path / "ck").central_dp)
    assert resumed.central.sites == 3 and resumed.central.accountant.num_releases == 4
    assert resumed.central.spent()["epsilon"] == pytest.approx(reference_epsilon(SIGMA, 4, DELTA), rel=1e-3)


def test_a_site_install_needs_no_dp_accounting_and_the_coordinator_is_told_where_it_is():
    """dp-accounting serves only the coordinator's central DP (it is in [server] and [sim]): a
    site's whole code path imports without it, and the accountant without it names the install."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['dp_accounting'] = None\n"
            "import importlib.util; importlib.util.find_spec = (lambda f: lambda name, *a: None if name == "
            "'dp_accounting' else f(name, *a))(importlib.util.find_spec)\n"
            "import cmvim.client.app, cmvim.client.cli, cmvim.client.worker, cmvim.client.predict\n"
            "from cmvim.run_config import CentralDPConfig\n"
            "from cmvim.server.strategy import central_accountant\n"
            "try:\n    central_accountant(CentralDPConfig(noise_multiplier=1.0), 3)\n"
            "except ImportError as err:\n    print(err)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pip install 'cmvim[server]'" in proc.stdout
