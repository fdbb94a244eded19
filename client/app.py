"""Flower ClientApp (Message API): a site's train and evaluate handlers, thin over cmvim.site_task.

Which site this node is:
  deployment  node config `site`, `data-dir` and `policy` (set by `cmvim-client --site A --data DIR
              --policy FILE`); every request is checked against the site policy before any data is read
  simulation  node config `partition-id`: the N-th site folder of the run's cohort

Every reply carries only the shared parameters, aggregate metrics and the site's name. A
failure is caught here, logged in full locally, and answered with a public message (the kind
of problem, never a subject id, path or report text) so the server can name the site and go on.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
import traceback
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from cmvim.flower_internals import KEY_CLIPPING_NORM
from cmvim.config import ConfigError
from cmvim.data import DataError, SiteData, run_load_key
from cmvim.device import DeviceError
from cmvim.durable import write_atomic
from cmvim.run_config import RunConfig
from cmvim.privacy import PrivacyBudgetExceeded, SiteLimits, count_release
from cmvim.calibration import Calibration
from cmvim.release import rounded
from cmvim.protocol import (ARRAYS, CALIBRATE, CALIBRATION, CONFIG, HIST_NEG, HIST_POS, METRICS, NUM_EXAMPLES, PHASE,
                            PROXIMAL_MU, ROUND, RUN_CONFIG, RUN_KEY, SECAGG_MASKED, SERVER_ROUND, SITE, SITE_ERROR,
                            SITE_NAME, SPLIT, VAL_ERROR, VAL_METRICS, VALIDATE, WORK_SECONDS)
from cmvim.sharing import pack
from cmvim.site_task import SiteTask, SiteTaskError

from .policy import SIMULATED_SITE_POLICY, PolicyRefusal, load_policy
from .secagg import secagg_mod

log = logging.getLogger("cmvim.client")
LOCAL_STATE = "cmvim-local-params"

@functools.lru_cache(maxsize=4)
def coordinator_key(path: str):
    """The coordinator's public key, read once per file (it changes only with a new cmvim-client start)."""
    from cmvim.instructions import load_public_key
    return load_public_key(Path(path))


def coordinator_mod(msg: Message, context: Context, call_next) -> Message:
    """First, before anything reads the message: a deployed site that was given the coordinator's
    public key (cmvim-client --coordinator-key) runs only instructions the coordinator signed for
    this node, unexpired and not run before (cmvim.instructions). A refusal is answered with its
    reason and nothing else: no data read, no policy or release count touched. The reply is sealed
    to the key the instruction carries (cmvim.sealed): another site that pulls it reads nothing."""
    node = context.node_config
    key_file = node.get("coordinator-key")
    if not key_file:
        return call_next(msg, context)            # a simulation, or a local --insecure test
    name = str(node.get("site", f"node-{context.node_id}"))
    try:
        from cmvim.instructions import SIGNATURE, NonceLog, verify
        state = node.get("state-dir")
        nonces = NonceLog(Path(str(state)) / "instructions.json") if state else None
        nonce, reply_key = verify(msg, context.node_id, coordinator_key(str(key_file)), nonces)
        del msg.content[SIGNATURE]
    except Exception as exc:  # noqa: BLE001 - every refusal is a public reply naming the failed check
        from cmvim.instructions import InstructionRefused
        log.warning("site %s refused an instruction: %s", name, exc)
        print(f"cmvim: site {name} refused an instruction: {exc}", flush=True)
        public = str(exc) if isinstance(exc, InstructionRefused) else \
            f"refused: the site could not check the instruction's signature ({type(exc).__name__}; site log)"
        return Message(RecordDict({SITE: ConfigRecord({SITE_NAME: name, SITE_ERROR: public}),
                                   METRICS: MetricRecord({NUM_EXAMPLES: 0})}), reply_to=msg)
    reply = call_next(msg, context)
    if reply_key is not None and not reply.has_error() and reply.has_content():
        from cmvim.sealed import seal
        reply.content = seal(reply.content, reply_key, nonce)      # only the coordinator opens it
    return reply


app = ClientApp(mods=[coordinator_mod, secagg_mod])   # signed instructions only; SecAgg+ stages when asked


def flatten_metrics(metrics: dict) -> dict[str, float | int | list[float]]:
    """What a Flower MetricRecord can carry: numbers (ints kept as ints) and lists of floats; anything
    else (strings, None, bools) is dropped, so nothing but numbers leaves the site."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (list, tuple)):
            out[key] = [float(v) for v in value]
        elif isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            out[key] = int(value) if isinstance(value, (int, np.integer)) else float(value)
    return out


class SiteRefusal(Exception):
    """The site will not do what was asked (site policy, bad config); the message is public."""


def site_of(context: Context, cfg: RunConfig) -> tuple[str, Path]:
    node = context.node_config
    if "data-dir" in node:
        return str(node.get("site", Path(str(node["data-dir"])).name)), Path(str(node["data-dir"]))
    if "partition-id" in node:
        if not cfg.cohort.path:
            raise SiteRefusal("simulation without a cohort path: the server must set cohort.path")
        folders = list(cfg.cohort.site_folders().items())
        index = int(node["partition-id"])
        if index >= len(folders):
            raise SiteRefusal(f"partition {index} has no site: the cohort has {len(folders)} sites")
        return folders[index]
    raise SiteRefusal("node config names no site: start the SuperNode with cmvim-client --site NAME --data DIR")


def ledger_path(context: Context, site_dir: Path) -> Path:
    """The site's privacy ledger: in the node's state folder (cmvim-client --state-dir), else in
    the site folder (simulation)."""
    state = context.node_config.get("state-dir")
    return (Path(str(state)) if state else site_dir / ".cmvim_privacy") / "ledger.json"


_SITES: OrderedDict[tuple, tuple[SiteData, tuple]] = OrderedDict()
KEPT_SITES = 8                     # a simulation's worker process serves several sites


def _files_signature(site_dir: Path, site: SiteData | None) -> tuple:
    """What must not have changed for a kept SiteData to stand: the folder and its index files, and
    every scan and report it read (size and mtime, as the preprocessing cache keys them), with each
    PET's own sidecar and the dataset-level PET sidecars (tracer, frames: cmvim.data.pet)."""
    paths = [site_dir, *(site_dir / name for name in ("manifest.csv", "participants.tsv", "dataset_description.json"))]
    paths += sorted(site_dir.glob("*pet.json"))
    if site is not None:
        paths += [p for r in site.records for p in (r.entry.mri, r.entry.pet, r.entry.report) if p is not None]
        paths += [r.entry.pet.with_name(re.sub(r"\.nii(\.gz)?$", "", r.entry.pet.name) + ".json")
                  for r in site.records if r.entry.pet is not None]
    signature = []
    for path in paths:
        try:
            stat = path.stat()
            signature.append((stat.st_size, stat.st_mtime_ns))
        except OSError:
            signature.append(None)
    return tuple(signature)


def site_data(cfg: RunConfig, site_dir: Path, splits: tuple[int, tuple] | None = None) -> SiteData:
    """The site's data as the run reads it, kept between messages in a process that serves several
    (the warm site worker, a simulation's workers): read again when the run's data settings change
    or any file it read did (a scan replaced or damaged mid-run is read, and reported, again).
    `splits`: the site's own (seed, fractions) for subjects its manifest gives no split (a deployed
    site's policy); None: the run config's (simulation)."""
    key = run_load_key(site_dir, cfg, splits)
    if key in _SITES:
        site, signature = _SITES[key]
        if _files_signature(site_dir, site) == signature:
            _SITES.move_to_end(key)
            return site
    site = SiteData.for_run(site_dir, cfg, splits)
    _SITES[key] = (site, _files_signature(site_dir, site))
    while len(_SITES) > KEPT_SITES:
        _SITES.popitem(last=False)
    return site


def load_task(cfg: RunConfig, name: str, site_dir: Path, device: str | None = None,
              splits: tuple[int, tuple] | None = None, ledger_path: Path | None = None, run_key: str = "local",
              limits: SiteLimits | None = None) -> SiteTask:
    """The site's task; `device`: the site's own choice (cmvim-client --device), else the run's;
    `splits`: the site's own split seed and fractions (site_data); `ledger_path`, `run_key`,
    `limits`: the site's privacy ledger, the run the spends belong to and what the site's policy
    lets DP spend (SiteTask's)."""
    torch.set_num_threads(max(1, cfg.threads_per_site))
    site = site_data(cfg, site_dir, splits)
    if site.summary.skipped:
        log.warning("site %s: %d subject-visits skipped (see `cmvim-client check --data %s`)",
                    name, len(site.summary.skipped), site_dir)
    if not site.records:
        raise DataError("no usable subject in the site folder", kind="no usable subjects")
    try:
        return SiteTask(cfg, [site], name, ledger_path=ledger_path, run_key=run_key, limits=limits,
                        device=device)
    except DeviceError as exc:
        raise SiteRefusal(f"site {name}: {exc}") from None


def _handle(msg: Message, context: Context, training: bool) -> Message:
    name = str(context.node_config.get("site", f"node-{context.node_id}"))
    started = time.perf_counter()
    try:
        config = msg.content[CONFIG]
        cfg = RunConfig.from_json(str(config[RUN_CONFIG]))
        name, site_dir = site_of(context, cfg)
        phase = str(config[PHASE])
        round_ = int(config.get(SERVER_ROUND, 0)) + int(config[ROUND])      # absolute round in the phase
        split = None if training else str(config.get(SPLIT, "val"))
        policy_file = context.node_config.get("policy")
        deployed = "data-dir" in context.node_config
        policy = load_policy(str(policy_file) if policy_file else None) if deployed else SIMULATED_SITE_POLICY
        try:
            policy.check(cfg, phase, training, split, masked=bool(config.get(SECAGG_MASKED, False)))
        except PolicyRefusal:
            log.warning("site %s refused a %s request (site policy)", name, phase)
            raise
        if ARRAYS in msg.content:            # counted before anything is decoded or built
            policy.check_model_size(sum(int(np.prod(a.shape)) for a in msg.content[ARRAYS].values()))
        device = context.node_config.get("device")
        splits = None if policy.split_fractions is None else (policy.split_seed, tuple(policy.split_fractions))
        limits = SiteLimits(max_epsilon=policy.max_epsilon, max_delta=policy.max_delta,
                            min_noise_multiplier=policy.min_noise_multiplier if policy.dp_required else 0.0,
                            min_cell_count=policy.min_cell_count, release=policy.release_grid())
        task = load_task(cfg, name, site_dir, str(device) if device else None, splits,
                         ledger_path=ledger_path(context, site_dir), run_key=str(config.get(RUN_KEY, "unnamed-run")),
                         limits=limits)
        if not training:
            count_release(task.ledger_path.with_name("releases.json"), task.run_key, policy.max_evaluations)
        shared = msg.content[ARRAYS].to_torch_state_dict() if ARRAYS in msg.content else {}
        personal = personal_path(task.ledger_path, task.run_key)
        local = context.state[LOCAL_STATE].to_torch_state_dict() if LOCAL_STATE in context.state else \
            load_personal(personal)
        working = time.perf_counter()
        if training:
            carried = (carried_validation(task, policy, cfg, phase, shared, local, name, round_ - 1)
                       if config.get(VALIDATE, 0) else None)
            result = task.train(phase, round_, shared, local, float(config.get(PROXIMAL_MU, 0.0)))
            if result.local:
                context.state[LOCAL_STATE] = ArrayRecord(result.local)
                save_personal(personal, result.local)
            metrics = flatten_metrics(result.metrics)
            if not cfg.privacy.enabled:       # under DP-SGD a reply carries its accounting only
                metrics[WORK_SECONDS] = round(time.perf_counter() - working, 3)
            content = RecordDict({ARRAYS: ArrayRecord(pack(result.shared)), METRICS: MetricRecord(metrics),
                                  SITE: ConfigRecord({SITE_NAME: name})})
            if isinstance(carried, dict):
                content[VAL_METRICS] = MetricRecord(carried)
            elif carried is not None:
                content[SITE][VAL_ERROR] = carried
        else:
            content = RecordDict({METRICS: MetricRecord(scored(task, config, phase, shared, local, split)),
                                  SITE: ConfigRecord({SITE_NAME: name})})
        if "data-dir" in context.node_config:          # deployment: the hospital's console shows progress
            print(f"cmvim: site {name}: {phase} {'train' if training else 'evaluate'} round {round_} done in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
        return Message(content, reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a public reply, details stay here
        if isinstance(exc, EXPECTED_FAILURES):      # the site's data, policy or budget: a line names it
            log.error("site %s could not %s: %s", name, "train" if training else "evaluate", exc)
        else:                                       # a bug: the trace, in the site's own log
            log.error("site %s failed:\n%s", name, traceback.format_exc())
        return Message(RecordDict({SITE: ConfigRecord({SITE_NAME: name, SITE_ERROR: public_error(exc)}),
                                   METRICS: MetricRecord({NUM_EXAMPLES: 0})}), reply_to=msg)


def scored(task: SiteTask, config: ConfigRecord, phase: str, shared: dict, local: dict, split: str) -> dict:
    """An evaluation's reply metrics: aggregate numbers, the work's seconds, score histograms."""
    working = time.perf_counter()
    calibration = Calibration.from_dict(json.loads(str(config[CALIBRATION]))) if CALIBRATION in config else None
    result = task.evaluate(phase, shared, local, split, calibration, bool(config.get(CALIBRATE, 0)))
    metrics = flatten_metrics(result.metrics)
    if metrics.get(NUM_EXAMPLES, 0) > 0:     # a suppressed evaluation says nothing, not even its time
        metrics[WORK_SECONDS] = round(time.perf_counter() - working, 3)
    if result.histograms is not None:
        metrics[HIST_POS], metrics[HIST_NEG] = result.histograms
    return rounded(metrics, task.limits.release.digits)     # every number at the site's resolution


def carried_validation(task: SiteTask, policy, cfg: RunConfig, phase: str, shared: dict, local: dict, name: str,
                       round_: int) -> dict | str:
    """The previous round's validation, carried in this training message (evaluation.carry_validation):
    the received model scored on the validation split before it trains, under the same policy
    check and release count as a validation message of its own. Its metrics, or why it failed
    (public): a failed validation is reported and the training goes on."""
    try:
        policy.check(cfg, phase, False, "val")
        count_release(task.ledger_path.with_name("releases.json"), task.run_key, policy.max_evaluations)
        return scored(task, ConfigRecord(), phase, shared, local, "val")
    except Exception as exc:  # noqa: BLE001 - the validation's failure is its own; the training goes on
        log.error("site %s: the validation of %s round %d failed:\n%s", name, phase, round_, traceback.format_exc())
        return public_error(exc)


def personal_path(ledger: Path, run_key: str) -> Path:
    """Where a run's personalised weights live at the site: beside its privacy ledger (the node's
    state folder, or the site folder in simulation), named by a hash of the run's key."""
    return ledger.parent / "personal" / f"{hashlib.sha256(run_key.encode()).hexdigest()[:16]}.pt"


def save_personal(path: Path, state: dict) -> None:
    """The site's own weights (personalize: head/norm), on its disk, atomically, 0600: Flower's
    context lives in the SuperNode's memory and is lost when it restarts or the server resumes."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in state.items()}
    write_atomic(path, lambda handle: torch.save(state, handle))


def load_personal(path: Path) -> dict:
    """The weights save_personal wrote ({} when there are none); a file that cannot be read as
    tensors is reported and ignored (the run goes on with the global weights)."""
    if not path.exists():
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
            log.info("restored this site's personalised weights (%d tensors) from %s", len(state), path)
            return state
    except Exception as exc:  # noqa: BLE001 - a damaged file is one warning, not a failed round
        log.warning("personalised weights at %s unreadable (%s): starting from the global ones", path, exc)
        return {}
    log.warning("personalised weights at %s hold no tensors: starting from the global ones", path)
    return {}


EXPECTED_FAILURES = (DataError, SiteRefusal, PolicyRefusal, PrivacyBudgetExceeded, SiteTaskError, ConfigError)


def public_error(exc: Exception) -> str:
    """What may cross the network about a failure: its kind, never data from the site."""
    if isinstance(exc, DataError):
        return f"data problem at the site: {exc.public_message()}"
    if isinstance(exc, (SiteRefusal, PolicyRefusal)):
        return f"refused: {exc}"
    if isinstance(exc, PrivacyBudgetExceeded):
        return str(exc)                                  # privacy accounting numbers only
    if isinstance(exc, SiteTaskError):
        return str(exc)
    if isinstance(exc, ConfigError):
        return f"configuration problem: {exc}"          # names config keys, never site data
    if isinstance(exc, KeyError):
        return f"malformed message from the server: missing {exc}"
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "out of memory at the site"
    return f"{type(exc).__name__} at the site (details in the site's log)"


def central_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Central DP with client-side clipping: when the server's DP wrapper sends a clipping norm,
    Flower's `fixedclipping_mod` clips this site's update before it leaves. Replies without
    weights (a refusal, a failure) pass as they are, so the server still reads why."""
    config = msg.content.get(CONFIG) if CONFIG in msg.content else None
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error() or ARRAYS not in reply.content:
        return reply
    sent, trained = msg.content[ARRAYS], reply.content[ARRAYS]
    if all(np.array_equal(trained[k].numpy(), sent[k].numpy()) for k in sent.keys() if k in trained):
        return reply        # nothing to clip; Flower 1.42's clipping would divide by the zero norm (flower#7631)
    return fixedclipping_mod(msg, context, lambda _msg, _context: reply)


@app.train(mods=[central_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, training=True)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context, training=False)
