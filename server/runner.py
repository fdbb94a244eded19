"""The federated run, driven from the ServerApp: pretrain -> finetune -> evaluate.

Each training phase is one call of a Flower strategy's `start` (FedAvg, FedProx or FedAdam,
guarded: see `cmvim.server.strategy`), or with secure aggregation a loop mirroring it
(`cmvim.server.secagg`). After every round `RoundRecorder` records it: its history entry and
validation, a checkpoint (`checkpoints.py`), the central-DP account (`central_dp.py`) and the
progress line (`report.py`). The evaluate phase sends the final model to every site, which
scores its own test split and returns aggregate metrics and score histograms (never
predictions); `report.final_report` writes the results folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from cmvim.calibration import Calibration, fit_calibration
from cmvim.config import to_dict
from cmvim.names import PHASES, Phase, RunPhase
from cmvim.portable import export_model
from cmvim.protocol import (ARRAYS, CALIBRATE, CALIBRATION, CONFIG, HIST_NEG, HIST_POS, LOGIT_NEG, LOGIT_POS, METRICS,
                            NUM_EXAMPLES, PHASE, ROUND, RUN_CONFIG, RUN_KEY, SERVER_ROUND, SITE, SITE_ERROR, SPLIT,
                            WORK_SECONDS)
from cmvim.results import mean_auc, site_entry, summed_histograms
from cmvim.run_config import RunConfig
from cmvim.sharing import load_shared, pack, shared_layout, unpack
from cmvim.weights import build_model, initial_state

from .central_dp import CentralDP
from .checkpoints import BestModel, Checkpoint
from .report import final_report, progress, say
from .strategy import (CentralBudgetSpent, Guarded, make_strategy, restore_strategy_state, site_name,
                       strategy_state)

log = logging.getLogger("cmvim.server")


def packed_seconds(works: list[float], slots: int | None) -> float:
    """How long `works` (one per site) take on `slots` sites running at once: the slowest one when
    every site has its own slot (a deployment), else the longest-first packing of the works onto
    the slots (a simulation with fewer worker processes than sites queues them)."""
    if not works:
        return 0.0
    if slots is None or slots >= len(works):
        return max(works)
    loads = [0.0] * max(1, slots)
    for work in sorted(works, reverse=True):
        loads[loads.index(min(loads))] += work
    return max(loads)


def round_timing(seconds: float, train: dict, evaluate: dict, slots: int | None = None) -> dict:
    """A round's wall time split into site work and the rest (process starts, imports, transport,
    waiting). Site work: the slowest site's training plus the slowest site's validation, or with
    `slots` (a simulation running that many sites at once) the sites' works packed onto the
    slots, so that sites queued behind each other for the machine's cores count as work, not as
    overhead. Empty when the sites do not report their work (under DP-SGD they send accounting only)."""
    train_work = [m[WORK_SECONDS] for m in train.values() if WORK_SECONDS in m]
    if not train_work:
        return {}
    work = packed_seconds(train_work, slots) + packed_seconds(
        [m[WORK_SECONDS] for m in evaluate.values() if WORK_SECONDS in m], slots)
    timing = {"site_work_seconds": round(work, 2), "overhead_seconds": round(max(seconds - work, 0.0), 2)}
    if slots is not None and slots < len(train_work):
        timing["sites_at_once"] = slots
    return timing


class RoundRecorder:
    """A phase's rounds as the run records them, one `after_round` a round (Flower's evaluate_fn, or
    the SecAgg+ loop's call): the round's history entry (its time, the sites' metrics, whose updates
    were aggregated, who was left out and why), its validation or the previous round's that this
    round's training carried, the best model so far (finetune.select: best_val), a checkpoint and
    the progress line. `latest`: the global model after the last recorded round (the phase's
    result when central DP stops it early). The strategy lives for one phase, so its round log
    holds this phase's rounds only."""

    def __init__(self, run: FederatedRun, phase: Phase, strategy: Guarded, arrays: dict, done: int, later: int,
                 evaluate_rounds: bool):
        self.run, self.phase, self.strategy = run, phase, strategy
        self.done, self.later = done, later      # the phase's rounds before this start; the later phases' rounds
        self.total = run.cfg.phase(phase).rounds
        self.remaining = self.total - done
        self.evaluate_rounds = evaluate_rounds
        self.select = phase == "finetune" and run.cfg.finetune.select == "best_val" and evaluate_rounds
        self.latest = arrays
        self.seconds: list[float] = []           # each recorded round's wall time
        self.seen = 0                            # the strategy's rejections already recorded
        self.round_start = time.perf_counter()

    @property
    def rounds_recorded(self) -> int:
        return len(self.seconds)

    def validated(self, entry: dict, metrics: dict, arrays: dict) -> None:
        entry["evaluate"] = metrics
        if self.select:
            entry["selected"] = self.run.best.offer(entry["round"], mean_auc(metrics), arrays)

    def trained_securely(self, server_round: int, sites: dict[str, dict], dropouts: list[dict],
                         aggregated: bool) -> None:
        """A SecAgg+ round's training in the strategy's round log, as the guard writes a plain
        round's: the sites' metrics, each dropout as a rejection, and whose updates made the new
        global model (when the round aggregated nothing, the global model is kept)."""
        rlog = self.strategy.round_log
        rlog.train = sites
        for dropout in dropouts:
            rlog.rejected.append({"round": self.done + server_round, "stage": "train", **dropout})
        if aggregated:
            rlog.aggregated = sorted(sites)
        else:
            log.warning("round %d: the secure aggregation round aggregated nothing: the global model is kept",
                        self.done + server_round)

    def after_round(self, server_round: int, round_arrays: ArrayRecord) -> None:
        """Flower's evaluate_fn: the round's record once its new global model (`round_arrays`) is
        made; round 0 (before the first round) records nothing."""
        if server_round == 0:
            return None
        run, phase, rlog = self.run, self.phase, self.strategy.round_log
        absolute = self.done + server_round
        seconds = time.perf_counter() - self.round_start
        self.round_start = time.perf_counter()
        self.seconds.append(seconds)
        new_rejections = [{"phase": phase, **r} for r in rlog.rejected[self.seen:]]
        self.seen = len(rlog.rejected)
        run.rejected.extend(new_rejections)
        # carried validation: this round's training replies validated the previous round's model
        # (its entry, in this run's history or a resumed one's, gets its numbers now); this
        # round's own validation comes with the next round, or now if this round is the last
        earlier = run._entry(phase, absolute - 1) if rlog.carried is not None else None
        if earlier is not None:
            self.validated(earlier, rlog.carried, self.latest)          # the model the sites validated
        own = self.evaluate_rounds and not (self.strategy.carry_validation and server_round < self.remaining)
        evaluated = rlog.evaluate if own else {}
        aggregated, rlog.aggregated = rlog.aggregated, []
        entry = {"phase": phase, "round": absolute, "seconds": round(seconds, 2),
                 "train": rlog.train, "aggregated": aggregated, "evaluate": {}, "rejected": new_rejections,
                 **round_timing(seconds, rlog.train, evaluated, run.site_slots)}
        if run.central.active:
            entry["central_dp"] = run.central.spent()
        run.history.append(entry)
        self.latest = run._received(round_arrays, phase)
        if own:
            self.validated(entry, evaluated, self.latest)
        run._checkpoint(phase, absolute, self.latest, strategy_state(self.strategy))
        progress(phase, absolute, self.total, self.later, entry, self.seconds, run._connected(), earlier)
        return None


class SitesMissing(RuntimeError):
    """Too few sites connected before the deadline; the message says how many and which are expected."""


class FederatedRun:
    """`baselines`, when given, is called once the federated model is evaluated; what it returns
    ({name: {"sites", "pooled", "mean_auc"}}) is reported beside it (cmvim-sim passes its local,
    centralized and linear baselines)."""

    def __init__(self, cfg: RunConfig, out_dir: Path, grid: Grid, resume: bool = False, context: Context | None = None,
                 baselines: Callable[[], dict] | None = None, site_slots: int | None = None):
        self.cfg, self.out_dir, self.grid = cfg, Path(out_dir), grid
        self.site_slots = site_slots    # sites that can work at once (a simulation's workers); None: all
        self.context = context          # the ServerApp's Flower context: SecAgg+ runs on Flower's legacy machinery
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.resume = resume
        self.baselines = baselines
        self.history: list[dict] = []
        self.rejected: list[dict] = []
        self.started = time.perf_counter()
        self.run_key = hashlib.sha256(f"{self.out_dir.resolve()}|{cfg.to_json()}".encode()).hexdigest()[:16]
        self.central = CentralDP(cfg.central_dp, cfg.strategy.min_nodes)
        self._layouts: dict[str, dict] = {}

    # -- phases -----------------------------------------------------------------------------
    def run(self) -> dict:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        ckpt = Checkpoint.latest(self.ckpt_dir) if self.resume else None
        self.best = BestModel(self.ckpt_dir)
        if not self.resume:
            self.best.clear()                   # a previous run's choice in this folder is not this run's
        if self.resume and ckpt is None:
            say(f"resume: no checkpoint in {self.ckpt_dir}; starting from the beginning")
        if ckpt is not None:
            self.history, self.rejected = ckpt.history, ckpt.rejected
            self.central.restore(ckpt.central_dp)
            say(f"resuming from {ckpt.phase} round {ckpt.round}")

        if ckpt is None or ckpt.phase == "pretrain":
            arrays = ckpt.arrays if ckpt else initial_state(self.cfg, "pretrain")
            pretrained = self.run_phase("pretrain", arrays, ckpt.round if ckpt else 0, ckpt.strategy if ckpt else {})
            self._reconstruction_figure(pretrained)
            ckpt = None
            arrays = initial_state(self.cfg, "finetune", pretrained)
            done, state = 0, {}
        elif ckpt.phase == "evaluate":          # the run had finished: evaluate again
            arrays, done, state = ckpt.arrays, self.cfg.finetune.rounds, {}
        else:
            arrays, done, state = ckpt.arrays, ckpt.round, ckpt.strategy
        final = self.run_phase("finetune", arrays, done, state)
        if self.cfg.finetune.select == "best_val" and self.best.round:
            say(f"finetune: the model of round {self.best.round} is final (best mean validation AUC "
                f"{self.best.score:.3f}; finetune.select: best_val)")
            final = self.best.arrays()
        return self.evaluate(final)

    def _config(self, phase: Phase, offset: int, split: str | None = None) -> ConfigRecord:
        record = ConfigRecord({RUN_CONFIG: self.cfg.to_json(), PHASE: phase, ROUND: offset, RUN_KEY: self.run_key})   # + the strategy's server-round = the absolute round
        if split:
            record[SPLIT] = split
        return record

    # -- what travels: the phase's shared parameters packed into one vector (cmvim.sharing) ----
    def _layout(self, phase: Phase) -> dict:
        if phase not in self._layouts:
            self._layouts[phase] = shared_layout(build_model(self.cfg, phase), phase, self.cfg.personalize)
        return self._layouts[phase]

    def _send(self, arrays: dict, phase: Phase) -> ArrayRecord:
        layout = self._layout(phase)
        missing = [name for name in layout if name not in arrays]
        if missing:
            raise RuntimeError(f"{phase}: the global model lacks {len(missing)} shared parameter(s) of the run's model "
                               f"(first: {missing[0]}): a checkpoint from another model config?")
        return ArrayRecord(pack({name: arrays[name] for name in layout}))

    def _received(self, record: ArrayRecord, phase: Phase) -> dict:
        return unpack(record.to_torch_state_dict(), self._layout(phase))

    def _connected(self) -> int:
        return len(list(self.grid.get_node_ids()))

    def _wait_for_sites(self, phase: Phase, poll: float = 1.0) -> None:
        """Flower's node sampling waits forever for min_nodes sites: wait here, with a deadline."""
        need, deadline = self.cfg.strategy.min_nodes, time.monotonic() + self.cfg.strategy.wait_for_sites
        connected = self._connected()
        if connected < need:
            say(f"waiting up to {self.cfg.strategy.wait_for_sites:.0f} s for {need} sites ({connected} connected)")
        while connected < need:
            if time.monotonic() >= deadline:
                expected = self.cfg.cohort.site_names
                names = f" (the run expects {', '.join(expected)})" if expected else ""
                raise SitesMissing(f"{phase}: {need - connected} of the {need} sites needed (strategy.min_nodes) "
                                   f"did not connect within {self.cfg.strategy.wait_for_sites:.0f} s "
                                   f"(strategy.wait_for_sites): {connected} connected{names}. Check that every "
                                   "site's cmvim-client is running and can reach the server")
            time.sleep(poll)
            connected = self._connected()

    def _checkpoint(self, phase: RunPhase, round_: int, arrays: dict, strategy_state: dict | None = None) -> None:
        Checkpoint(phase, round_, arrays, strategy_state or {}, self.history, self.rejected,
                   self.central.state()).save(self.ckpt_dir, self.cfg.checkpoints.keep_last)

    def run_phase(self, phase: Phase, arrays: dict, done: int, state: dict) -> dict:
        pc = self.cfg.phase(phase)
        remaining = pc.rounds - done
        later = self.cfg.finetune.rounds if phase == "pretrain" else 0      # rounds of the phases after this one
        if remaining <= 0:
            return arrays
        if self.central.stopped:
            say(f"\n== {phase}: skipped: {self.central.stopped} ==")
            return arrays
        evaluate_rounds = phase == "finetune" and self.cfg.evaluation.every_round
        self._wait_for_sites(phase)
        plan = self.central.start(remaining, later, self._connected())
        carry = evaluate_rounds and self.cfg.evaluation.carry_validation and not self.cfg.secure_aggregation.enabled
        strategy = make_strategy(self.cfg.strategy, evaluate=evaluate_rounds, central_dp=self.cfg.central_dp,
                                 sites=self.central.sites, accountant=self.central.accountant, round_offset=done,
                                 carry_validation=carry, last_round=remaining)
        restore_strategy_state(strategy, state)
        say(f"\n== {phase}: rounds {done + 1}-{pc.rounds}, strategy {self.cfg.strategy.name}"
            f"{self._privacy_label()}, {self._connected()} sites connected ==")
        if plan:
            say(plan)
        recorder = RoundRecorder(self, phase, strategy, arrays, done, later, evaluate_rounds)
        if self.cfg.secure_aggregation.enabled:
            return self._secure_rounds(recorder, arrays)
        try:
            result = strategy.start(grid=self.grid, initial_arrays=self._send(arrays, phase), num_rounds=remaining,
                                    timeout=self.cfg.strategy.round_timeout, train_config=self._config(phase, done),
                                    evaluate_config=self._config(phase, done, "val"),
                                    evaluate_fn=recorder.after_round)
        except CentralBudgetSpent as exc:
            say(f"    ! {self.central.budget_spent()}; no further training, the model of the last round is final")
            log.info("central DP: %s", exc)
            self._validate_last_round(recorder)
            return recorder.latest
        # Flower's Result.arrays stays an empty record when no round aggregated (every round
        # had too few valid updates): then the phase's starting model is still the global one
        final = self._received(result.arrays, phase) if result.arrays is not None else {}
        return final if final else arrays

    def _validate_last_round(self, recorder: RoundRecorder) -> None:
        """Central DP stopped the phase: the last round's model, whose validation was to travel with
        the next round's training (carried validation), is validated on its own."""
        last = self._entry(recorder.phase, recorder.done + recorder.rounds_recorded)
        if recorder.strategy.carry_validation and last is not None and not last["evaluate"]:
            say(f"    validating round {last['round']} on its own (its validation was to travel with the next round)")
            scored = self._ask_sites(recorder.latest, "val", {}, self.rejected, "validate")
            recorder.validated(last, {site: m for site, m in scored.items() if m.get(NUM_EXAMPLES, 0) > 0},
                               recorder.latest)

    def _entry(self, phase: Phase, round_: int) -> dict | None:
        """The history entry of a phase's round (this run's, or the resumed run's)."""
        return next((e for e in reversed(self.history) if e["phase"] == phase and e["round"] == round_), None)

    def _secure_rounds(self, recorder: RoundRecorder, arrays: dict) -> dict:
        """The phase's rounds with training through SecAgg+ (cmvim.server.secagg); validation, progress
        and checkpoints as in Flower's Strategy.start, which this loop mirrors."""
        from .secagg import SecureAggregator
        if self.context is None:
            raise RuntimeError("secure aggregation needs the ServerApp's context: FederatedRun(..., context=context)")
        phase, done, strategy = recorder.phase, recorder.done, recorder.strategy
        timeout = self.cfg.strategy.round_timeout
        aggregator = SecureAggregator(self.grid, self.context, self.cfg.secure_aggregation, self.cfg.strategy.min_nodes,
                                      timeout)
        record = self._send(arrays, phase)
        try:
            for server_round in range(1, recorder.remaining + 1):
                new, sites, dropouts = aggregator.round(server_round, record, self._config(phase, done))
                recorder.trained_securely(server_round, sites, dropouts, aggregated=new is not None)
                record = record if new is None else new
                messages = strategy.configure_evaluate(server_round, record, self._config(phase, done, "val"), self.grid)
                if messages:
                    strategy.aggregate_evaluate(server_round, self.grid.send_and_receive(messages, timeout=timeout))
                recorder.after_round(server_round, record)
        finally:
            aggregator.close()
        return self._received(record, phase)

    def _privacy_label(self) -> str:
        cdp = self.cfg.central_dp
        if self.cfg.secure_aggregation.enabled:
            return " with secure aggregation (SecAgg+)"
        return (f" under central DP ({cdp.clipping}-side clipping, noise multiplier {cdp.noise_multiplier})"
                if cdp.enabled else "")

    # -- evaluate --------------------------------------------------------------------------
    def _ask_sites(self, arrays: dict, split: str, extra: dict, failures: list[dict], stage: str) -> dict[str, dict]:
        """Every connected site evaluates `arrays` on its `split`: {site: metrics} of those that did;
        a site that could not is named in `failures` and the rest go on."""
        content = RecordDict({ARRAYS: self._send(arrays, "finetune"), CONFIG: self._config("finetune", 0, split)})
        content[CONFIG][SERVER_ROUND] = 0
        for key, value in extra.items():
            content[CONFIG][key] = value
        messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node)
                    for node in self.grid.get_node_ids()]
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.strategy.round_timeout))
        answered = {}
        for reply in replies:
            name = site_name(reply)
            error = None if reply.has_error() else reply.content.get(SITE, {}).get(SITE_ERROR)
            if reply.has_error() or error:
                reason = str(error) if error else reply.error.reason.splitlines()[0][:200]
                failures.append({"site": name, "stage": stage, "reason": reason})
                say(f"    ! site {name} could not {stage}: {reason}")
                continue
            answered[name] = dict(reply.content[METRICS].items())
        return answered

    def calibrate(self, arrays: dict, failures: list[dict]) -> Calibration:
        """The decision threshold and score calibration of the final model, fitted on the sites'
        summed validation logit histograms (cmvim.calibration); never a subject's score."""
        ev = self.cfg.evaluation
        if ev.threshold_rule == "fixed" and ev.calibration == "none":
            return Calibration(note="threshold 0.5 on uncalibrated scores (evaluation.threshold_rule: fixed)")
        say("\n== calibrate: every site scores its validation split; the threshold comes from their histograms ==")
        answered = self._ask_sites(arrays, "val", {CALIBRATE: 1}, failures, "calibrate")
        histograms = {name: (m[LOGIT_POS], m[LOGIT_NEG]) for name, m in answered.items()
                      if LOGIT_POS in m and LOGIT_NEG in m}
        if not histograms:
            calibration = Calibration(note="threshold 0.5 on uncalibrated scores (no site sent validation histograms)")
        else:
            calibration = fit_calibration(*summed_histograms(histograms), ev.threshold_rule, ev.target_sensitivity,
                                          ev.calibration == "platt")
        say(f"    {calibration.note}")
        return calibration

    def evaluate(self, arrays: dict) -> dict:
        failures: list[dict] = []
        calibration = self.calibrate(arrays, failures)
        say("\n== evaluate: every site scores its own test split with the final model ==")
        answered = self._ask_sites(arrays, "test", {CALIBRATION: json.dumps(calibration.to_dict())}, failures,
                                   "evaluate")
        sites, histograms = {}, {}
        for name, metrics in answered.items():
            histograms[name] = (metrics.pop(HIST_POS, []), metrics.pop(HIST_NEG, []))
            sites[name] = site_entry(metrics)
        training = self.training_record()
        model_info = self.plan_export(calibration, training)
        elapsed = time.perf_counter() - self.started
        baselines = self.baselines() if self.baselines else None
        results = final_report(self.cfg, self.out_dir, sites, histograms, self.history, self.rejected + failures,
                               elapsed, self.central, baselines, model_info)
        if "path" in model_info:
            self.export(arrays, calibration, training, results)
        self._checkpoint("evaluate", 0, arrays)
        return results

    def training_record(self) -> dict:
        """How much the final model was trained: the rounds whose new global model took at least
        one site's update, per phase, and the sites whose updates fine-tuning aggregated. (A
        resumed run's older rounds, logged before this record existed, count when a site trained.)"""
        record: dict = {}
        for phase in PHASES:
            rounds = [e for e in self.history if e["phase"] == phase]
            took = [e for e in rounds if e.get("aggregated", list(e.get("train", {})))]
            record[f"{phase}_rounds"] = self.cfg.phase(phase).rounds
            record[f"{phase}_rounds_aggregated"] = len(took)
            if phase == "finetune":
                record["finetune_sites"] = sorted({s for e in took for s in e.get("aggregated", e.get("train", {}))})
                last = took[-1] if took else {}
                record["finetune_examples"] = {s: int(m[NUM_EXAMPLES]) for s, m in last.get("train", {}).items()
                                               if s in record["finetune_sites"] and NUM_EXAMPLES in m}
        return record

    def plan_export(self, calibration: Calibration, training: dict) -> dict:
        """Where DIR/model/ goes, or why there is none: a model no fine-tuning round trained is
        never exported (an older model/ in DIR is removed, so nothing untrained is left to score with)."""
        info = {"decision": calibration.to_dict(), "training": training}
        why = None
        if self.cfg.personalize != "none":
            why = (f"no model/ written: with personalize {self.cfg.personalize!r} part of every site's model stays at "
                   "the site, so no single model is the run's")
        elif training["finetune_rounds_aggregated"] == 0:
            why = ("no model/ written: no fine-tuning round aggregated a site's update, so the classifier was never "
                   "trained (see 'failures' for why the sites could not train)")
        if why is None:
            info["path"] = "model"
            return info
        info["note"] = why
        stale = self.out_dir / "model"
        if stale.is_dir():
            shutil.rmtree(stale)
            why += f"; the model/ an earlier run left in {self.out_dir} was removed"
            info["note"] = why
        say(f"    ! {why}")
        return info

    def export(self, arrays: dict, calibration: Calibration, training: dict, results: dict) -> Path:
        """DIR/model/: the final classifier, its decision rule, how it was trained and what it scored
        (cmvim.portable; the model card beside it)."""
        model = load_shared(build_model(self.cfg, "finetune"), "finetune", "none", arrays, {})
        fingerprint = hashlib.sha256(f"{self.run_key}|{self.cfg.to_json()}".encode()).hexdigest()
        evaluation = {"sites": results["sites"], "pooled": results["pooled"], "metrics_file": "../metrics.json"}
        if results.get("baselines"):
            evaluation["baselines"] = {name: {"mean_auc": b.get("mean_auc")} for name, b in results["baselines"].items()}
        say("    exporting the model (model.safetensors, a torch.export program, config.json, the model card)")
        return export_model(self.out_dir / "model", self.cfg, model.state_dict(), calibration, fingerprint,
                            training=training, evaluation=evaluation)

    # -- figures ---------------------------------------------------------------------------
    def _reconstruction_figure(self, pretrained: dict) -> None:
        """reconstruction.png from the pretrained weights (cmvim.reconstruction.draw_reconstruction): a
        figure for a person, so whatever goes wrong is one line and the run goes on."""
        try:
            from cmvim.reconstruction import draw_reconstruction
            draw_reconstruction(self.cfg, pretrained, self.out_dir, say=say)
        except Exception as exc:  # noqa: BLE001 - never fails the run
            detail = (str(exc).splitlines() or [""])[0][:200]
            say(f"reconstruction figure not drawn ({type(exc).__name__}: {detail}); the run goes on")
