"""Shared fixtures."""

from __future__ import annotations

# Before anything loads torch: parity with the reference fixtures needs MKL's math path pinned
# (see pulid_flux/engine/parity.py); test subprocesses inherit it.
from pulid_flux.engine.parity import pin_cpu_math_paths

assert pin_cpu_math_paths(), "torch was imported before tests/conftest.py could pin MKL's math path"

# --- service fixtures (API, queue, workers, live `pulid-flux serve`) ---------------------------

import base64 as _base64
import io as _io
import os as _os
import signal as _signal
import subprocess as _subprocess
import sys as _sys
import time as _time
from pathlib import Path as _Path

import pytest as _pytest
from loopback import free_port

# Where tests write what they make for people to look at (git-ignored).
ARTIFACTS = _Path(__file__).resolve().parent / "artifacts"

# The slow tier: tests that start `pulid-flux serve` processes (and with them browsers, JS clients,
# clusters). `scripts/test -m "not e2e"` runs the rest in a fraction of the time, for development.
E2E_FIXTURES = {"live_server", "make_server", "cluster"}


def pytest_addoption(parser):
    parser.addoption("--screenshots-dir", default=str(ARTIFACTS / "screenshots"),
                     help="where the playground test saves its screenshots "
                          "(docs/screenshots refreshes the README's; default: tests/artifacts/screenshots)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(_pytest.mark.e2e)


@_pytest.fixture(scope="session")
def screenshots_dir(pytestconfig) -> _Path:
    return _Path(pytestconfig.getoption("screenshots_dir")).resolve()


@_pytest.fixture(scope="session", autouse=True)
def _testclient_host():
    """Starlette's TestClient sends `Host: testserver`; the keyless server's DNS-rebinding guard
    accepts it only as a configured name (tests of the guard set allowed_hosts themselves)."""
    with _pytest.MonkeyPatch.context() as mp:
        mp.setenv("PULID_FLUX_ALLOWED_HOSTS", "testserver")
        yield


def _png_bytes(array) -> bytes:
    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@_pytest.fixture(scope="session")
def astronaut_png() -> bytes:
    """A real photo with one face (scikit-image)."""
    from skimage import data

    return _png_bytes(data.astronaut())


@_pytest.fixture(scope="session")
def astronaut_uri(astronaut_png) -> str:
    return "data:image/png;base64," + _base64.b64encode(astronaut_png).decode()


@_pytest.fixture(scope="session")
def coffee_uri() -> str:
    """A real photo without any face."""
    from skimage import data

    return "data:image/png;base64," + _base64.b64encode(_png_bytes(data.coffee())).decode()


class LiveServer:
    """One `pulid-flux serve` subprocess on a loopback port."""

    def __init__(self, data_dir: _Path, *, port: int | None = None, args=(), env=None,
                 scheme: str = "http"):
        self.data_dir = _Path(data_dir)
        self.port = port or free_port()
        self.args = list(args)
        self.env = dict(env or {})
        self.scheme = scheme
        self.proc: _subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> "LiveServer":
        # No warm-up unless asked for: it would add seconds to each of the many starts.
        env = {**_os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "PULID_FLUX_WORKER_WARMUP": "0", **self.env}
        cmd = [_sys.executable, "-m", "pulid_flux.cli", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir), *self.args]
        self._log = open(self.log_path, "ab")
        self.proc = _subprocess.Popen(cmd, env=env, stdout=self._log, stderr=_subprocess.STDOUT)
        return self

    def health(self, **kw):
        import httpx

        return httpx.get(f"{self.url}/health", timeout=5, **kw).json()

    def wait_ready(self, timeout: float = 120.0, need_worker: bool = True, **kw) -> dict:
        import httpx

        deadline = _time.monotonic() + timeout
        last = None
        while _time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                last = self.health(**kw)
                if not need_worker or last.get("ready"):
                    return last
            except httpx.HTTPError:
                pass
            _time.sleep(0.1)
        raise TimeoutError(f"server not ready: {last}\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def worker_pids(self) -> list[int]:
        import sqlite3

        db = sqlite3.connect(self.data_dir / "queue.sqlite3")
        try:
            return [r[0] for r in db.execute("SELECT pid FROM workers")]
        finally:
            db.close()

    def child_worker_pids(self) -> list[int]:
        """Worker pids whose parent is this server (others may share the data dir)."""
        out = []
        for pid in self.worker_pids():
            try:
                stat = _Path(f"/proc/{pid}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if self.proc is not None and ppid == self.proc.pid:
                out.append(pid)
        return out

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            pids = self.child_worker_pids()
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except _subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            for pid in pids:  # workers this server started and that outlived it
                try:
                    _os.kill(pid, _signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if getattr(self, "_log", None):
            self._log.close()


@_pytest.fixture
def make_server(tmp_path):
    """Factory of LiveServer objects; all are stopped at teardown."""
    servers: list[LiveServer] = []

    def make(data_dir=None, **kw) -> LiveServer:
        server = LiveServer(data_dir or (tmp_path / f"data{len(servers)}"), **kw)
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


# The main live server is shared by the client test modules: one worker load per session.
LIVE_ENV = {
    "PULID_FLUX_STEP_DELAY_S": "0.05",  # slow enough to cancel a running request
    "PULID_FLUX_CLEANUP_INTERVAL_S": "5",
    # Short leases, so a worker that stopped renewing its lease shows up within a test.
    "PULID_FLUX_HEARTBEAT_INTERVAL_S": "0.25",
    "PULID_FLUX_LEASE_TIMEOUT_S": "4",
    "PULID_FLUX_WORKER_WARMUP": "1",  # the default, kept on here: its workers warm up
    # Webhook receivers of the client tests listen on loopback, which the address policy
    # refuses unless the operator allows it.
    "PULID_FLUX_FETCH_ALLOWED_PRIVATE_CIDRS": "127.0.0.0/8",
}


@_pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("live") / "data", args=["--model", "tiny"],
                        env=LIVE_ENV)
    server.start()
    try:
        server.wait_ready(timeout=240)
        yield server
    finally:
        server.stop()


@_pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A throwaway CA and a server certificate for 127.0.0.1 (made with `cryptography`)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pulid-flux test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}
