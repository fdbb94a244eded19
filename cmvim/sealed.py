"""Replies only the coordinator can read (issue #30, finding 2).

Flower 1.42's `pull_object` gives any registered node any object of a running run whose id it
knows (the id is the SHA-256 of the content), so a site that learns the id of another site's
reply reads its weights and metrics. So every signed instruction carries a fresh X25519 public
key of the coordinator's (inside the signature: nobody can swap it), and the site seals its
whole reply to it: X25519 -> HKDF-SHA256 -> AES-256-GCM (`cryptography`). What Flower stores and
serves for the reply is then a nonce, the site's ephemeral public key and ciphertext; only the
coordinator's ServerApp, which holds the private half in memory for that one instruction, opens
it. The plaintext is a RecordDict written as a JSON header and raw array bytes (never pickle:
a site must not be able to make the coordinator run code).
"""
from __future__ import annotations

import base64
import json
import os
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

SEALED = "cmvim.sealed"            # the one record a sealed reply carries (its ciphertext: an ArrayRecord)
INFO = b"cmvim-reply-v1"


class SealError(Exception):
    """A sealed reply that cannot be opened (tampered, or sealed to another key)."""


def raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key(shared: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=INFO).derive(shared)


# -- a RecordDict as bytes (no pickle) -----------------------------------------------------------
def json_value(value):
    """A config or metric value as JSON can hold it (bytes as base64)."""
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [json_value(v) for v in value]
    return value


def _unplain(value):
    if isinstance(value, dict) and set(value) == {"__bytes__"}:
        return base64.b64decode(value["__bytes__"])
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    return value


def to_bytes(content: RecordDict) -> bytes:
    header, blobs, offset = [], [], 0
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays = []
            for key, array in record.items():
                data = np.ascontiguousarray(array.numpy())
                arrays.append({"key": key, "dtype": data.dtype.str, "shape": list(data.shape), "offset": offset,
                               "size": data.nbytes})
                blobs.append(data.tobytes())
                offset += data.nbytes
            header.append({"name": name, "kind": "arrays", "arrays": arrays})
        else:
            kind = "metrics" if isinstance(record, MetricRecord) else "config"
            header.append({"name": name, "kind": kind, "items": {k: json_value(v) for k, v in record.items()}})
    head = json.dumps(header).encode()
    return struct.pack(">Q", len(head)) + head + b"".join(blobs)


def from_bytes(data: bytes) -> RecordDict:
    (size,) = struct.unpack(">Q", data[:8])
    header, body = json.loads(data[8:8 + size]), memoryview(data)[8 + size:]
    content = RecordDict()
    for entry in header:
        if entry["kind"] == "arrays":
            arrays = {}
            for a in entry["arrays"]:
                chunk = body[a["offset"]:a["offset"] + a["size"]]
                arrays[a["key"]] = Array(np.frombuffer(chunk, dtype=np.dtype(a["dtype"])).reshape(a["shape"]).copy())
            content[entry["name"]] = ArrayRecord(arrays)
        else:
            items = {k: _unplain(v) for k, v in entry["items"].items()}
            content[entry["name"]] = (MetricRecord if entry["kind"] == "metrics" else ConfigRecord)(items)
    return content


# -- sealing ------------------------------------------------------------------------------------
def seal(content: RecordDict, coordinator_key: bytes, label: str) -> RecordDict:
    """`content` sealed to the coordinator's one-instruction public key (raw X25519 bytes); `label`
    (the instruction's nonce) travels in clear so the coordinator knows which key opens it."""
    mine = X25519PrivateKey.generate()
    salt = os.urandom(16)
    aes = AESGCM(_key(mine.exchange(X25519PublicKey.from_public_bytes(coordinator_key)), salt))
    iv = os.urandom(12)
    header = label.encode() + b"|" + raw_public(mine.public_key()) + salt + iv
    ciphertext = aes.encrypt(iv, to_bytes(content), header)
    blob = np.frombuffer(struct.pack(">H", len(header)) + header + ciphertext, dtype=np.uint8).copy()
    return RecordDict({SEALED: ArrayRecord({"blob": Array(blob)})})


def label_of(content: RecordDict) -> str | None:
    """The instruction nonce a sealed reply names; None if the reply is not sealed."""
    if SEALED not in content:
        return None
    data = content[SEALED]["blob"].numpy().tobytes()
    (size,) = struct.unpack(">H", data[:2])
    return data[2:2 + size].split(b"|", 1)[0].decode()


def unseal(content: RecordDict, key: X25519PrivateKey) -> RecordDict:
    """The reply `seal` sealed, opened with the coordinator's private half; SealError if it was
    altered or sealed to another key."""
    data = content[SEALED]["blob"].numpy().tobytes()
    (size,) = struct.unpack(">H", data[:2])
    header, ciphertext = data[2:2 + size], data[2 + size:]
    label_end = header.index(b"|") + 1
    theirs, salt, iv = header[label_end:label_end + 32], header[label_end + 32:label_end + 48], header[label_end + 48:]
    aes = AESGCM(_key(key.exchange(X25519PublicKey.from_public_bytes(theirs)), salt))
    try:
        return from_bytes(aes.decrypt(iv, ciphertext, header))
    except InvalidTag:
        raise SealError("a sealed reply did not open: altered on the way, or sealed to another key") from None
