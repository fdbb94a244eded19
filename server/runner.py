"""The federated run, driven from the ServerApp: pretrain -> finetune -> evaluate.

Each training phase is one call of a Flower strategy's `start` (FedAvg, FedProx or FedAdam,
guarded: see `cmvim.server.strategy`). After every round the global model, the strategy's state,
the phase and the round go to `out/checkpoints/`, so `--resume out/` continues where a
stopped run left off. The evaluate phase sends the final model to every site, which scores
its own test split and returns aggregate metrics and score histograms (never predictions).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, Grid

from cmvim.config import to_dict
from cmvim.run_config import RunConfig
from cmvim.protocol import (ARRAYS, CONFIG, HIST_NEG, HIST_POS, METRICS, NUM_EXAMPLES, PHASE, ROUND, RUN_CONFIG, RUN_KEY,
                            SERVER_ROUND, SITE, SITE_ERROR, SPLIT)
from cmvim.results import (mean_auc, plot_rocs, pooled_entry, site_entry, site_table, write_metrics,
                           write_summary)
from cmvim.site_task import initial_state

from .strategy import (CentralBudgetSpent, central_accountant, make_strategy, restore_strategy_state, site_name,
                       strategy_state)

log = logging.getLogger("cmvim.server")


def _say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Checkpoint:
    phase: str
    round: int
    arrays: dict[str, torch.Tensor]
    strategy: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    central_dp: dict = field(default_factory=dict)     # Flower's accountant state, the sites it counts

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.phase}_round{self.round:03d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"phase": self.phase, "round": self.round, "arrays": self.arrays, "strategy": self.strategy,
                    "history": self.history, "rejected": self.rejected, "central_dp": self.central_dp}, tmp)
        tmp.replace(path)
        (folder / "latest.json").write_text(json.dumps({"file": path.name, "phase": self.phase, "round": self.round}))
        return path

    @classmethod
    def latest(cls, folder: Path) -> "Checkpoint | None":
        pointer = folder / "latest.json"
        if not pointer.exists():
            return None
        data = torch.load(folder / json.loads(pointer.read_text())["file"], weights_only=False)
        return cls(data["phase"], data["round"], data["arrays"], data["strategy"], data["history"],
                   data["rejected"], data.get("central_dp", {}))


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class FederatedRun:
    def __init__(self, cfg: RunConfig, out_dir: Path, grid: Grid, resume: bool = False, context: Context | None = None):
        self.cfg, self.out_dir, self.grid = cfg, Path(out_dir), grid
        self.context = context          # the ServerApp's Flower context: SecAgg+ runs on Flower's legacy machinery
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.resume = resume
        self.history: list[dict] = []
        self.rejected: list[dict] = []
        self.started = time.perf_counter()
        self.run_key = hashlib.sha256(f"{self.out_dir.resolve()}|{cfg.to_json()}".encode()).hexdigest()[:16]
        self.accountant = None          # central DP: Flower's RDP accountant, one for the whole run
        self.central_sites = 0          # central DP: the sites each round's noise is calibrated for
        self.central_stopped: str | None = None     # why central DP stopped training (budget), if it did

    # -- phases -----------------------------------------------------------------------------
    def run(self) -> dict:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        ckpt = Checkpoint.latest(self.ckpt_dir) if self.resume else None
        if self.resume and ckpt is None:
            _say(f"resume: no checkpoint in {self.ckpt_dir}; starting from the beginning")
        if ckpt is not None:
            self.history, self.rejected = ckpt.history, ckpt.rejected
            self._restore_central(ckpt.central_dp)
            _say(f"resuming from {ckpt.phase} round {ckpt.round}")

        if ckpt is None or ckpt.phase == "pretrain":
            arrays = ckpt.arrays if ckpt else initial_state(self.cfg, "pretrain")
            pretrained = self.run_phase("pretrain", arrays, ckpt.round if ckpt else 0, ckpt.strategy if ckpt else {})
            ckpt = None
            arrays = initial_state(self.cfg, "finetune", pretrained)
            done, state = 0, {}
        elif ckpt.phase == "evaluate":          # the run had finished: evaluate again
            arrays, done, state = ckpt.arrays, self.cfg.finetune.rounds, {}
        else:
            arrays, done, state = ckpt.arrays, ckpt.round, ckpt.strategy
        final = self.run_phase("finetune", arrays, done, state)
        return self.evaluate(final)

    def _config(self, phase: str, offset: int, split: str | None = None) -> ConfigRecord:
        record = ConfigRecord({RUN_CONFIG: self.cfg.to_json(), PHASE: phase, ROUND: offset, RUN_KEY: self.run_key})   # + the strategy's server-round = the absolute round
        if split:
            record[SPLIT] = split
        return record

    def run_phase(self, phase: str, arrays: dict, done: int, state: dict) -> dict:
        pc = self.cfg.phase(phase)
        remaining = pc.rounds - done
        if remaining <= 0:
            return arrays
        if self.central_stopped:
            _say(f"\n== {phase}: skipped: {self.central_stopped} ==")
            return arrays
        evaluate_rounds = phase == "finetune" and self.cfg.evaluation.every_round
        plan = self._start_central(phase, remaining)
        strategy = make_strategy(self.cfg.strategy, evaluate=evaluate_rounds, central_dp=self.cfg.central_dp,
                                 sites=self.central_sites, accountant=self.accountant)
        strategy.round_offset = done
        restore_strategy_state(strategy, state)
        _say(f"\n== {phase}: rounds {done + 1}-{pc.rounds}, strategy {self.cfg.strategy.name}"
             f"{self._privacy_label()}, {len(list(self.grid.get_node_ids()))} sites connected ==")
        if plan:
            _say(plan)
        round_start = [time.perf_counter()]
        phase_seconds: list[float] = []
        latest = [arrays]           # the global model after the last round (kept if central DP stops the phase)
        seen = [0]                  # rejections already reported

        def after_round(server_round: int, round_arrays: ArrayRecord):
            if server_round == 0:
                return None
            absolute = done + server_round
            seconds = time.perf_counter() - round_start[0]
            round_start[0] = time.perf_counter()
            phase_seconds.append(seconds)
            rlog = strategy.round_log
            # this round's: the strategy lives for one phase (round numbers repeat across phases)
            new_rejections = [{"phase": phase, **r} for r in rlog.rejected[seen[0]:]]
            seen[0] = len(rlog.rejected)
            self.rejected.extend(new_rejections)
            entry = {"phase": phase, "round": absolute, "seconds": round(seconds, 2),
                     "train": rlog.train, "evaluate": rlog.evaluate if evaluate_rounds else {},
                     "rejected": new_rejections}
            if self.accountant is not None:
                entry["central_dp"] = self.central_spent()
            self.history.append(entry)
            state_dict = round_arrays.to_torch_state_dict()
            latest[0] = state_dict
            Checkpoint(phase, absolute, state_dict, strategy_state(strategy), self.history, self.rejected,
                       self._central_state()).save(self.ckpt_dir)
            self._progress(phase, absolute, pc.rounds, entry, phase_seconds)
            return None

        if self.cfg.secure_aggregation.enabled:
            return self._secure_rounds(strategy, arrays, remaining, phase, done, after_round)
        try:
            result = strategy.start(grid=self.grid, initial_arrays=ArrayRecord(arrays), num_rounds=remaining,
                                    timeout=self.cfg.strategy.round_timeout, train_config=self._config(phase, done),
                                    evaluate_config=self._config(phase, done, "val"), evaluate_fn=after_round)
        except CentralBudgetSpent as exc:
            spent = self.central_spent()
            self.central_stopped = (f"the central DP budget (max_epsilon {self.cfg.central_dp.max_epsilon}) is spent: "
                                    f"epsilon {spent['epsilon']:.3f} after {spent['releases']} round(s)")
            _say(f"    ! {self.central_stopped}; no further training, the model of the last round is final")
            log.info("central DP: %s", exc)
            return latest[0]
        # Flower's Result.arrays stays an empty record when no round aggregated (every round
        # had too few valid updates): then the phase's starting model is still the global one
        final = result.arrays.to_torch_state_dict() if result.arrays is not None else {}
        return final if final else arrays

    def _secure_rounds(self, strategy, arrays: dict, rounds: int, phase: str, done: int, after_round) -> dict:
        """The phase's rounds with training through SecAgg+ (cmvim.server.secagg); validation, progress
        and checkpoints as in Flower's Strategy.start, which this loop mirrors."""
        from .secagg import SecureAggregator
        if self.context is None:
            raise RuntimeError("secure aggregation needs the ServerApp's context: FederatedRun(..., context=context)")
        timeout = self.cfg.strategy.round_timeout
        aggregator = SecureAggregator(self.grid, self.context, self.cfg.secure_aggregation, self.cfg.strategy.min_nodes,
                                      timeout)
        record = ArrayRecord(arrays)
        try:
            for server_round in range(1, rounds + 1):
                new, sites, dropouts = aggregator.round(server_round, record, self._config(phase, done))
                strategy.round_log.train = sites
                for dropout in dropouts:
                    strategy.round_log.rejected.append({"round": done + server_round, "stage": "train", **dropout})
                if new is None:
                    log.warning("round %d: the secure aggregation round aggregated nothing: the global model is kept",
                                done + server_round)
                else:
                    record = new
                messages = strategy.configure_evaluate(server_round, record, self._config(phase, done, "val"), self.grid)
                if messages:
                    strategy.aggregate_evaluate(server_round, self.grid.send_and_receive(messages, timeout=timeout))
                after_round(server_round, record)
        finally:
            aggregator.close()
        return record.to_torch_state_dict()

    # -- central DP (Flower's wrappers and accountant) ----------------------------------------
    def _start_central(self, phase: str, rounds: int) -> str:
        """Create the run's accountant at the first training phase; say what the plan will spend."""
        cdp = self.cfg.central_dp
        if not cdp.enabled:
            return ""
        if self.accountant is None:
            self.central_sites = max(self.cfg.strategy.min_nodes, len(list(self.grid.get_node_ids())))
            self.accountant = central_accountant(cdp, self.central_sites)
        planned = rounds + (self.cfg.finetune.rounds if phase == "pretrain" else 0)
        projection = central_accountant(dataclasses.replace(cdp, max_epsilon=None), self.central_sites)
        projection.compose(GaussianPrivacyEvent(cdp.noise_multiplier, self.central_sites, self.central_sites),
                           self.accountant.num_releases + planned)      # every release is the same event
        budget = f", budget {cdp.max_epsilon}" if cdp.max_epsilon is not None else ""
        return (f"central DP: clipping to {cdp.clipping_norm}, noise std {cdp.noise_multiplier} x clip / "
                f"{self.central_sites} sites; epsilon {self.central_spent()['epsilon']:.3f} spent, the {planned} planned "
                f"round(s) bring it to {projection.get_epsilon(cdp.delta):.3f} (delta {cdp.delta:g}){budget}")

    def _privacy_label(self) -> str:
        cdp = self.cfg.central_dp
        if self.cfg.secure_aggregation.enabled:
            return " with secure aggregation (SecAgg+)"
        return (f" under central DP ({cdp.clipping}-side clipping, noise multiplier {cdp.noise_multiplier})"
                if cdp.enabled else "")

    def central_spent(self) -> dict:
        spent = self.accountant.get_privacy_spent()
        return {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases}

    def _central_state(self) -> dict:
        if self.accountant is None:
            return {}
        return {"sites": self.central_sites, "accountant": self.accountant.state_dict(),
                "stopped": self.central_stopped}

    def _restore_central(self, state: dict) -> None:
        if not state or not self.cfg.central_dp.enabled:
            return
        self.central_sites = int(state["sites"])
        self.accountant = central_accountant(self.cfg.central_dp, self.central_sites)
        self.accountant.load_state_dict(state["accountant"])
        self.central_stopped = state.get("stopped")

    def privacy_spent(self) -> dict[str, dict]:
        """Per site, the epsilon (and delta) its last DP round reported: the run's spend there."""
        spent: dict[str, dict] = {}
        for entry in self.history:
            for name, metrics in entry["train"].items():
                if "epsilon" in metrics:
                    spent[name] = {"epsilon": metrics["epsilon"], "delta": metrics["delta"]}
        return spent

    def _progress(self, phase: str, round_: int, total: int, entry: dict, seconds: list[float]) -> None:
        train = entry["train"]
        losses = {site: m.get("loss") for site, m in train.items() if m.get("loss") is not None}
        weights = {site: m.get(NUM_EXAMPLES, 0) for site, m in train.items()}
        mean = (sum(losses[s] * weights[s] for s in losses) / max(sum(weights[s] for s in losses), 1)) if losses else None
        # this phase's recent rounds predict its rest; a later phase is guessed from them too
        remaining = total - round_ + (self.cfg.finetune.rounds if phase == "pretrain" else 0)
        recent = seconds[1:][-3:] or seconds       # a phase's first round includes starting the workers
        per_round = sum(recent) / len(recent)
        line = (f"[{phase}] round {round_}/{total} | sites {len(train)}/{len(list(self.grid.get_node_ids()))} | "
                f"loss {mean:.4f} " if mean is not None else f"[{phase}] round {round_}/{total} | no updates ")
        line += "(" + ", ".join(f"{s} {v:.3f}" for s, v in sorted(losses.items())) + ")"
        if entry["evaluate"]:
            aucs = [m["auc"] for m in entry["evaluate"].values()
                    if isinstance(m.get("auc"), float) and math.isfinite(m["auc"])]
            if aucs:
                line += f" | val AUC {sum(aucs) / len(aucs):.3f}"
        eps = {site: m["epsilon"] for site, m in train.items() if "epsilon" in m}
        if eps:
            line += " | epsilon " + ", ".join(f"{s} {v:.2f}" for s, v in sorted(eps.items()))
        if "central_dp" in entry:
            line += f" | central epsilon {entry['central_dp']['epsilon']:.2f}"
        line += f" | {entry['seconds']:.0f}s/round | ETA {_fmt_duration(per_round * remaining)}"
        _say(line)
        for rejection in entry["rejected"]:
            _say(f"    ! site {rejection['site']} left out ({rejection['stage']}): {rejection['reason']}")

    # -- evaluate --------------------------------------------------------------------------
    def evaluate(self, arrays: dict) -> dict:
        _say("\n== evaluate: every site scores its own test split with the final model ==")
        node_ids = list(self.grid.get_node_ids())
        content = RecordDict({ARRAYS: ArrayRecord(arrays), CONFIG: self._config("finetune", 0, "test")})
        content[CONFIG][SERVER_ROUND] = 0
        messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node) for node in node_ids]
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.strategy.round_timeout))
        sites, histograms, failures = {}, {}, []
        for reply in replies:
            name = site_name(reply)
            error = None if reply.has_error() else reply.content.get(SITE, {}).get(SITE_ERROR)
            if reply.has_error() or error:
                reason = str(error) if error else reply.error.reason.splitlines()[0][:200]
                failures.append({"site": name, "stage": "evaluate", "reason": reason})
                _say(f"    ! site {name} could not evaluate: {reason}")
                continue
            metrics = dict(reply.content[METRICS].items())
            histograms[name] = (metrics.pop(HIST_POS, []), metrics.pop(HIST_NEG, []))
            sites[name] = site_entry(metrics)
        pooled = pooled_entry(histograms)
        elapsed = time.perf_counter() - self.started
        lines = [f"- strategy: {self.cfg.strategy.name}; rounds: pretrain {self.cfg.pretrain.rounds}, "
                 f"finetune {self.cfg.finetune.rounds} (from a {self.cfg.finetune_init} encoder); "
                 f"model: {self.cfg.model.summary()}",
                 f"- sites: {', '.join(sorted(sites))}; mean per-site AUC {mean_auc(sites):.3f}; pooled AUC "
                 f"{pooled['auc']:.3f}", f"- wall time of the federated part: {_fmt_duration(elapsed)}"]
        if self.rejected or failures:
            lines.append(f"- left out: {len(self.rejected + failures)} site-round(s); see metrics.json 'failures'")
        if self.cfg.privacy.enabled:
            spent = self.privacy_spent()
            for name, entry in sites.items():
                entry.update({k: v for k, v in spent.get(name, {}).items()})
            pv = self.cfg.privacy
            setting = (f"noise multiplier {pv.noise_multiplier}" if pv.noise_multiplier is not None
                       else f"target epsilon {pv.target_epsilon}")
            lines.append(f"- differential privacy (DP-SGD at each site, {setting}, clip {pv.max_grad_norm}): epsilon "
                         "spent " + ", ".join(f"{n} {e['epsilon']:.2f} (delta {e['delta']:.0e})"
                                              for n, e in sorted(spent.items())))
        extra = {}
        if self.cfg.secure_aggregation.enabled:
            sa = self.cfg.secure_aggregation
            lines.append(f"- secure aggregation (Flower SecAgg+): the server saw only the weighted sum of the sites' "
                         f"models each training round (weights quantized to {sa.quantization_range} levels over "
                         f"+-{sa.clipping_range:g} x max_weight {sa.max_weight:g} / num-examples)")
        if self.accountant is not None:
            cdp = self.cfg.central_dp
            extra["central_dp"] = {"clipping": cdp.clipping, "noise_multiplier": cdp.noise_multiplier,
                                   "clipping_norm": cdp.clipping_norm, "sites": self.central_sites,
                                   **self.central_spent(), "stopped": self.central_stopped}
            lines.append(f"- central DP (Flower, {cdp.clipping}-side clipping to {cdp.clipping_norm}, noise multiplier "
                         f"{cdp.noise_multiplier}, {self.central_sites} sites): epsilon "
                         f"{extra['central_dp']['epsilon']:.3f} at delta {cdp.delta:g} for a whole site's data, "
                         f"{extra['central_dp']['releases']} noised round(s)"
                         + (f"; stopped early: {self.central_stopped}" if self.central_stopped else ""))
        path = write_metrics(self.out_dir, sites, pooled, self.history, to_dict(self.cfg),
                             failures=self.rejected + failures, summary=lines, extra=extra)
        plot_rocs(self.out_dir, histograms, sites)
        table = site_table(sites, pooled)
        _say("\n" + table)
        write_summary(self.out_dir, "cmvim federated run", table, lines)
        _say(f"\nresults: {path}, {self.out_dir / 'summary.md'}, ROC plots roc_*.png")
        Checkpoint("evaluate", 0, arrays, {}, self.history, self.rejected, self._central_state()).save(self.ckpt_dir)
        return {"sites": sites, "pooled": pooled, "rounds": self.history, "failures": self.rejected + failures}
