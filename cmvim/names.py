"""The names that several parts of cmvim check values against, each written once: a run's
phases, the data contract's labels and splits, the normalisers and the compute precisions.

Imports nothing of cmvim and no torch, so the run config (torch-free), the data pipeline, the
wire protocol's readers and the site policy all take them from here instead of keeping copies
in step by hand. Where a config field is typed with one of the Literals below, the tuple of
its values is derived from that Literal, so the two cannot drift apart.
"""
from __future__ import annotations

from typing import Literal, get_args

# a training phase: the value of cmvim.protocol.PHASE in a message, what a model is built and
# trained for (cmvim.weights.build_model), what travels (cmvim.sharing); in the order a run goes
Phase = Literal["pretrain", "finetune"]
PHASES: tuple[Phase, ...] = get_args(Phase)

# a run's phases as its checkpoints and a site policy name them: the training phases, then the
# final evaluation on every site's test split
RunPhase = Literal[Phase, "evaluate"]
RUN_PHASES: tuple[RunPhase, ...] = get_args(RunPhase)

# the site data contract (manifest.csv, a BIDS dataset's labels): diagnoses and splits
LABELS = ("CN", "MCI", "AD")
SPLITS = ("train", "val", "test")

# preprocess.normalize's methods; cmvim.data.preprocess.NORMALIZERS implements each
NORMALIZER_NAMES = ("percentile", "zscore", "suvr", "none")

# a site's compute precision (the run config's `precision`; cmvim.device.Precision resolves it)
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[PrecisionName, ...] = get_args(PrecisionName)
