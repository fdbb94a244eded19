"""Free-text reports: read from a site folder, and tokenised byte-level for the report encoder
(no vocabulary file to download; every language and typo tokenises). The text never goes
into a log line or an error message."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .errors import DataError

MAX_REPORT_BYTES = 1_000_000


def read_report(path: str | Path) -> str:
    """UTF-8 text (latin-1 tolerated), whitespace normalised to single spaces."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            raise DataError(f"report larger than {MAX_REPORT_BYTES} bytes", file=path, kind="report too large")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", file=path, kind="missing file") from None
    except IsADirectoryError:
        raise DataError("expected a text file, found a folder", file=path, kind="unreadable file") from None
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror or type(exc).__name__})", file=path,
                        kind="unreadable file") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")     # every byte string decodes; old RIS exports are often latin-1
    if "\x00" in text:
        raise DataError("contains NUL bytes: not a text file", file=path, kind="not text")
    text = " ".join(text.split())
    if not text:
        raise DataError("report is empty", file=path, kind="empty report")
    return text


PAD = 0            # token 0 pads; byte value v is token v + 1
VOCAB_SIZE = 257


def tokenize_reports(texts: Sequence[str | None], max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes -> (ids (b, max_len) long, present (b,) bool). None or "" means no report.

    max_len is the longest report in the batch, capped at max_bytes (and at least 1).
    """
    encoded = [(t or "").encode("utf-8")[:max_bytes] for t in texts]
    length = max([1] + [len(e) for e in encoded])
    ids = torch.full((len(encoded), length), PAD, dtype=torch.long)
    for row, data in enumerate(encoded):
        if data:
            ids[row, :len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + 1
    present = torch.tensor([len(e) > 0 for e in encoded], dtype=torch.bool)
    return ids, present
