"""``pulid-flux make-cert``: a local CA and a server certificate for HTTPS on loopback.

The unmodified Python fal-client only speaks HTTPS (docs/fal-protocol.md §11.1),
so a self-hosted server needs a certificate the client trusts. This writes:

* ``ca.pem`` / ``ca-key.pem``: a local certificate authority (kept and reused on
  later runs, so clients that already trust it keep working);
* ``cert.pem`` / ``key.pem``: a server certificate signed by that CA, with SANs
  ``IP:127.0.0.1``, ``IP:::1``, ``DNS:localhost`` and every ``--host`` given.

Private keys are written with mode 0600. ``cryptography`` is imported lazily so
that ``pulid-flux --help`` stays fast.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import tempfile
from pathlib import Path

DEFAULT_OUT = "./certs"  # where the files go unless --out is given
DEFAULT_DAYS = 825  # server certificate lifetime (the longest Apple clients accept)
CA_DAYS = 3650  # the local CA lives longer so re-issuing server certs needs no re-trust
DEFAULT_PORT = 8443  # only used to print the client settings
CLOCK_SKEW_S = 300  # certificates start this long in the past to tolerate clock skew
BASE_HOSTS = ["127.0.0.1", "::1", "localhost"]  # SANs always present

_DNS_RE = re.compile(r"^(\*\.)?([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="extra DNS name or IP for the certificate (repeatable); 127.0.0.1, ::1 and localhost are always in",
    )
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help=f"server certificate lifetime (default {DEFAULT_DAYS})"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="HTTPS port, only for the printed client settings"
    )
    parser.add_argument("--new-ca", action="store_true", help="replace an existing CA in --out instead of reusing it")


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically to ``path`` with mode 0600 from the first byte."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_public(path: Path, data: bytes) -> None:
    _write_private(path, data)
    os.chmod(path, 0o644)


def _san_entries(hosts: list[str]):
    from cryptography import x509

    entries = []
    seen: set[str] = set()
    for raw in BASE_HOSTS + list(hosts):
        name = raw.strip().strip("[]").lower()
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not _DNS_RE.match(name.rstrip(".")) or len(name) > 253:
                raise ValueError(f"not a DNS name or IP address: {raw!r}") from None
            entries.append(x509.DNSName(name.rstrip(".")))
    return entries


def _load_ca(ca_path: Path, ca_key_path: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ValueError(f"{ca_key_path} does not match {ca_path}")
    return cert, key


def make_certificates(out_dir: Path, hosts: list[str], days: int, *, new_ca: bool = False) -> dict[str, Path]:
    """Create (or reuse) the CA and issue a server certificate; returns the paths by role:
    ``ca``, ``ca_key``, ``cert``, ``key``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise ValueError("--days must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "ca": out_dir / "ca.pem",
        "ca_key": out_dir / "ca-key.pem",
        "cert": out_dir / "cert.pem",
        "key": out_dir / "key.pem",
    }
    san = x509.SubjectAlternativeName(_san_entries(hosts))
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(seconds=CLOCK_SKEW_S)
    pem = serialization.Encoding.PEM

    if not new_ca and paths["ca"].exists() and paths["ca_key"].exists():
        ca_cert, ca_key = _load_ca(paths["ca"], paths["ca_key"])
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pulid-flux local CA"),
                # A unique name: two CAs made on different machines never collide.
                x509.NameAttribute(NameOID.COMMON_NAME, f"pulid-flux local CA {os.urandom(4).hex()}"),
            ]
        )
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(now + datetime.timedelta(days=max(CA_DAYS, days)))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ca_ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(
            paths["ca_key"],
            ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        )
        _write_public(paths["ca"], ca_cert.public_bytes(pem))

    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pulid-flux server")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_private(paths["key"], key_pem)
    _write_public(paths["cert"], cert.public_bytes(pem))
    return paths


def client_settings(paths: dict[str, Path], port: int, host: str = "127.0.0.1") -> list[str]:
    """The shell lines a fal-client user needs to reach the server over HTTPS."""
    ca = paths["ca"].resolve()
    return [
        "# Python fal-client (set before importing fal_client):",
        f"export SSL_CERT_FILE={ca}",
        f"export FAL_QUEUE_RUN_HOST={host}:{port}",
        f"export FAL_RUN_HOST={host}:{port}/run",
        "# SSL_CERT_FILE replaces the public CA list; if the same process needs public HTTPS too,",
        "# point it at a bundle of certifi's cacert.pem plus this ca.pem.",
        "# Node @fal-ai/client:",
        f"export NODE_EXTRA_CA_CERTS={ca}",
    ]


def run(args: argparse.Namespace) -> int:
    try:
        paths = make_certificates(Path(args.out), list(args.host), int(args.days), new_ca=bool(args.new_ca))
    except (ValueError, OSError) as exc:
        print(f"make-cert: {exc}")
        return 2
    print(f"CA certificate:     {paths['ca'].resolve()}  (trust this one)")
    print(f"CA private key:     {paths['ca_key'].resolve()}  (keep private; reused on the next run)")
    print(f"server certificate: {paths['cert'].resolve()}")
    print(f"server private key: {paths['key'].resolve()}")
    print()
    for line in client_settings(paths, int(args.port)):
        print(line)
    return 0
