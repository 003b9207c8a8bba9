"""Weight layout, missing-file errors, the resumable HTTP fetcher and the Hugging Face calls.

Nothing here reaches the internet: HTTP goes to loopback servers started by the tests; the
Hugging Face hub is one of them (`_Hub`), spoken to by the real huggingface_hub.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from pulid_flux.cli import main
from pulid_flux.engine import download as dl
from pulid_flux.engine.download import (
    DownloadError,
    MissingWeightsError,
    WeightPaths,
    download_weights,
    fetch_url,
    require,
)

# --------------------------------------------------------------------------- helpers


class _Server:
    """Loopback HTTP file server that honours Range, can cut responses short and redirect."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.authorizations: list[tuple[str, str | None]] = []  # (path, Authorization header)
        self.cuts: list[int] = []  # successive responses send only this many body bytes
        self.ignore_range = False
        self.redirects: dict[str, str] = {}
        self.gated = False  # answer everything like the hub does for a gated repo
        self.cut_prefix = ""  # cuts apply to paths starting with this
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                path = self.path.split("?")[0]
                server.requests.append((path, self.headers.get("Range")))
                server.authorizations.append((path, self.headers.get("Authorization")))
                if server.gated:
                    body = b'{"error": "Access to model is restricted."}'
                    self.send_response(403)
                    self.send_header("X-Error-Code", "GatedRepo")
                    self.send_header("X-Error-Message", "Access to model is restricted.")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cuts and path.startswith(server.cut_prefix):
                    body = body[: server.cuts.pop(0)]  # then the connection closes early
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _payload(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}-{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


# A plausible listing of each repository; the recorder filters it with huggingface_hub's own rules.
_FLUX_FILES = [
    ".gitattributes", "README.md", "LICENSE.md", "dev_grid.jpg",
    "flux1-dev.safetensors", "ae.safetensors", "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]
_REPOS = {
    dl.FLUX_REPO: _FLUX_FILES,
    dl.ANTELOPEV2_REPO: [
        "README.md", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx",
    ],
    dl.SAFETY_CHECKER_REPO: [
        "README.md", "config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin",
    ],
    dl.PULID_REPO: ["pulid_flux_v0.9.0.safetensors", "pulid_flux_v0.9.1.safetensors", "pulid_v1.1.safetensors"],
    dl.EVA_REPO: ["EVA02_CLIP_L_336_psz14_s6B.pt", "EVA02_CLIP_L_psz14_s4B.pt"],
}


def _placeholder(repo_files: list[str], name: str) -> bytes:
    if name.endswith(".safetensors.index.json"):
        folder = str(Path(name).parent)
        shards = [f for f in repo_files if f.startswith(folder + "/") and fnmatch.fnmatch(f, "*-of-*.safetensors")]
        weight_map = {f"w{i}": Path(s).name for i, s in enumerate(shards)}
        return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return b"placeholder " + name.encode()


class _Hub(_Server):
    """A loopback Hugging Face hub: the listing (`model_info`), `auth_check` and `resolve` routes of
    every repository in HF_SOURCES at its pinned revision, answered to the real huggingface_hub."""

    def __init__(self, repos=None):
        super().__init__({})
        self.repos = dict(repos or _REPOS)
        self.drop: tuple[str, ...] = ()  # files listed but never served (404)
        self.contents: dict[str, bytes] = {}  # file name -> content instead of a placeholder

    def publish(self) -> None:
        self.files.clear()
        for repo, revision in dl.HF_SOURCES.values():
            names = self.repos[repo]
            contents = {n: self.contents.get(n) or _placeholder(names, n) for n in names}
            siblings = [{"rfilename": n, "size": len(c)} for n, c in contents.items()]
            listing = {"id": repo, "sha": revision, "siblings": siblings}
            self.files[f"/api/models/{repo}/revision/{revision}"] = json.dumps(listing).encode()
            self.files[f"/api/models/{repo}/auth-check"] = b"{}"
            for name, content in contents.items():
                if name not in self.drop:
                    self.files[f"/{repo}/resolve/{revision}/{name}"] = content

    def of(self, kind: str, repo: str) -> list[str]:
        """Files fetched ("file"), revisions listed ("listing") or access checks ("auth") of ``repo``."""
        prefix = {"file": f"/{repo}/resolve/", "listing": f"/api/models/{repo}/revision/",
                  "auth": f"/api/models/{repo}/auth-check"}[kind]
        hits = [path[len(prefix):] for path, _ in self.requests if path.startswith(prefix)]
        return [h.split("/", 1)[1] for h in hits] if kind == "file" else hits


@pytest.fixture
def hub(monkeypatch):
    """The fake hub as huggingface_hub's default endpoint; no token from the environment."""
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with _Hub() as server:
        server.publish()
        monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        yield server


@pytest.fixture
def facexlib_server():
    files = {
        "/v0.1.0/detection_Resnet50_Final.pth": _payload(3000, 1),
        "/v0.2.0/parsing_bisenet.pth": _payload(2000, 2),
    }
    with _Server(files) as server:
        urls = {
            dl.FACEXLIB_DETECTION: (server.url + "/v0.1.0/detection_Resnet50_Final.pth", 3000),
            dl.FACEXLIB_PARSING: (server.url + "/v0.2.0/parsing_bisenet.pth", None),
        }
        yield server, urls


# --------------------------------------------------------------------------- layout and overrides


def test_layout_under_one_directory(tmp_path):
    p = WeightPaths.from_dir(tmp_path)
    assert p.weights_dir == tmp_path
    assert p.pulid_version == "v0.9.1"
    assert p.pulid_checkpoint == tmp_path / "pulid" / "pulid_flux_v0.9.1.safetensors"
    assert p.flux_dir == tmp_path / "flux-dev"
    assert p.flux_transformer is None and p.flux_ae is None
    assert p.eva_checkpoint == tmp_path / "eva" / "EVA02_CLIP_L_336_psz14_s6B.pt"
    assert p.antelopev2_root == tmp_path / "antelopev2"
    assert p.antelopev2_detector == tmp_path / "antelopev2/models/antelopev2/scrfd_10g_bnkps.onnx"
    assert p.antelopev2_recognition == tmp_path / "antelopev2/models/antelopev2/glintr100.onnx"
    assert p.facexlib_detection == tmp_path / "facexlib" / "detection_Resnet50_Final.pth"
    assert p.facexlib_parsing == tmp_path / "facexlib" / "parsing_bisenet.pth"
    assert p.safety_checker_dir == tmp_path / "safety-checker"
    old = WeightPaths.from_dir(tmp_path, pulid_version="v0.9.0")
    assert old.pulid_checkpoint.name == "pulid_flux_v0.9.0.safetensors"
    with pytest.raises(ValueError, match="v0.9.1"):
        WeightPaths.from_dir(tmp_path, pulid_version="v1.1")


def test_default_directory_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PULID_FLUX_WEIGHTS_DIR", str(tmp_path / "w"))
    assert WeightPaths.from_dir().weights_dir == tmp_path / "w"
    monkeypatch.delenv("PULID_FLUX_WEIGHTS_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert WeightPaths.from_dir().weights_dir == tmp_path / "home" / ".cache" / "pulid-flux"


def test_every_path_can_be_overridden(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    overrides = {name: tmp_path / "elsewhere" / name for name in WeightPaths.path_fields()}
    p = WeightPaths.from_dir(tmp_path, **overrides)
    for name, value in overrides.items():
        assert getattr(p, name) == value
    assert p.overridden == frozenset(overrides)
    # None means "not given"; "~" is expanded.
    q = WeightPaths.from_dir(tmp_path, eva_checkpoint=None, flux_transformer="~/flux1-dev.safetensors")
    assert q.eva_checkpoint == tmp_path / "eva" / dl.EVA_FILENAME
    assert q.flux_transformer == tmp_path / "home" / "flux1-dev.safetensors"
    with pytest.raises(TypeError, match="flux_vae"):
        WeightPaths.from_dir(tmp_path, flux_vae="x")


def test_overrides_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PULID_FLUX_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("PULID_FLUX_FLUX_TRANSFORMER", str(tmp_path / "bfl" / "flux1-dev.safetensors"))
    monkeypatch.setenv("PULID_FLUX_PULID_VERSION", "v0.9.0")
    p = WeightPaths.from_env(flux_ae=tmp_path / "bfl" / "ae.safetensors")
    assert p.weights_dir == tmp_path
    assert p.pulid_checkpoint.name == "pulid_flux_v0.9.0.safetensors"
    assert p.flux_transformer == tmp_path / "bfl" / "flux1-dev.safetensors"
    assert p.flux_ae == tmp_path / "bfl" / "ae.safetensors"
    # An explicit keyword wins over the environment.
    q = WeightPaths.from_env(flux_transformer=tmp_path / "mine.safetensors")
    assert q.flux_transformer == tmp_path / "mine.safetensors"


# --------------------------------------------------------------------------- missing files


def test_require_names_the_file_and_the_command(tmp_path):
    target = tmp_path / "eva" / dl.EVA_FILENAME
    with pytest.raises(MissingWeightsError) as info:
        require(target, "EVA02-CLIP checkpoint", component="eva", weights_dir=tmp_path)
    err = info.value
    assert isinstance(err, FileNotFoundError)
    assert err.filename == str(target)
    assert str(target) in str(err) and "EVA02-CLIP checkpoint" in str(err)
    assert f"pulid-flux download --dest {tmp_path} --only eva" in str(err)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    assert require(target, "EVA02-CLIP checkpoint") == target


def test_check_lists_every_missing_file(tmp_path):
    p = WeightPaths.from_dir(tmp_path, pulid_version="v0.9.0")
    with pytest.raises(MissingWeightsError) as info:
        p.check()
    message = str(info.value)
    for path in (p.pulid_checkpoint, p.flux_dir / "model_index.json", p.eva_checkpoint, p.antelopev2_detector,
                 p.antelopev2_recognition, p.facexlib_detection, p.facexlib_parsing,
                 p.safety_checker_dir / "config.json"):
        assert str(path) in message
    assert message.rstrip().endswith(
        f"pulid-flux download --dest {tmp_path} --only pulid --only flux --only eva --only antelopev2 "
        "--only facexlib --only safety-checker --pulid-version v0.9.0"
    )
    # Only the components asked for are checked.
    with pytest.raises(MissingWeightsError) as info:
        p.check(["eva"])
    assert "--only eva" in str(info.value) and "antelopev2" not in str(info.value)
    with pytest.raises(ValueError):
        p.check(["nope"])
    # v0.9.0 only matters to the pulid component.
    with pytest.raises(MissingWeightsError) as info:
        p.check(["eva"])
    assert "--pulid-version" not in str(info.value)


def test_missing_weights_error_survives_pickling(tmp_path):
    import pickle

    err = MissingWeightsError([("EVA", tmp_path / "eva.pt")], weights_dir=tmp_path, components=["eva"],
                              notes=["a note"])
    copy = pickle.loads(pickle.dumps(err))
    assert isinstance(copy, MissingWeightsError) and str(copy) == str(err)
    assert copy.filename == str(tmp_path / "eva.pt") and copy.command == err.command


def test_check_passes_after_a_full_download(tmp_path, hub, facexlib_server):
    _, urls = facexlib_server
    paths = download_weights(tmp_path, facexlib_files=urls, progress=False)
    assert paths.check() is paths
    # A missing shard named by the index is noticed.
    shard = paths.flux_dir / "transformer" / "diffusion_pytorch_model-00002-of-00003.safetensors"
    shard.unlink()
    with pytest.raises(MissingWeightsError, match="00002-of-00003") as info:
        paths.check()
    assert "--only flux" in str(info.value) and "--only eva" not in str(info.value)


def test_bfl_single_file_overrides_replace_transformer_and_vae(tmp_path, hub):
    download_weights(tmp_path, components=["flux"], progress=False)
    for sub in ("transformer", "vae"):
        for f in (tmp_path / "flux-dev" / sub).iterdir():
            f.unlink()
    bfl = tmp_path / "bfl"
    p = WeightPaths.from_dir(tmp_path, flux_transformer=bfl / "flux1-dev.safetensors", flux_ae=bfl / "ae.safetensors")
    with pytest.raises(MissingWeightsError) as info:
        p.check(["flux"])
    message = str(info.value)
    assert str(bfl / "flux1-dev.safetensors") in message and str(bfl / "ae.safetensors") in message
    assert "set explicitly" in message
    assert "transformer/config.json" not in message  # the diffusers transformer is not needed
    bfl.mkdir()
    (bfl / "flux1-dev.safetensors").write_bytes(b"x")
    (bfl / "ae.safetensors").write_bytes(b"x")
    p.check(["flux"])


def test_antelopev2_layout_matches_insightface_and_nesting_mistakes_are_explained(tmp_path, hub, monkeypatch):
    p = download_weights(tmp_path, components=["antelopev2"], progress=False)
    p.check(["antelopev2"])
    from insightface.utils.storage import ensure_available

    # FaceAnalysis(name="antelopev2", root=...) resolves its model folder this way.
    assert Path(ensure_available("models", "antelopev2", root=str(p.antelopev2_root))) == p.antelopev2_dir
    # The kwargs we hand to FaceAnalysis point at the same folder, whatever the working directory.
    kwargs = p.face_analysis_kwargs()
    monkeypatch.chdir(tmp_path)  # tmp_path/antelopev2 exists here and is NOT the model folder
    assert Path(ensure_available("models", kwargs["name"], root=kwargs["root"])) == p.antelopev2_dir.resolve()

    # The usual mistake: files one level too deep (models/antelopev2/antelopev2/*.onnx).
    wrong = WeightPaths.from_dir(tmp_path / "other")
    nested = wrong.antelopev2_dir / "antelopev2"
    nested.mkdir(parents=True)
    for f in p.antelopev2_dir.glob("*.onnx"):
        (nested / f.name).write_bytes(f.read_bytes())
    with pytest.raises(MissingWeightsError) as info:
        wrong.check(["antelopev2"])
    assert f"found in {nested}" in str(info.value) and str(wrong.antelopev2_dir) in str(info.value)


# --------------------------------------------------------------------------- HTTP fetcher with resume


def test_interrupted_download_resumes_with_range(tmp_path):
    data = _payload(100_000)
    with _Server({"/f.pth": data}) as server:
        server.cuts = [30_000]
        dest = tmp_path / "f.pth"
        with pytest.raises(DownloadError, match="30000 bytes are kept .* run the command again to resume"):
            fetch_url(server.url + "/f.pth", dest, max_retries=0, progress=False)
        part = tmp_path / ("f.pth" + dl.PART_SUFFIX)
        assert not dest.exists()
        assert part.read_bytes() == data[:30_000]

        fetch_url(server.url + "/f.pth", dest, max_retries=0, progress=False)
        assert dest.read_bytes() == data
        assert not part.exists()
        assert server.requests == [("/f.pth", None), ("/f.pth", "bytes=30000-")]

        # Complete: not fetched again.
        fetch_url(server.url + "/f.pth", dest, max_retries=0, progress=False)
        assert len(server.requests) == 2


def test_retries_resume_within_one_call_and_follow_redirects(tmp_path):
    data = _payload(50_000, 7)
    with _Server({"/objects/f": data}) as server:
        server.redirects["/releases/f"] = server.url + "/objects/f"
        server.cuts = [10_000, 15_000]
        dest = fetch_url(server.url + "/releases/f", tmp_path / "f", expected_size=len(data),
                         max_retries=3, retry_backoff_s=0, progress=False)
        assert dest.read_bytes() == data
        ranges = [r for path, r in server.requests if path == "/objects/f"]
        assert ranges == [None, "bytes=10000-", "bytes=25000-"]


def test_server_ignoring_range_restarts_cleanly(tmp_path):
    data = _payload(20_000, 3)
    with _Server({"/f": data}) as server:
        server.cuts = [5_000]
        with pytest.raises(DownloadError):
            fetch_url(server.url + "/f", tmp_path / "f", max_retries=0, progress=False)
        server.ignore_range = True
        fetch_url(server.url + "/f", tmp_path / "f", max_retries=0, progress=False)
        assert (tmp_path / "f").read_bytes() == data
        assert server.requests[-1] == ("/f", "bytes=5000-")


def test_complete_part_file_is_finished_without_a_body(tmp_path):
    data = _payload(8_000, 4)
    (tmp_path / ("f" + dl.PART_SUFFIX)).write_bytes(data)
    with _Server({"/f": data}) as server:
        fetch_url(server.url + "/f", tmp_path / "f", expected_size=len(data), max_retries=0, progress=False)
        assert server.requests == [("/f", "bytes=8000-")]
    assert (tmp_path / "f").read_bytes() == data


def test_wrong_size_and_http_errors_are_reported(tmp_path):
    data = _payload(4_000, 5)
    with _Server({"/f": data}) as server:
        with pytest.raises(DownloadError, match="expected 4001"):
            fetch_url(server.url + "/f", tmp_path / "f", expected_size=4001, max_retries=0, progress=False)
        assert not (tmp_path / "f").exists() and not (tmp_path / ("f" + dl.PART_SUFFIX)).exists()
        with pytest.raises(DownloadError, match="HTTP 404"):
            fetch_url(server.url + "/missing", tmp_path / "g", max_retries=0, progress=False)
        port = server.httpd.server_address[1]
    # Nothing listens any more: fail at once instead of retrying with back-off.
    with pytest.raises(DownloadError, match="cannot connect"):
        fetch_url(f"http://127.0.0.1:{port}/f", tmp_path / "h", max_retries=3, retry_backoff_s=60, progress=False)


def test_facexlib_component_uses_the_http_fetcher(tmp_path, facexlib_server):
    server, urls = facexlib_server
    p = download_weights(tmp_path, components=["facexlib"], facexlib_files=urls, progress=False)
    p.check(["facexlib"])
    assert p.facexlib_detection.read_bytes() == server.files["/v0.1.0/detection_Resnet50_Final.pth"]
    n = len(server.requests)
    download_weights(tmp_path, components=["facexlib"], facexlib_files=urls, progress=False)
    assert len(server.requests) == n


def test_default_facexlib_sources_are_the_release_urls():
    assert dl.FACEXLIB_FILES[dl.FACEXLIB_DETECTION][0] == (
        "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"
    )
    assert dl.FACEXLIB_FILES[dl.FACEXLIB_PARSING][0] == (
        "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth"
    )


# --------------------------------------------------------------------------- Hugging Face calls


def test_hub_files_come_from_the_pinned_revisions_into_the_layout(tmp_path, hub, facexlib_server):
    _, urls = facexlib_server
    paths = download_weights(tmp_path, pulid_versions=("v0.9.1", "v0.9.0"), token="hf_test",
                             facexlib_files=urls, progress=False)
    for component, (repo, revision) in dl.HF_SOURCES.items():
        assert hub.of("listing", repo) == [revision], component
        resolved = [path for path, _ in hub.requests if path.startswith(f"/{repo}/resolve/")]
        assert resolved and all(p.startswith(f"/{repo}/resolve/{revision}/") for p in resolved), component

    assert hub.of("file", dl.PULID_REPO) == ["pulid_flux_v0.9.1.safetensors", "pulid_flux_v0.9.0.safetensors"]
    assert (tmp_path / "pulid" / "pulid_flux_v0.9.0.safetensors").is_file()
    assert hub.of("file", dl.EVA_REPO) == [dl.EVA_FILENAME] and paths.eva_checkpoint.is_file()
    flux = set(hub.of("file", dl.FLUX_REPO))
    assert flux == {f for f in _FLUX_FILES if "/" in f or f == "model_index.json"}  # the diffusers layout only
    assert hub.of("auth", dl.FLUX_REPO) == [""]
    assert not (tmp_path / "flux-dev" / "flux1-dev.safetensors").exists()
    assert not (tmp_path / "flux-dev" / "README.md").exists()
    assert set(hub.of("file", dl.ANTELOPEV2_REPO)) == {f for f in _REPOS[dl.ANTELOPEV2_REPO] if f.endswith(".onnx")}
    assert (tmp_path / "antelopev2" / "models" / "antelopev2" / "glintr100.onnx").is_file()
    assert hub.of("file", dl.SAFETY_CHECKER_REPO) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert {auth for _, auth in hub.authorizations} == {"Bearer hf_test"}
    assert not list(tmp_path.rglob("*" + dl.PART_SUFFIX)) and not list(tmp_path.rglob("*.lock"))
    paths.check()
    WeightPaths.from_dir(tmp_path, pulid_version="v0.9.0").check(["pulid"])

    # Idempotent: a second run asks nobody for anything.
    n = len(hub.requests)
    download_weights(tmp_path, pulid_versions=("v0.9.1", "v0.9.0"), facexlib_files=urls, progress=False)
    assert len(hub.requests) == n
    # --force fetches again.
    download_weights(tmp_path, components=["eva"], force=True, progress=False)
    assert hub.of("file", dl.EVA_REPO) == [dl.EVA_FILENAME] * 2


def test_every_source_is_pinned():
    import re

    assert set(dl.HF_SOURCES) == set(dl.COMPONENTS) - {"facexlib"}
    for repo, revision in dl.HF_SOURCES.values():
        assert re.fullmatch(r"[0-9a-f]{40}", revision), repo  # a commit, not a branch
    for url, size in dl.FACEXLIB_FILES.values():
        assert re.search(r"/releases/download/v\d+\.\d+\.\d+/", url) and size > 0


def test_a_pin_can_be_moved_for_one_run(tmp_path, hub):
    other = "f" * 40
    with pytest.raises(DownloadError, match=r"\[eva\]"):
        download_weights(tmp_path, components=["eva"], revisions={"eva": other}, progress=False)
    assert hub.of("listing", dl.EVA_REPO) == [other]
    with pytest.raises(ValueError, match="facexlib"):
        download_weights(tmp_path, revisions={"facexlib": other})


def test_safety_checker_falls_back_to_the_bin_file(tmp_path, hub):
    hub.repos[dl.SAFETY_CHECKER_REPO] = ["config.json", "preprocessor_config.json", "pytorch_model.bin"]
    hub.publish()
    p = download_weights(tmp_path, components=["safety-checker"], progress=False)
    assert "pytorch_model.bin" in hub.of("file", dl.SAFETY_CHECKER_REPO)
    assert p.safety_checker_weights == tmp_path / "safety-checker" / "pytorch_model.bin"
    p.check(["safety-checker"])


def test_a_file_the_hub_does_not_serve_fails_its_component_only(tmp_path, hub):
    hub.drop = ("vae/diffusion_pytorch_model.safetensors",)
    hub.publish()
    with pytest.raises(DownloadError) as info:
        download_weights(tmp_path, components=["flux", "eva"], progress=False)
    message = str(info.value)
    assert "[flux]" in message and "vae/diffusion_pytorch_model.safetensors" in message and "404" in message
    assert "[eva]" not in message and (tmp_path / "eva" / dl.EVA_FILENAME).is_file()  # others still fetched


def test_an_interrupted_hub_file_resumes_in_the_next_run(tmp_path, hub, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    data = _payload(100_000, 9)
    hub.contents[dl.EVA_FILENAME] = data
    hub.publish()
    hub.cut_prefix = f"/{dl.EVA_REPO}/resolve/"
    hub.cuts = [1_000] * (dl.HTTP_MAX_RETRIES + 1)
    with pytest.raises(DownloadError, match="run the command again to resume"):
        download_weights(tmp_path, components=["eva"], progress=False)
    part = tmp_path / "eva" / (dl.EVA_FILENAME + dl.PART_SUFFIX)
    kept = part.stat().st_size
    assert kept == 1_000 * (dl.HTTP_MAX_RETRIES + 1)
    hub.requests.clear()
    download_weights(tmp_path, components=["eva"], progress=False)  # a new run
    assert (tmp_path / "eva" / dl.EVA_FILENAME).read_bytes() == data
    ranges = [r for path, r in hub.requests if path.startswith(hub.cut_prefix)]
    assert ranges == [f"bytes={kept}-"]  # picked up where it stopped, not from zero
    assert not part.exists()


def test_a_part_file_in_use_is_not_written_twice(tmp_path):
    import fcntl

    part = tmp_path / ("f" + dl.PART_SUFFIX)
    with open(part, "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match="another download"):
            fetch_url("http://127.0.0.1:9/f", tmp_path / "f", max_retries=0, progress=False)


def test_offline_mode_failure_is_clear(tmp_path, monkeypatch):
    # The real huggingface_hub, in offline mode.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError) as info:
        download_weights(tmp_path, components=["pulid", "antelopev2"], progress=False)
    message = str(info.value)
    assert "[pulid]" in message and "[antelopev2]" in message
    assert "HF_HUB_OFFLINE" in message
    assert "guozinan/PuLID" in message and "DIAMONIK7777/antelopev2" in message


def test_gated_repo_without_token_gives_the_steps(tmp_path, monkeypatch):
    # The real huggingface_hub against a loopback "hub" that answers like a gated repo.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "")
    with _Server({}) as server:
        server.gated = True
        with pytest.raises(DownloadError) as info:
            download_weights(tmp_path, components=["flux"], endpoint=server.url, progress=False)
        assert any("black-forest-labs/FLUX.1-dev" in path for path, _ in server.requests)
    message = str(info.value)
    assert "gated" in message and "accept the licence" in message
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in message
    assert "https://huggingface.co/settings/tokens" in message and "export HF_TOKEN=" in message
    assert "--token" in message


# --------------------------------------------------------------------------- command line


def _cli(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_TOKEN": "", **(env or {})}
    full_env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "pulid_flux.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def test_cli_options_and_success(tmp_path, hub, capsys):
    assert main(["download", "--dest", str(tmp_path), "--only", "pulid", "--only", "eva", "--pulid-version", "all",
                 "--token", "hf_cli", "--no-progress"]) == 0
    assert hub.of("file", dl.PULID_REPO) == ["pulid_flux_v0.9.1.safetensors", "pulid_flux_v0.9.0.safetensors"]
    assert {auth for _, auth in hub.authorizations} == {"Bearer hf_cli"}
    assert hub.of("listing", dl.FLUX_REPO) == []
    assert "weights ready in" in capsys.readouterr().err
    # No --token (and no HF_TOKEN): nothing is sent.
    (tmp_path / "eva" / dl.EVA_FILENAME).unlink()
    hub.authorizations.clear()
    assert main(["download", "--dest", str(tmp_path), "--only", "eva", "--no-progress"]) == 0
    assert {auth for _, auth in hub.authorizations} == {None}
    with pytest.raises(SystemExit):
        main(["download", "--only", "weights"])
    assert main(["download", "--dest", str(tmp_path), "--revision", "nope=abc"]) == 1
    assert "--revision nope=abc" in capsys.readouterr().err


def test_cli_refuses_to_start_without_disk_space(tmp_path, hub, monkeypatch, capsys):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert main(["download", "--dest", str(tmp_path / "new"), "--only", "eva", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "not enough free disk space" in err and "but 0.0 GB free" in err
    assert hub.of("file", dl.EVA_REPO) == []  # refused before any file was fetched
    assert not (tmp_path / "new" / "eva").exists()
    # Exactly the bytes to fetch are free: enough once the margin setting is 0, not before.
    needed = len(_placeholder(_REPOS[dl.EVA_REPO], dl.EVA_FILENAME))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - needed, needed))
    assert main(["download", "--dest", str(tmp_path / "new"), "--only", "eva", "--no-progress"]) == 1
    monkeypatch.setenv("PULID_FLUX_DOWNLOAD_FREE_SPACE_MARGIN_GB", "0")
    assert main(["download", "--dest", str(tmp_path / "new"), "--only", "eva", "--no-progress"]) == 0


def test_cli_unreachable_hub_reports_every_component_and_leaves_no_litter(tmp_path):
    with _Server({}) as server:
        port = server.httpd.server_address[1]
    done = _cli("download", "--dest", str(tmp_path), "--no-progress", "--only", "pulid", "--only", "flux",
                "--only", "eva", "--only", "antelopev2", "--only", "safety-checker",
                env={"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "pulid-flux: error: some weights could not be fetched" in done.stderr
    for component in ("pulid", "flux", "eva", "antelopev2", "safety-checker"):
        assert f"[{component}] cannot reach the Hugging Face hub" in done.stderr, component
    litter = [p for p in tmp_path.rglob("*") if p.suffix in (".lock", ".part", ".incomplete")]
    assert litter == []


def test_cli_gated_repo_prints_the_steps(tmp_path):
    with _Server({}) as server:
        server.gated = True
        done = _cli("download", "--dest", str(tmp_path), "--only", "flux", "--no-progress",
                    env={"HF_ENDPOINT": server.url})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "accept the licence" in done.stderr and "export HF_TOKEN=" in done.stderr


def test_an_unwritable_folder_fails_its_component_only(tmp_path, hub):
    (tmp_path / "eva").write_text("a file where the eva folder belongs")
    with pytest.raises(DownloadError) as info:
        download_weights(tmp_path, components=["eva", "pulid"], progress=False)
    assert "[eva]" in str(info.value) and "[pulid]" not in str(info.value)
    assert (tmp_path / "pulid" / "pulid_flux_v0.9.1.safetensors").is_file()
