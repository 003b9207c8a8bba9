"""Key files shared by API replicas: created once, race-free, and placed by a setting."""

from __future__ import annotations

import os
import threading

from fastapi.testclient import TestClient

from pulid_flux.api.app import create_app
from pulid_flux.config import Settings
from pulid_flux.keyfile import read_or_create


def test_concurrent_creators_all_get_the_one_written_key(tmp_path):
    path = tmp_path / "keys" / "secret.key"
    start = threading.Barrier(16)
    results: list[bytes] = []

    def creator(i: int) -> None:
        start.wait()
        results.append(read_or_create(path, lambda: os.urandom(32) + bytes([i])))

    threads = [threading.Thread(target=creator, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and len(set(results)) == 1
    assert results[0] == path.read_bytes() and len(results[0]) == 33
    assert path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(path.parent) == ["secret.key"]  # no temp files left behind
    assert read_or_create(path, lambda: b"other") == results[0]


def test_replicas_with_their_own_data_dirs_share_keys_given_by_setting(tmp_path):
    keys = {"secret_key_file": tmp_path / "secrets" / "secret.key",
            "webhook_key_file": tmp_path / "secrets" / "webhook.pem"}
    apps = [create_app(Settings(data_dir=tmp_path / name, local_workers=0, **keys), run_loops=False)
            for name in ("a", "b")]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        assert a.get("/.well-known/jwks.json").json() == b.get("/.well-known/jwks.json").json()
        token = a.post("/rest/storage/auth/token", json={}).json()["token"]
        # an upload token of one replica is good at the other
        assert b.app.state.services.auth.check_token(token, "cdn") is not None
    assert keys["secret_key_file"].stat().st_size == 32
    for name in ("a", "b"):
        assert not (tmp_path / name / "secret.key").exists()
        assert not (tmp_path / name / "webhook_ed25519.pem").exists()
