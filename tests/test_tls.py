"""`pulid-flux make-cert`: files, SANs, permissions, and a real TLS handshake."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import ssl
import stat
import threading
import time

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pulid_flux import tls


def _san(cert_path):
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return cert, set(san.get_values_for_type(x509.DNSName)), set(san.get_values_for_type(x509.IPAddress))


def test_make_certificates_files_sans_and_permissions(tmp_path):
    paths = tls.make_certificates(tmp_path / "certs", ["api.example.test", "10.1.2.3", "[fd00::5]"], 30)
    assert {k: p.name for k, p in paths.items()} == {
        "ca": "ca.pem",
        "ca_key": "ca-key.pem",
        "cert": "cert.pem",
        "key": "key.pem",
    }
    assert stat.S_IMODE(paths["key"].stat().st_mode) == 0o600
    assert stat.S_IMODE(paths["ca_key"].stat().st_mode) == 0o600
    cert, dns, ips = _san(paths["cert"])
    assert dns == {"localhost", "api.example.test"}
    assert ips == {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3", "fd00::5")}
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 * 86400 <= lifetime.total_seconds() <= 30 * 86400 + 2 * tls.CLOCK_SKEW_S
    key = serialization.load_pem_private_key(paths["key"].read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_ca_is_reused_unless_asked_for_a_new_one(tmp_path):
    first = tls.make_certificates(tmp_path, [], 5)
    ca_before = first["ca"].read_bytes()
    cert_before = first["cert"].read_bytes()
    second = tls.make_certificates(tmp_path, ["extra.test"], 5)
    assert second["ca"].read_bytes() == ca_before  # clients keep trusting it
    assert second["cert"].read_bytes() != cert_before
    assert "extra.test" in _san(second["cert"])[1]
    third = tls.make_certificates(tmp_path, [], 5, new_ca=True)
    assert third["ca"].read_bytes() != ca_before


@pytest.mark.parametrize("bad", ["not a host!", "a..b", "-x.test"])
def test_invalid_host_is_rejected(tmp_path, bad):
    with pytest.raises(ValueError):
        tls.make_certificates(tmp_path, [bad], 5)


def test_cli_prints_paths_and_client_settings(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    tls.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "c"), "--host", "gpu.lan", "--days", "10", "--port", "9443"])
    assert tls.run(args) == 0
    out = capsys.readouterr().out
    ca = (tmp_path / "c" / "ca.pem").resolve()
    assert f"export SSL_CERT_FILE={ca}" in out
    assert "export FAL_QUEUE_RUN_HOST=127.0.0.1:9443" in out
    assert "export FAL_RUN_HOST=127.0.0.1:9443/run" in out
    assert f"export NODE_EXTRA_CA_CERTS={ca}" in out
    assert str((tmp_path / "c" / "cert.pem").resolve()) in out and str((tmp_path / "c" / "key.pem").resolve()) in out
    assert "gpu.lan" in _san(tmp_path / "c" / "cert.pem")[1]
    bad = parser.parse_args(["--out", str(tmp_path / "d"), "--host", "bad host"])
    assert tls.run(bad) == 2


def test_cli_dispatcher_wires_make_cert(tmp_path):
    import importlib

    from pulid_flux import cli

    module = importlib.import_module(cli.COMMANDS["make-cert"][0])
    assert module is tls
    sub = argparse.ArgumentParser()
    module.add_arguments(sub)
    args = sub.parse_args(["--out", str(tmp_path)])
    assert args.out == str(tmp_path) and args.days == tls.DEFAULT_DAYS and args.host == []
    assert module.run(args) == 0 and (tmp_path / "cert.pem").exists()


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello over tls"})


class TLSServer:
    def __init__(self, paths, host: str):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.bind((host, 0))
        self.port = sock.getsockname()[1]
        self.sock = sock
        config = uvicorn.Config(
            _app, ssl_certfile=str(paths["cert"]), ssl_keyfile=str(paths["key"]), log_level="error", lifespan="off"
        )
        self.server = uvicorn.Server(config)

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("host,url_host", [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]"), ("127.0.0.1", "localhost")])
def test_httpx_with_the_ca_verifies_uvicorn(tmp_path, host, url_host):
    paths = tls.make_certificates(tmp_path, [], 2)
    with TLSServer(paths, host) as srv:
        url = f"https://{url_host}:{srv.port}/"
        trusting = ssl.create_default_context(cafile=str(paths["ca"]))
        with httpx.Client(verify=trusting) as client:
            response = client.get(url)
        assert response.status_code == 200 and response.text == "hello over tls"
        # A client that does not trust the local CA must refuse the server.
        with httpx.Client(verify=ssl.create_default_context()) as client:
            with pytest.raises(httpx.ConnectError):
                client.get(url)


def test_server_cert_does_not_cover_unlisted_names(tmp_path):
    paths = tls.make_certificates(tmp_path, [], 2)
    ctx = ssl.create_default_context(cafile=str(paths["ca"]))
    with TLSServer(paths, "127.0.0.1") as srv:
        raw = socket.create_connection(("127.0.0.1", srv.port))
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="not-listed.test")
        raw.close()
