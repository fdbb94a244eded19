"""Instructions only the coordinator can give (issue #30, finding 1).

Flower 1.42's Fleet API authenticates who pushes a message but not what it pushes: a registered
site could push a message addressed to another site's node, and that site's SuperNode would hand
it to its ClientApp as if the coordinator had sent it. So the coordinator signs every message it
sends (Ed25519, `cryptography`), and a deployed site runs none that does not carry a valid
signature for it:

    cmvim-instruction-v1 | destination node | message type | content digest | expiry | nonce | reply key

The content digest is a SHA-256 over every record of the content in a canonical order (the
run config, phase, round, run key and the weights), the signature record left out. The site
checks, before anything else: a signature is there; it verifies under the
coordinator's public key (`cmvim-client --coordinator-key`, received out of band like ca.crt);
the destination is this node; it has not expired; its nonce was not seen before (a replay of an
instruction this site already ran, kept in its state folder until the instruction would have
expired anyway). Each refusal names which of these failed, and nothing is read or spent.

`signing_grid` wraps the ServerApp's Grid so every message sent through it (cmvim's own, the
strategies', Flower's SecAgg+ stages) is signed on its way out, with a fresh reply key the site
seals its answer to (cmvim.sealed), and every sealed answer is opened on its way in.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Error, Message, RecordDict

from .sealed import SealError, json_value, label_of, raw_public, unseal

SIGNATURE = "cmvim.signature"       # the record a signed message carries
VERSION = "cmvim-instruction-v1"
DEFAULT_TTL = 24 * 3600.0           # an instruction older than this is refused (a round timeout is far less)
CLOCK_SKEW = 300.0                  # seconds a site's clock may be behind the coordinator's


class InstructionRefused(Exception):
    """A message this site will not run; the message is public (it names the check, no data)."""


def write_keys(folder: Path) -> tuple[Path, Path]:
    """coordinator.key (secret, 0600) and coordinator.pub in `folder`; never overwrites."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    paths = folder / "coordinator.key", folder / "coordinator.pub"
    for path, data, mode in ((paths[0], private, 0o600), (paths[1], public, 0o644)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    return paths


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key (make one with cmvim-certs)")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except ValueError:
        raise ValueError(f"{path}: not a PEM public key (expected the coordinator.pub cmvim-certs made)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key (expected coordinator.pub from cmvim-certs)")
    return key


def _payload(dst_node_id: int, message_type: str, digest: str, expires: float, nonce: str, reply_key: str) -> bytes:
    return "|".join([VERSION, str(int(dst_node_id)), message_type, digest, repr(float(expires)), nonce,
                     reply_key]).encode()


def content_digest(content) -> str:
    """SHA-256 over a message's content in a canonical order (records by name, entries by key:
    each array's dtype, shape and bytes, each config or metric value as JSON), the signature
    record left out. Not Flower's object id: an id carried over the wire is kept as received,
    so it would not show a record removed or changed after the fact."""
    h = hashlib.sha256()
    for name in sorted(k for k in content.keys() if k != SIGNATURE):
        record = content[name]
        h.update(json.dumps(["record", name, type(record).__name__]).encode())
        for key in sorted(record.keys()):
            value = record[key]
            if hasattr(value, "numpy"):
                data = np.ascontiguousarray(value.numpy())
                h.update(json.dumps(["array", key, data.dtype.str, list(data.shape)]).encode())
                h.update(memoryview(data).cast("B"))
            else:
                h.update(json.dumps(["value", key, json_value(value)]).encode())
    return h.hexdigest()


def sign(message: Message, key: Ed25519PrivateKey, ttl: float = DEFAULT_TTL, now: float | None = None,
         reply_keys: dict | None = None) -> Message:
    """Sign `message` for its destination (in place; returned for chaining). With `reply_keys`, the
    instruction also carries a fresh X25519 public key the site seals its reply to
    (cmvim.sealed), its private half kept in `reply_keys` under the instruction's nonce."""
    expires = (time.time() if now is None else now) + ttl
    nonce = secrets.token_hex(16)
    reply_key = ""
    if reply_keys is not None:
        private = X25519PrivateKey.generate()
        reply_keys[nonce] = private
        reply_key = base64.b64encode(raw_public(private.public_key())).decode()
    # its own content: a strategy sends every site one RecordDict, and each site's signature differs
    message.content = RecordDict(dict(message.content.items()))
    meta = message.metadata
    signature = key.sign(_payload(meta.dst_node_id, meta.message_type, content_digest(message.content), expires,
                                  nonce, reply_key))
    message.content[SIGNATURE] = ConfigRecord({"signature": base64.b64encode(signature).decode(),
                                               "expires": float(expires), "nonce": nonce, "reply_key": reply_key})
    return message


class NonceLog:
    """The nonces of instructions this site ran, with their expiry, in its state folder (0600):
    a replayed instruction is refused; entries past their expiry are dropped."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def add(self, nonce: str, expires: float, now: float) -> None:
        from .privacy import locked, write_durably
        with locked(self.path):
            seen = json.loads(self.path.read_text()) if self.path.exists() else {}
            if nonce in seen:
                raise InstructionRefused("refused: this instruction was already run here (a replay)")
            seen = {n: t for n, t in seen.items() if t + CLOCK_SKEW >= now}
            seen[nonce] = expires
            write_durably(self.path, seen)


def verify(message: Message, node_id: int, key: Ed25519PublicKey, nonces: NonceLog | None,
           now: float | None = None) -> tuple[str, bytes | None]:
    """InstructionRefused unless `message` carries the coordinator's valid signature for this node,
    unexpired and not seen before (its nonce is then recorded). Returns the nonce and the key the
    reply is to be sealed to (None: the coordinator asked for none)."""
    now = time.time() if now is None else now
    if SIGNATURE not in message.content:
        raise InstructionRefused("refused: the instruction is not signed by the coordinator (another party sent it, "
                                 "or the coordinator runs without its signing key)")
    record = message.content[SIGNATURE]
    try:
        signature = base64.b64decode(str(record["signature"]))
        expires, nonce = float(record["expires"]), str(record["nonce"])
        reply_key = str(record.get("reply_key", ""))
        sealed_to = base64.b64decode(reply_key) if reply_key else None
        if sealed_to is not None and len(sealed_to) != 32:
            raise ValueError("reply key")
    except (KeyError, ValueError, TypeError):
        raise InstructionRefused("refused: the instruction's signature record is malformed") from None
    meta = message.metadata
    try:
        key.verify(signature, _payload(meta.dst_node_id, meta.message_type, content_digest(message.content), expires,
                                       nonce, reply_key))
    except InvalidSignature:
        raise InstructionRefused("refused: the instruction's signature does not verify under the coordinator's key "
                                 "(forged, altered on the way, or signed by another coordinator)") from None
    if int(meta.dst_node_id) != int(node_id):
        raise InstructionRefused("refused: the instruction was signed for another site's node")
    if expires + CLOCK_SKEW < now:
        raise InstructionRefused("refused: the instruction has expired")
    if nonces is not None:
        nonces.add(nonce, expires, now)
    return nonce, sealed_to


def signing_grid(grid, key: Ed25519PrivateKey, ttl: float = DEFAULT_TTL):
    """`grid` (the ServerApp's) with every message it pushes signed with the coordinator's key and
    carrying a one-instruction reply key, and every sealed reply it pulls opened: push_messages and
    pull_messages are wrapped on the instance, and Flower's send_and_receive goes through both. A
    reply that does not open is turned into an error reply naming that (the run goes on)."""
    push, pull = grid.push_messages, grid.pull_messages
    reply_keys: dict = {}

    def push_signed(messages):
        return push([sign(m, key, ttl, reply_keys=reply_keys) for m in messages])

    def pull_opened(*args, **kwargs):
        replies = list(pull(*args, **kwargs))
        for reply in replies:
            if reply.has_error() or not reply.has_content():
                continue
            try:
                label = label_of(reply.content)
                if label is None:
                    continue                     # a site that sends in clear (its own choice)
                private = reply_keys.pop(label, None)
                if private is None:
                    raise SealError("a sealed reply names no instruction this coordinator sent")
                reply.content = unseal(reply.content, private)
            except (SealError, ValueError, KeyError) as err:
                reply.__dict__["_content"] = None
                reply.__dict__["_error"] = Error(code=0, reason=str(err))
        return replies

    grid.push_messages, grid.pull_messages = push_signed, pull_opened
    return grid
