"""Create the keys a cmvim federation's coordinator needs: a CA, the SuperLink's TLS certificate,
the instruction-signing key; and, as a shortcut for tests and one-host setups only, site key pairs.

    cmvim-certs --out certs --server-name fl.example.org

writes

    certs/ca.crt, certs/ca.key            the federation's CA (keep ca.key offline: it signs)
    certs/server.crt, certs/server.key    the SuperLink's TLS certificate (SANs: the names given,
                                          localhost, 127.0.0.1) and its key (secret, coordinator)
    certs/sites/<site>.key, <site>.pub    with --sites only: a site's SuperNode key pair (tests, compose)
    certs/coordinator.key                 the coordinator's instruction-signing key (Ed25519, secret,
                                          coordinator: cmvim-server signs every message with it)
    certs/coordinator.pub                 its public key: every site receives it with ca.crt
                                          (`cmvim-client --coordinator-key`) and runs only what it signed

Hospitals receive ca.crt (to verify the server) and coordinator.pub (to verify every
instruction). Each hospital makes its own SuperNode key pair with `cmvim-client keygen --site A
--out keys` and sends only keys/sites/A.pub: in a deployment the coordinator never makes or holds
a site's private key (`--sites`, `--keys-only` make them in one place: tests and the one-host
compose file). Keys: EC P-384 (what Flower's SuperNode authentication accepts), OpenSSH format.
Existing files are never overwritten; run with a new --out to rotate.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cmvim.cli_util import add_version
from cmvim.instructions import write_keys


def _write(path: Path, data: bytes, secret: bool) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists: refusing to overwrite a key or certificate (use a new --out)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cmvim federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(out: Path, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("cmvim federation CA")).issuer_name(_name("cmvim federation CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write(out / "ca.key", _pem_key(key), secret=True)
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return key, cert


def make_server_cert(out: Path, ca_key, ca_cert: x509.Certificate, names: list[str], days: int) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for name in dict.fromkeys([*names, "localhost", "127.0.0.1"]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(names[0] if names else "localhost"))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(out / "server.key", _pem_key(key), secret=True)
    _write(out / "server.crt", cert.public_bytes(serialization.Encoding.PEM), secret=False)


def make_site_keys(out: Path, site: str) -> None:
    if not site or not all(c.isalnum() or c in "-_" for c in site):
        raise ValueError(f"site name {site!r}: use letters, digits, '-' and '_' only")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / "sites" / f"{site}.key", private, secret=True)
    _write(out / "sites" / f"{site}.pub", public + f" cmvim-site-{site}\n".encode(), secret=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cmvim-certs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the keys and certificates")
    parser.add_argument("--server-name", nargs="*", default=[],
                        help="DNS names / IPs the SuperLink is reached at (localhost and 127.0.0.1 are always added)")
    parser.add_argument("--sites", nargs="*", default=[], help="one SuperNode key pair per site name, made HERE: for "
                        "tests on one machine; hospitals make theirs with `cmvim-client keygen` and send the .pub")
    parser.add_argument("--keys-only", action="store_true", help="only the --sites key pairs, no CA or certificates (tests; a hospital uses cmvim-client keygen)")
    parser.add_argument("--days", type=int, default=825, help="certificate validity (default 825 days)")
    add_version(parser)
    args = parser.parse_args(argv)
    try:
        if not args.keys_only:
            ca_key, ca_cert = make_ca(args.out, args.days)
            make_server_cert(args.out, ca_key, ca_cert, args.server_name, args.days)
            write_keys(args.out)                  # coordinator.key / coordinator.pub (cmvim.instructions)
        for site in args.sites:
            make_site_keys(args.out, site)
    except (FileExistsError, ValueError) as err:
        print(f"cmvim-certs: {err}", file=sys.stderr)
        return 1
    written = sorted(str(p.relative_to(args.out)) for p in args.out.rglob("*") if p.is_file())
    print(f"wrote to {args.out}: {', '.join(written)}")
    print("secret: ca.key (keep offline), server.key and coordinator.key (coordinator), sites/<site>.key (each "
          "hospital its own); every site gets ca.crt and coordinator.pub")
    return 0


if __name__ == "__main__":
    sys.exit(main())
