"""What leaves a site: every reply the ClientApp sends during a run (pretrain, finetune with
DP-SGD, validation, final evaluation, and failures: a corrupt scan, a policy refusal) and every
log line it writes, searched for subject ids, DICOM header values and report text."""
from __future__ import annotations

import json
import logging
import shutil
import time

import pydicom
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from cmvim.client import app as client_app
from cmvim.run_config import run_config
from cmvim.protocol import ARRAYS, CONFIG, PHASE, ROUND, RUN_CONFIG, RUN_KEY, SPLIT
from cmvim.weights import initial_state
from cmvim.simulations.cohort import CohortConfig, cached_cohort


def incoming(content: RecordDict, kind: str) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=1, dst_node_id=7,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0, message_type=kind)
    return Message(content=content, metadata=metadata)


def request(cfg, phase: str, arrays: dict, split: str | None = None) -> RecordDict:
    config = ConfigRecord({RUN_CONFIG: cfg.to_json(), PHASE: phase, ROUND: 0, "server-round": 1, RUN_KEY: "audit"})
    if split:
        config[SPLIT] = split
    return RecordDict({ARRAYS: ArrayRecord(arrays), CONFIG: config})


def outgoing_text(reply: Message) -> str:
    """Everything a reply carries, as text: record names, metric names and values, config values
    (array contents are numbers of the model; their names are included)."""
    parts = []
    for name, record in reply.content.items():
        parts.append(name)
        if isinstance(record, ArrayRecord):
            parts.extend(record.keys())
        else:
            parts.extend(f"{k}={v}" for k, v in record.items())
    return "\n".join(parts)


@pytest.fixture(scope="module")
def dicom_site(tmp_path_factory):
    root = cached_cohort(CohortConfig(sites=2, subjects=14, shape=32, seed=7, effect_scale=3.0, pet_missing=0.2),
                         root=tmp_path_factory.mktemp("audit-cohort"))
    return root / "B"                             # site B is written as DICOM series, with reports


def identifiers(site) -> list[str]:
    """Subject ids, report sentences and DICOM header values of this site."""
    rows = (site / "manifest.csv").read_text().splitlines()[1:]
    found = [row.split(",")[0] for row in rows]
    for report in site.rglob("report*.txt"):
        found += [s.strip() for s in report.read_text().split(".") if len(s.strip()) > 15]
    headers = set()
    for dcm in list(site.rglob("*.dcm"))[:20]:
        ds = pydicom.dcmread(dcm, stop_before_pixels=True)
        for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                        "StudyDate", "AccessionNumber", "InstitutionName", "PatientBirthDate"):
            value = str(getattr(ds, keyword, "") or "")
            if len(value) >= 6:
                headers.add(value)
    assert headers, "the DICOM site should carry header values to look for"
    return found + sorted(headers)


def test_nothing_identifying_leaves_the_site(dicom_site, tmp_path, caplog, capsys):
    site = tmp_path / "B"
    shutil.copytree(dicom_site, site)
    secrets = identifiers(site)
    assert len(secrets) > 14 and any(len(s) > 30 for s in secrets)        # ids, report text, headers
    # one subject's MRI is corrupt (a broken PET would only cost the visit its PET): its DataError
    # must not carry the id out
    victim = next(p for p in sorted(site.rglob("*.dcm")) if "pet" not in p.parent.name)
    victim.write_bytes(b"not a dicom file")

    cfg = run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25},
                      "split_fractions": [0.6, 0.2, 0.2], "modality_dropout": 0.0,
                      "pretrain": {"rounds": 1, "batch_size": 4}, "finetune": {"rounds": 1, "batch_size": 4},
                      "privacy": {"enabled": True, "noise_multiplier": 1.0}})
    policy = tmp_path / "policy.yaml"
    policy.write_text("max_local_epochs: 5\n")
    context = Context(run_id=1, node_id=7, node_config={"site": "B", "data-dir": str(site), "policy": str(policy),
                                                        "state-dir": str(tmp_path / "state")},
                      state=RecordDict(), run_config={})
    caplog.set_level(logging.DEBUG)
    pre, fine = initial_state(cfg, "pretrain"), initial_state(cfg, "finetune")
    replies = [
        client_app.train(incoming(request(cfg, "pretrain", pre), MessageType.TRAIN), context),
        client_app.evaluate(incoming(request(cfg, "pretrain", pre, "val"), MessageType.EVALUATE), context),
        client_app.train(incoming(request(cfg, "finetune", fine), MessageType.TRAIN), context),
        client_app.evaluate(incoming(request(cfg, "finetune", fine, "test"), MessageType.EVALUATE), context),
    ]
    data = json.loads(cfg.to_json())
    data["finetune"]["local_epochs"] = 9                     # outside the site policy
    greedy = run_config(data)
    replies.append(client_app.train(incoming(request(greedy, "finetune", fine), MessageType.TRAIN), context))

    errors = [r.content["site"].get("error") for r in replies if "error" in r.content["site"]]
    assert errors == ["refused: site policy allows at most 5 local epochs; the run asks for 9 "
                      "(finetune.local_epochs)"], errors
    train = replies[0].content["metrics"]
    assert train["epsilon"] > 0 and train["num-examples"] > 0
    assert set(train) == {"num-examples", "epsilon", "delta", "noise_multiplier", "epsilon_site_total"}  # no loss
    # the test split holds fewer than the policy's min_cell_count (default 10) subjects of a class:
    # the final evaluation releases nothing about it, not even its size
    assert dict(replies[3].content["metrics"].items()) == {"num-examples": 0, "suppressed": 1}
    assert (tmp_path / "state" / "ledger.json").exists()     # the ledger lives in the node's state folder
    assert json.loads((tmp_path / "state" / "releases.json").read_text())["runs"] == {"audit": 2}

    text = "\n".join(outgoing_text(r) for r in replies)
    logs = "\n".join(record.getMessage() for record in caplog.records)
    printed = capsys.readouterr()
    everything = "\n".join([text, logs, printed.out, printed.err])
    assert "skipped: manifest row" in logs                   # the corrupt subject is reported by its row
    leaked = [s for s in secrets if s in everything]
    assert not leaked, f"identifying values left the site: {leaked[:5]}"
