"""The wire protocol between the coordinator and the sites: every record and key a message
carries, in one place. `server/` and `client/` both import this module and never each other.
No Flower or torch imports: these are names and the shape of what a site sends.

A training or evaluation message from the server carries

    ARRAYS   ArrayRecord   the shared parameters (the phase's, cmvim.sharing.shared_parameter_names)
    CONFIG   ConfigRecord  PHASE, ROUND, SPLIT, RUN_CONFIG (the run config as JSON), RUN_KEY,
                           SERVER_ROUND (Flower's round counter), PROXIMAL_MU (FedProx only),
                           SECAGG_NAMES (SecAgg+ rounds: the parameter names, in order),
                           CALIBRATE / CALIBRATION (evaluation: fit the threshold / report at it)

and a site's reply carries

    ARRAYS   ArrayRecord   the updated shared parameters (training only)
    METRICS  MetricRecord  NUM_EXAMPLES and aggregate numbers only (loss, acc, auc, ...);
                           evaluation adds HIST_POS / HIST_NEG (score histograms, never scores),
                           the calibration pass LOGIT_POS / LOGIT_NEG (logit histograms)
    SITE     ConfigRecord  SITE_NAME, and SITE_ERROR: a public message when the site failed
"""
from __future__ import annotations

# records in a message's content
ARRAYS = "arrays"                  # ArrayRecord: the shared parameters
CONFIG = "config"                  # ConfigRecord: what the server asks for
METRICS = "metrics"                # MetricRecord: aggregate numbers only
SITE = "site"                      # ConfigRecord: who replied, and a public error message if it failed

# keys in CONFIG
RUN_CONFIG = "run-config"          # the RunConfig as JSON
RUN_KEY = "run-key"                # a stable name for the run (same after --resume): the sites' privacy ledgers use it
PHASE = "phase"                    # a cmvim.names.Phase: pretrain | finetune (final evaluation: finetune, SPLIT test)
ROUND = "round"                    # the rounds of the phase done before this strategy started (resume-safe)
SPLIT = "split"                    # the split an evaluation scores
SERVER_ROUND = "server-round"      # Flower's round counter: absolute round = SERVER_ROUND + ROUND
PROXIMAL_MU = "proximal-mu"        # FedProx's proximal term, when the strategy sends one
SECAGG_NAMES = "secagg-array-names"    # SecAgg+ rounds: the parameter names, in order (legacy records drop them)
SECAGG_MASKED = "cmvim-secagg-masked"  # set by the site's SecAgg+ mod only: the reply will be masked
SECAGG_SITE = "site"               # SecAgg+ rounds: the site's name, in the legacy fit reply's metrics
CALIBRATE = "calibrate"            # evaluation: 1 = also send LOGIT_POS / LOGIT_NEG (the calibration pass on val)
VALIDATE = "validate-first"        # training: 1 = first score the received model on the validation split (the
                                   # previous round's validation, carried in this round's message: one exchange)
CALIBRATION = "calibration"        # evaluation: the decision threshold and calibration to report at (JSON of
                                   # cmvim.calibration.Calibration); absent = threshold 0.5 on the model's scores

VAL_METRICS = "val-metrics"        # MetricRecord in a training reply to VALIDATE: the validation's metrics

# keys in METRICS
NUM_EXAMPLES = "num-examples"      # the subjects a round trained on or an evaluation scored
HIST_POS = "hist_pos"              # evaluation: histogram of the positive class's scores
HIST_NEG = "hist_neg"              # evaluation: histogram of the negative class's scores
LOGIT_POS = "logit_pos"            # calibration pass: histogram of the positive class's logits (fixed edges)
LOGIT_NEG = "logit_neg"            # calibration pass: histogram of the negative class's logits
WORK_SECONDS = "work-seconds"      # a reply's site work: seconds in training or evaluation (not process start,
                                   # imports, data loading or waiting): the round's overhead is the rest
WEIGHT = "aggregation-weight"      # set by the server's strategy only: the weight FedAvg gives a reply
SUPPRESSED = "suppressed"          # evaluation: 1 when the split is too small to release anything about it

# keys in SITE
SITE_NAME = "name"
SITE_ERROR = "error"
VAL_ERROR = "val-error"            # a training reply to VALIDATE: why the validation failed (public; training went on)
