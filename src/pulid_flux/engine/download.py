"""Weight files: one cache directory with a fixed layout, path resolution, and ``pulid-flux download``.

Layout under the weights directory (``--dest``, ``$PULID_FLUX_WEIGHTS_DIR`` or ``~/.cache/pulid-flux``)::

    pulid/pulid_flux_v0.9.1.safetensors          guozinan/PuLID (v0.9.0 on request)
    flux-dev/{model_index.json,scheduler/,...}   black-forest-labs/FLUX.1-dev, diffusers layout only
    eva/EVA02_CLIP_L_336_psz14_s6B.pt            QuanSun/EVA-CLIP
    antelopev2/models/antelopev2/*.onnx          DIAMONIK7777/antelopev2
    facexlib/detection_Resnet50_Final.pth        facexlib GitHub release v0.1.0
    facexlib/parsing_bisenet.pth                 facexlib GitHub release v0.2.0
    safety-checker/{config.json,...}             CompVis/stable-diffusion-safety-checker

``antelopev2/`` is the ``root`` that insightface's ``FaceAnalysis(name="antelopev2", root=...)``
expects: it looks in ``<root>/models/<name>/``, one level deeper than the folder people usually
unpack the files into (PuLID#146).

Heavy imports (huggingface_hub, httpx, tqdm) stay inside functions so ``pulid-flux --help`` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- settings

WEIGHTS_DIR_ENV = "PULID_FLUX_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = Path("~/.cache/pulid-flux")
# Per-path overrides from the environment: PULID_FLUX_<FIELD> (see WeightPaths.from_env).
PATH_ENV_PREFIX = "PULID_FLUX_"
DOWNLOAD_COMMAND = "pulid-flux download"

PULID_VERSIONS = ("v0.9.1", "v0.9.0")
DEFAULT_PULID_VERSION = "v0.9.1"

# Sub-directories of the weights directory.
PULID_SUBDIR = "pulid"
FLUX_SUBDIR = "flux-dev"
EVA_SUBDIR = "eva"
ANTELOPEV2_ROOT_SUBDIR = "antelopev2"
FACEXLIB_SUBDIR = "facexlib"
SAFETY_CHECKER_SUBDIR = "safety-checker"

PULID_REPO = "guozinan/PuLID"
PULID_FILENAME = "pulid_flux_{version}.safetensors"

FLUX_REPO = "black-forest-labs/FLUX.1-dev"
FLUX_LICENCE_URL = "https://huggingface.co/black-forest-labs/FLUX.1-dev"
# Only the diffusers sub-folders; the repo also holds BFL single files of the same weights.
FLUX_DIFFUSERS_PATTERNS = (
    "model_index.json",
    "scheduler/*",
    "text_encoder/*",
    "text_encoder_2/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "transformer/*",
    "vae/*",
)
FLUX_SINGLE_FILES = ("flux1-dev.safetensors", "ae.safetensors")
# sub-folder -> (files that must exist, weight file name stem or None for non-model folders)
FLUX_SUBFOLDERS: dict[str, tuple[tuple[str, ...], Optional[str]]] = {
    "scheduler": (("scheduler_config.json",), None),
    "text_encoder": (("config.json",), "model"),
    "text_encoder_2": (("config.json",), "model"),
    "tokenizer": (("tokenizer_config.json",), None),
    "tokenizer_2": (("tokenizer_config.json",), None),
    "transformer": (("config.json",), "diffusion_pytorch_model"),
    "vae": (("config.json",), "diffusion_pytorch_model"),
}

EVA_REPO = "QuanSun/EVA-CLIP"
EVA_FILENAME = "EVA02_CLIP_L_336_psz14_s6B.pt"

ANTELOPEV2_REPO = "DIAMONIK7777/antelopev2"
ANTELOPEV2_NAME = "antelopev2"
ANTELOPEV2_PATTERNS = ("*.onnx",)
ANTELOPEV2_DETECTOR = "scrfd_10g_bnkps.onnx"
ANTELOPEV2_RECOGNITION = "glintr100.onnx"

FACEXLIB_DETECTION = "detection_Resnet50_Final.pth"
FACEXLIB_PARSING = "parsing_bisenet.pth"
# file name -> (URL, exact size in bytes or None where no size has been confirmed)
FACEXLIB_FILES: dict[str, tuple[str, Optional[int]]] = {
    FACEXLIB_DETECTION: (
        "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
        109_497_761,
    ),
    FACEXLIB_PARSING: (
        "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth",
        53_289_463,
    ),
}

SAFETY_CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"
SAFETY_CHECKER_PATTERNS = ("config.json", "preprocessor_config.json", "*.safetensors")
SAFETY_CHECKER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # preferred first
SAFETY_CHECKER_FALLBACK = "pytorch_model.bin"  # fetched only if the repo has no safetensors

COMPONENTS = ("pulid", "flux", "eva", "antelopev2", "facexlib", "safety-checker")

# Every Hugging Face source, pinned to a commit, so that a download is the same files today and
# next year (the facexlib files above are pinned by release tag and exact size). To move a pin:
# put the new commit here, or once with `pulid-flux download --revision COMPONENT=SHA`, and
# fetch that component again with `--force --only COMPONENT`.
HF_SOURCES: dict[str, tuple[str, str]] = {
    "pulid": (PULID_REPO, "d58b3ba191be1280c37ace0656a2e65cd9b8c8d8"),
    "flux": (FLUX_REPO, "3de623fc3c33e44ffbe2bad470d0f45bccf2eb21"),
    "eva": (EVA_REPO, "690a5975ca06e9a43d16bae440dd08213bfff0c5"),
    "antelopev2": (ANTELOPEV2_REPO, "ba0c3e10f4548361eb9a63265d87ce1140ab5a05"),
    "safety-checker": (SAFETY_CHECKER_REPO, "cb41f3a270d63d454d385fc2e4f571c487c253c5"),
}

# Every file goes through one fetcher (fetch_url): HTTP Range resume from a .part file, also
# across runs. huggingface_hub's own downloads restart a file from zero in a new process.
HTTP_CONNECT_TIMEOUT_S = 30.0
HTTP_READ_TIMEOUT_S = 120.0
HTTP_MAX_RETRIES = 5  # resumed attempts after an interrupted transfer
HTTP_RETRY_BACKOFF_S = 2.0  # first wait; doubles per retry
HTTP_RETRY_BACKOFF_MAX_S = 30.0
PART_SUFFIX = ".part"


def default_weights_dir() -> Path:
    """``$PULID_FLUX_WEIGHTS_DIR`` if set, else ``~/.cache/pulid-flux``."""
    value = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(value or DEFAULT_WEIGHTS_DIR).expanduser()


# ----------------------------------------------------------------------------- errors


class MissingWeightsError(FileNotFoundError):
    """One or more weight files are absent. The message lists them and the command that fetches them."""

    def __init__(
        self,
        missing: Sequence[tuple[str, Path]],
        *,
        weights_dir: Optional[Path] = None,
        components: Iterable[str] = (),
        pulid_version: str = DEFAULT_PULID_VERSION,
        notes: Sequence[str] = (),
    ):
        components, notes = list(components), list(notes)
        kwargs = dict(weights_dir=weights_dir, components=components, pulid_version=pulid_version, notes=notes)
        self._init_args = (list(missing), kwargs)
        self.missing = [(what, Path(path)) for what, path in missing]
        self.weights_dir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
        self.components = sorted(set(components), key=_component_order)
        self.command = download_command(self.weights_dir, self.components, pulid_version)
        lines = ["missing weight file(s):"]
        lines += [f"  - {what}: {path}" for what, path in self.missing]
        lines += [f"  note: {note}" for note in notes]
        lines.append(f"fetch them with: {self.command}")
        self.message = "\n".join(lines)
        super().__init__(self.message)
        self.filename = str(self.missing[0][1]) if self.missing else None

    def __str__(self) -> str:
        # OSError would print "[Errno None] None: <filename>" once .filename is set.
        return self.message

    def __reduce__(self):
        # OSError pickles as cls(*args); rebuild from the real arguments (errors cross process boundaries).
        return (_rebuild_missing_weights_error, self._init_args)


def _rebuild_missing_weights_error(missing, kwargs) -> MissingWeightsError:
    return MissingWeightsError(missing, **kwargs)


class DownloadError(RuntimeError):
    """A download failed; the message says why and what to do."""


def _component_order(name: str) -> int:
    return COMPONENTS.index(name) if name in COMPONENTS else len(COMPONENTS)


def download_command(
    weights_dir: Path | str, components: Iterable[str] = (), pulid_version: str = DEFAULT_PULID_VERSION
) -> str:
    components = list(components)
    parts = [DOWNLOAD_COMMAND, "--dest", shlex.quote(str(weights_dir))]
    for name in components:
        parts += ["--only", name]
    if pulid_version != DEFAULT_PULID_VERSION and (not components or "pulid" in components):
        parts += ["--pulid-version", pulid_version]
    return " ".join(parts)


def require(
    path: Path | str,
    what: str,
    *,
    component: Optional[str] = None,
    weights_dir: Optional[Path | str] = None,
) -> Path:
    """Return ``path`` if it exists, else raise :class:`MissingWeightsError` naming it and the fix."""
    path = Path(path)
    if path.exists():
        return path
    raise MissingWeightsError(
        [(what, path)],
        weights_dir=Path(weights_dir) if weights_dir is not None else None,
        components=[component] if component else [],
    )


# ----------------------------------------------------------------------------- paths


@dataclass
class WeightPaths:
    """Every weight file or folder the engine loads. Build with :meth:`from_dir` / :meth:`from_env`."""

    weights_dir: Path
    pulid_version: str
    pulid_checkpoint: Path  # pulid_flux_<version>.safetensors
    flux_dir: Path  # FLUX.1-dev in the diffusers layout
    eva_checkpoint: Path  # EVA02_CLIP_L_336_psz14_s6B.pt
    antelopev2_root: Path  # insightface FaceAnalysis(root=...); files in <root>/models/antelopev2/
    facexlib_dir: Path  # facexlib model_rootpath
    safety_checker_dir: Path  # StableDiffusionSafetyChecker + CLIPImageProcessor folder
    flux_transformer: Optional[Path] = None  # BFL single file flux1-dev.safetensors instead of flux_dir/transformer
    flux_ae: Optional[Path] = None  # BFL ae.safetensors instead of flux_dir/vae
    overridden: frozenset = field(default_factory=frozenset, repr=False, compare=False)

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_dir(
        cls,
        weights_dir: Path | str | None = None,
        pulid_version: str = DEFAULT_PULID_VERSION,
        **overrides,
    ) -> "WeightPaths":
        """The standard layout under ``weights_dir``; any path field can be overridden by keyword.

        ``None`` override values are ignored, so CLI options that were not given can be passed as-is.
        """
        if pulid_version not in PULID_VERSIONS:
            raise ValueError(f"unknown PuLID version {pulid_version!r}; choose one of {', '.join(PULID_VERSIONS)}")
        root = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
        paths = cls(
            weights_dir=root,
            pulid_version=pulid_version,
            pulid_checkpoint=root / PULID_SUBDIR / PULID_FILENAME.format(version=pulid_version),
            flux_dir=root / FLUX_SUBDIR,
            eva_checkpoint=root / EVA_SUBDIR / EVA_FILENAME,
            antelopev2_root=root / ANTELOPEV2_ROOT_SUBDIR,
            facexlib_dir=root / FACEXLIB_SUBDIR,
            safety_checker_dir=root / SAFETY_CHECKER_SUBDIR,
        )
        allowed = set(cls.path_fields())
        unknown = set(overrides) - allowed
        if unknown:
            raise TypeError(f"unknown weight path(s) {sorted(unknown)}; known: {sorted(allowed)}")
        given = {k: Path(v).expanduser() for k, v in overrides.items() if v is not None}
        return replace(paths, overridden=frozenset(given), **given)

    @classmethod
    def from_env(cls, weights_dir: Path | str | None = None, pulid_version: Optional[str] = None, **overrides):
        """Like :meth:`from_dir`, also reading ``PULID_FLUX_PULID_VERSION`` and ``PULID_FLUX_<FIELD>`` paths
        (e.g. ``PULID_FLUX_FLUX_TRANSFORMER``); keyword arguments win over the environment."""
        env = {}
        for name in cls.path_fields():
            value = os.environ.get(PATH_ENV_PREFIX + name.upper())
            if value:
                env[name] = value
        env.update({k: v for k, v in overrides.items() if v is not None})
        version = pulid_version or os.environ.get(PATH_ENV_PREFIX + "PULID_VERSION") or DEFAULT_PULID_VERSION
        return cls.from_dir(weights_dir, version, **env)

    @classmethod
    def path_fields(cls) -> tuple[str, ...]:
        skip = {"weights_dir", "pulid_version", "overridden"}
        return tuple(f.name for f in fields(cls) if f.name not in skip)

    # --- derived paths ------------------------------------------------------------------

    @property
    def antelopev2_dir(self) -> Path:
        return self.antelopev2_root / "models" / ANTELOPEV2_NAME

    @property
    def antelopev2_detector(self) -> Path:
        return self.antelopev2_dir / ANTELOPEV2_DETECTOR

    @property
    def antelopev2_recognition(self) -> Path:
        return self.antelopev2_dir / ANTELOPEV2_RECOGNITION

    def face_analysis_kwargs(self) -> dict[str, str]:
        """Arguments for insightface ``FaceAnalysis(**kwargs, providers=...)``.

        ``name`` is the absolute model folder: insightface joins it onto ``root/models`` (an absolute
        path wins), and insightface 2.x would otherwise first try ``./antelopev2`` relative to the
        working directory, which is the wrong folder when the process runs inside the weights dir.
        """
        return {"name": str(self.antelopev2_dir.resolve()), "root": str(self.antelopev2_root.resolve())}

    @property
    def facexlib_detection(self) -> Path:
        return self.facexlib_dir / FACEXLIB_DETECTION

    @property
    def facexlib_parsing(self) -> Path:
        return self.facexlib_dir / FACEXLIB_PARSING

    @property
    def safety_checker_weights(self) -> Optional[Path]:
        for name in SAFETY_CHECKER_WEIGHTS:
            if (self.safety_checker_dir / name).is_file():
                return self.safety_checker_dir / name
        return None

    # --- checks -------------------------------------------------------------------------

    def missing(self, components: Optional[Iterable[str]] = None) -> tuple[list[tuple[str, Path, str]], list[str]]:
        """(missing (what, path, component) triples, explanatory notes) for the given components."""
        wanted = _validate_components(components)
        missing: list[tuple[str, Path, str]] = []
        notes: list[str] = []

        def need(path: Path, what: str, component: str) -> None:
            if not path.is_file():
                missing.append((what, path, component))

        if "pulid" in wanted:
            need(self.pulid_checkpoint, f"PuLID-FLUX checkpoint {self.pulid_version}", "pulid")
        if "flux" in wanted:
            missing += [(w, p, "flux") for w, p in self._flux_missing()]
        if "eva" in wanted:
            need(self.eva_checkpoint, "EVA02-CLIP-L-14-336 checkpoint", "eva")
        if "antelopev2" in wanted:
            before = len(missing)
            need(self.antelopev2_detector, "antelopev2 face detector", "antelopev2")
            need(self.antelopev2_recognition, "antelopev2 ArcFace model", "antelopev2")
            if len(missing) > before:
                notes += self._antelopev2_nesting_notes()
        if "facexlib" in wanted:
            need(self.facexlib_detection, "facexlib RetinaFace detector", "facexlib")
            need(self.facexlib_parsing, "facexlib BiSeNet face parser", "facexlib")
        if "safety-checker" in wanted:
            for name in ("config.json", "preprocessor_config.json"):
                need(self.safety_checker_dir / name, f"safety checker {name}", "safety-checker")
            if self.safety_checker_weights is None:
                missing.append(
                    ("safety checker weights", self.safety_checker_dir / SAFETY_CHECKER_WEIGHTS[0], "safety-checker")
                )
        for _, path, _ in missing:
            name = self._field_for(path)
            if name in self.overridden:
                notes.append(f"{path} was set explicitly ({name}); put the file there or drop the override")
        return missing, notes

    def check(self, components: Optional[Iterable[str]] = None) -> "WeightPaths":
        """Raise :class:`MissingWeightsError` listing every absent file; return ``self`` when all exist."""
        missing, notes = self.missing(components)
        if missing:
            raise MissingWeightsError(
                [(what, path) for what, path, _ in missing],
                weights_dir=self.weights_dir,
                components=[c for _, _, c in missing],
                pulid_version=self.pulid_version,
                notes=notes,
            )
        return self

    def _field_for(self, path: Path) -> Optional[str]:
        values = [(name, getattr(self, name)) for name in self.path_fields()]
        for name, value in values:  # exact file fields first, then the folder holding the path
            if path == value:
                return name
        for name, value in values:
            if value is not None and value in path.parents:
                return name
        return None

    def _flux_missing(self) -> list[tuple[str, Path]]:
        out: list[tuple[str, Path]] = []
        root = self.flux_dir
        if not (root / "model_index.json").is_file():
            out.append(("FLUX.1-dev model_index.json", root / "model_index.json"))
        for sub, (required, weight_stem) in FLUX_SUBFOLDERS.items():
            if sub == "transformer" and self.flux_transformer is not None:
                if not self.flux_transformer.is_file():
                    out.append(("FLUX.1-dev transformer (single file)", self.flux_transformer))
                continue
            if sub == "vae" and self.flux_ae is not None:
                if not self.flux_ae.is_file():
                    out.append(("FLUX.1 autoencoder (single file)", self.flux_ae))
                continue
            for name in required:
                if not (root / sub / name).is_file():
                    out.append((f"FLUX.1-dev {sub}/{name}", root / sub / name))
            if weight_stem is not None:
                out += [(f"FLUX.1-dev {sub} weights", p) for p in _missing_weight_files(root / sub, weight_stem)]
        return out

    def _antelopev2_nesting_notes(self) -> list[str]:
        # Where the files land when they are unpacked one level off (PuLID#146).
        notes = []
        candidates = (
            self.antelopev2_root,
            self.antelopev2_root / ANTELOPEV2_NAME,
            self.antelopev2_dir / ANTELOPEV2_NAME,
        )
        for candidate in candidates:
            if (candidate / ANTELOPEV2_DETECTOR).is_file():
                notes.append(
                    f"antelopev2 files found in {candidate}, but insightface looks in {self.antelopev2_dir} "
                    f"(FaceAnalysis(name='{ANTELOPEV2_NAME}', root='{self.antelopev2_root}')): "
                    "move the .onnx files there"
                )
        return notes


def _missing_weight_files(folder: Path, stem: str) -> list[Path]:
    """Shards named by a safetensors index that are absent, or the single weights file if there is none."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError):
            return [indexes[0]]  # unreadable index: treat as incomplete
        return [folder / name for name in sorted(set(weight_map.values())) if not (folder / name).is_file()]
    if any(folder.glob("*.safetensors")):
        return []
    return [folder / f"{stem}.safetensors"]


def _validate_components(components: Optional[Iterable[str]]) -> list[str]:
    if components is None:
        return list(COMPONENTS)
    wanted = list(components)
    unknown = [c for c in wanted if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; choose from {', '.join(COMPONENTS)}")
    return wanted


# ----------------------------------------------------------------------------- plain HTTP with resume


class _Incomplete(Exception):
    """The transfer ended early; the .part file is kept for the next attempt."""


def fetch_url(
    url: str,
    dest: Path | str,
    *,
    expected_size: Optional[int] = None,
    force: bool = False,
    max_retries: int = HTTP_MAX_RETRIES,
    retry_backoff_s: float = HTTP_RETRY_BACKOFF_S,
    connect_timeout_s: float = HTTP_CONNECT_TIMEOUT_S,
    read_timeout_s: float = HTTP_READ_TIMEOUT_S,
    progress: bool = True,
    headers: Optional[dict[str, str]] = None,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming with an HTTP Range request.

    A file at ``dest`` is complete by construction (it is only renamed there after its size was
    verified), so it is not fetched again unless ``force``. ``headers`` (e.g. the hub token) go to
    ``url`` only: httpx drops ``Authorization`` when a redirect leaves its host.
    """
    import httpx

    dest = Path(dest)
    part = dest.with_name(dest.name + PART_SUFFIX)
    if dest.is_file() and not force:
        logger.info("already present: %s", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if force:
        part.unlink(missing_ok=True)

    timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
    attempt = 0
    # identity: the bytes counted and resumed are the file's, not a compressed stream's
    headers = {"Accept-Encoding": "identity", **(headers or {})}
    with httpx.Client(timeout=timeout, follow_redirects=True, headers=headers) as client, _exclusive(part):
        while True:
            try:
                _fetch_once(client, url, part, progress=progress, label=dest.name)
                break
            except httpx.ConnectError as exc:
                # No connection at all (DNS, refused, proxy): waiting and retrying rarely helps.
                raise DownloadError(
                    f"cannot connect for {url} ({exc}); check the network / proxy, "
                    f"or place the file at {dest} yourself"
                ) from exc
            except (httpx.TransportError, _Incomplete, _RetryableStatus) as exc:
                attempt += 1
                have = part.stat().st_size if part.exists() else 0
                if attempt > max_retries:
                    kept = f"; {have} bytes are kept in {part}: run the command again to resume" if have else ""
                    raise DownloadError(f"download of {url} failed ({exc}){kept}") from exc
                wait = min(retry_backoff_s * 2 ** (attempt - 1), HTTP_RETRY_BACKOFF_MAX_S)
                logger.warning("%s: %s; resuming from byte %d in %.0f s", dest.name, exc, have, wait)
                time.sleep(wait)
            except httpx.HTTPStatusError as exc:
                raise DownloadError(f"download of {url} failed: HTTP {exc.response.status_code}") from exc

    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink()
        raise DownloadError(f"{url} gave {size} bytes, expected {expected_size}; the partial file was removed")
    os.replace(part, dest)
    return dest


class _RetryableStatus(Exception):
    pass


@contextlib.contextmanager
def _exclusive(part: Path):
    """Hold an advisory lock on ``part`` so two downloads never append to the same file. The lock
    goes with the process, so nothing stale is left behind when it dies."""
    import fcntl

    with open(part, "ab") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(f"another download is writing {part}; wait for it to finish") from None
        try:
            yield
        finally:
            if part.exists() and part.stat().st_size == 0:
                part.unlink()  # nothing to resume from: leave no litter


def _fetch_once(client, url: str, part: Path, *, progress: bool, label: str) -> None:
    from tqdm.auto import tqdm

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with client.stream("GET", url, headers=headers) as response:
        status = response.status_code
        if status == 416 and have:
            # Range starts at/after the end: the .part may already hold everything.
            total = _content_range_total(response.headers.get("content-range"))
            if total == have:
                return
            os.truncate(part, 0)  # truncated, not removed: the lock is on this file
            raise _Incomplete(f"server rejected resuming at byte {have}; starting over")
        if status >= 500 or status == 429:
            raise _RetryableStatus(f"HTTP {status}")
        response.raise_for_status()
        if status == 206:
            start = _content_range_start(response.headers.get("content-range"))
            if start != have:
                os.truncate(part, 0)
                raise _Incomplete(f"server resumed at byte {start}, not {have}; starting over")
            total = _content_range_total(response.headers.get("content-range"))
            mode = "ab"
        else:  # 200: the server ignored the Range header, so the body is the whole file
            have = 0
            length = response.headers.get("content-length")
            total = int(length) if length is not None else None
            mode = "wb"
        with open(part, mode) as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not progress
        ) as bar:
            # No chunk size: a re-chunking buffer would lose its bytes when the connection drops.
            for chunk in response.iter_bytes():
                out.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Incomplete(f"got {size} of {total} bytes")


def _content_range_total(value: Optional[str]) -> Optional[int]:
    # "bytes 100-199/200" or "bytes */200"
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _content_range_start(value: Optional[str]) -> Optional[int]:
    if not value:
        return None
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


# ----------------------------------------------------------------------------- Hugging Face


def _network_errors() -> tuple[type, ...]:
    """Exceptions that mean "the hub could not be reached" (huggingface_hub 2.x talks httpx2)."""
    import httpx

    errors: list[type] = [OSError, httpx.TransportError]
    try:
        import httpx2

        errors.append(httpx2.TransportError)
    except ImportError:
        pass
    return tuple(errors)


def gated_repo_steps(repo_id: str, token_given: bool) -> str:
    url = f"https://huggingface.co/{repo_id}"
    if token_given:
        return (
            f"{repo_id} is gated and the account of the token you gave has no access yet: log in to "
            f"{url} as that account, accept the licence, and run this command again"
        )
    return (
        f"{repo_id} is gated: Hugging Face serves it only to accounts that accepted its licence.\n"
        f"  1. log in at {url} and accept the licence\n"
        "  2. create a read token at https://huggingface.co/settings/tokens\n"
        "  3. export HF_TOKEN=hf_... (or pass --token hf_...) and run this command again"
    )


def _hf_error(
    exc: BaseException, repo_id: str, what: str, dest: Path, token_given: bool, endpoint: Optional[str] = None
) -> DownloadError:
    """Turn huggingface_hub's exceptions into a message that says what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return DownloadError(gated_repo_steps(repo_id, token_given))
    if isinstance(exc, OfflineModeIsEnabled):
        return DownloadError(
            f"cannot fetch {what} from {repo_id}: Hugging Face offline mode is on (HF_HUB_OFFLINE). "
            f"Unset HF_HUB_OFFLINE on a machine with internet access, or copy the file(s) to {dest}"
        )
    if isinstance(exc, RevisionNotFoundError):
        return DownloadError(
            f"{repo_id} has no commit matching the pinned revision (HF_SOURCES in engine/download.py, or --revision)"
        )
    if isinstance(exc, RepositoryNotFoundError) or (
        isinstance(exc, HfHubHTTPError) and getattr(exc.response, "status_code", None) == 401
    ):
        return DownloadError(
            f"{repo_id} not found or not accessible with the current credentials "
            "(check --token / HF_TOKEN)"
        )
    if isinstance(exc, _network_errors()):
        return DownloadError(
            f"cannot reach the Hugging Face hub ({endpoint or constants.ENDPOINT}) "
            f"to fetch {what} from {repo_id}: {exc}. "
            f"Check the network / HF_ENDPOINT, or copy the file(s) to {dest}"
        )
    return DownloadError(f"fetching {what} from {repo_id} failed: {exc}")


def _hf_guard(repo_id: str, what: str, dest: Path, token, call: Callable, endpoint: Optional[str] = None):
    try:
        return call()
    except DownloadError:
        raise
    except Exception as exc:  # mapped to a clear message; the original stays chained
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        if isinstance(exc, (HfHubHTTPError, OfflineModeIsEnabled, *_network_errors())):
            raise _hf_error(exc, repo_id, what, dest, token_given=bool(token), endpoint=endpoint) from exc
        raise


# ----------------------------------------------------------------------------- components


@dataclass
class _File:
    url: str
    dest: Path
    size: Optional[int]
    headers: Optional[dict[str, str]] = None


def download_weights(
    dest: Path | str | None = None,
    *,
    components: Optional[Iterable[str]] = None,
    pulid_versions: Sequence[str] = (DEFAULT_PULID_VERSION,),
    token: Optional[str] = None,
    force: bool = False,
    endpoint: Optional[str] = None,
    facexlib_files: Optional[dict[str, tuple[str, Optional[int]]]] = None,
    progress: bool = True,
    revisions: Optional[dict[str, str]] = None,
    free_space_margin_bytes: Optional[int] = None,
) -> WeightPaths:
    """Fetch the requested components into ``dest`` and return the resulting :class:`WeightPaths`.

    First every component's file list is asked for (at its pinned revision, ``HF_SOURCES``; a
    ``revisions`` entry moves one) and the free disk space is checked against what is still to
    fetch; then the files are fetched. Every component is attempted; failures are collected and
    raised together as one :class:`DownloadError`. ``token=None`` lets huggingface_hub use
    ``HF_TOKEN`` or the stored login. Complete files are not fetched again unless ``force``.
    ``free_space_margin_bytes``: free space wanted beyond the bytes to fetch (default: the
    ``download_free_space_margin_gb`` setting).
    """
    root = Path(dest).expanduser() if dest is not None else default_weights_dir()
    wanted = _validate_components(components)
    for version in pulid_versions:
        if version not in PULID_VERSIONS:
            raise ValueError(f"unknown PuLID version {version!r}; choose from {', '.join(PULID_VERSIONS)}")
    unknown = sorted(set(revisions or {}) - set(HF_SOURCES))
    if unknown:
        raise ValueError(f"no pinned revision for {unknown}; these have one: {', '.join(HF_SOURCES)}")
    paths = WeightPaths.from_dir(root, pulid_versions[0] if pulid_versions else DEFAULT_PULID_VERSION)
    pins = {name: revision for name, (_, revision) in HF_SOURCES.items()} | dict(revisions or {})
    ctx = _Ctx(root, paths, token, force, endpoint, facexlib_files or FACEXLIB_FILES, pulid_versions, pins)

    if free_space_margin_bytes is None:
        from ..config import Settings

        free_space_margin_bytes = int(Settings().download_free_space_margin_gb * 1e9)

    failures: list[str] = []
    plans: dict[str, list[_File]] = {}
    for name in wanted:
        if not force and not ctx.missing(name):
            logger.info("%s: complete, nothing to fetch", name)
            continue
        try:
            plans[name] = _PLANNERS[name](ctx)
        except DownloadError as exc:
            failures.append(f"[{name}] {exc}")
            logger.warning("[%s] failed; going on with the other components", name)
    try:
        _check_free_space(root, [f for files in plans.values() for f in files], force, free_space_margin_bytes)
    except DownloadError as exc:
        raise DownloadError("\n".join([*failures, f"[disk] {exc}"])) from None
    for name, files in plans.items():
        try:
            for f in files:
                fetch_url(f.url, f.dest, expected_size=f.size, force=force, progress=progress, headers=f.headers)
            ctx.verify(name, HF_SOURCES[name][0] if name in HF_SOURCES else name)
        except (DownloadError, OSError) as exc:  # OSError: the weights folder itself (permissions, a full disk)
            failures.append(f"[{name}] {exc}")
            logger.warning("[%s] failed; going on with the other components", name)
    if failures:
        raise DownloadError("\n".join(failures))
    return paths


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _check_free_space(root: Path, files: Sequence[_File], force: bool, margin: int) -> None:
    """Refuse to start when the bytes still to fetch (less what .part files hold) and a margin do
    not fit on the disk of ``root``."""
    import shutil

    needed = 0
    for f in files:
        if f.dest.is_file() and not force:
            continue
        part = f.dest.with_name(f.dest.name + PART_SUFFIX)
        have = part.stat().st_size if part.is_file() and not force else 0
        needed += max(0, (f.size or 0) - have)
    if not needed:
        return
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + margin > free:
        raise DownloadError(
            f"not enough free disk space in {root}: {_gb(needed)} to fetch plus a {_gb(margin)} margin "
            f"(PULID_FLUX_DOWNLOAD_FREE_SPACE_MARGIN_GB), but {_gb(free)} free. "
            "Free some space or choose another --dest"
        )
    logger.info("%s to fetch into %s (%s free)", _gb(needed), root, _gb(free))


@dataclass
class _Ctx:
    root: Path
    paths: WeightPaths
    token: Optional[str]
    force: bool
    endpoint: Optional[str]
    facexlib_files: dict
    pulid_versions: Sequence[str]
    revisions: dict[str, str]
    _listings: dict = field(default_factory=dict)

    def missing(self, component: str) -> list:
        if component == "pulid":  # every requested version, not only the first
            files = [self.root / PULID_SUBDIR / PULID_FILENAME.format(version=v) for v in self.pulid_versions]
            return [f for f in files if not f.is_file()]
        return self.paths.missing([component])[0]

    def listing(self, component: str) -> dict[str, Optional[int]]:
        """File name -> size of the component's repository at its pinned revision."""
        from huggingface_hub import HfApi

        if component not in self._listings:
            repo, revision = HF_SOURCES[component][0], self.revisions[component]
            logger.info("%s: listing %s at %s", component, repo, revision)
            info = _hf_guard(
                repo, component, self.root, self.token,
                lambda: HfApi(endpoint=self.endpoint).model_info(
                    repo, revision=revision, files_metadata=True, token=self.token
                ),
                self.endpoint,
            )
            self._listings[component] = {s.rfilename: s.size for s in info.siblings or []}
        return self._listings[component]

    def hub_files(self, component: str, dest_dir: Path, names: Iterable[str]) -> list[_File]:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        repo, revision = HF_SOURCES[component][0], self.revisions[component]
        listing = self.listing(component)
        names = list(names)
        absent = [n for n in names if n not in listing]
        if absent:
            raise DownloadError(f"{repo} at revision {revision} has no {', '.join(absent)}")
        headers = build_hf_headers(token=self.token)
        return [_File(hf_hub_url(repo, n, revision=revision, endpoint=self.endpoint), dest_dir / n, listing[n],
                      headers) for n in names]

    def verify(self, component: str, source: str) -> None:
        missing = self.missing(component)
        if missing:
            listed = ", ".join(str(m[1] if isinstance(m, tuple) else m) for m in missing)
            raise DownloadError(f"{source} incomplete after download, missing: {listed}")


def _matching(listing: Iterable[str], allow: Sequence[str], ignore: Sequence[str] = ()) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(sorted(listing), allow_patterns=list(allow), ignore_patterns=list(ignore) or None))


def _plan_pulid(ctx: _Ctx) -> list[_File]:
    names = [PULID_FILENAME.format(version=v) for v in ctx.pulid_versions]
    return ctx.hub_files("pulid", ctx.root / PULID_SUBDIR, names)


def _plan_flux(ctx: _Ctx) -> list[_File]:
    from huggingface_hub import HfApi

    # A gated-repo refusal is clearest from the hub's access check, before any listing or file.
    _hf_guard(
        FLUX_REPO, "FLUX.1-dev", ctx.paths.flux_dir, ctx.token,
        lambda: HfApi(endpoint=ctx.endpoint).auth_check(FLUX_REPO, token=ctx.token),
        ctx.endpoint,
    )
    names = _matching(ctx.listing("flux"), FLUX_DIFFUSERS_PATTERNS, FLUX_SINGLE_FILES)
    return ctx.hub_files("flux", ctx.paths.flux_dir, names)


def _plan_eva(ctx: _Ctx) -> list[_File]:
    return ctx.hub_files("eva", ctx.root / EVA_SUBDIR, [EVA_FILENAME])


def _plan_antelopev2(ctx: _Ctx) -> list[_File]:
    names = _matching(ctx.listing("antelopev2"), ANTELOPEV2_PATTERNS)
    return ctx.hub_files("antelopev2", ctx.paths.antelopev2_dir, names)


def _plan_facexlib(ctx: _Ctx) -> list[_File]:
    return [_File(url, ctx.root / FACEXLIB_SUBDIR / name, size) for name, (url, size) in ctx.facexlib_files.items()]


def _plan_safety_checker(ctx: _Ctx) -> list[_File]:
    names = _matching(ctx.listing("safety-checker"), SAFETY_CHECKER_PATTERNS)
    if not any(n.endswith(".safetensors") for n in names):
        logger.info("no safetensors weights in %s; fetching %s", SAFETY_CHECKER_REPO, SAFETY_CHECKER_FALLBACK)
        names.append(SAFETY_CHECKER_FALLBACK)
    return ctx.hub_files("safety-checker", ctx.paths.safety_checker_dir, names)


_PLANNERS: dict[str, Callable[[_Ctx], list[_File]]] = {
    "pulid": _plan_pulid,
    "flux": _plan_flux,
    "eva": _plan_eva,
    "antelopev2": _plan_antelopev2,
    "facexlib": _plan_facexlib,
    "safety-checker": _plan_safety_checker,
}


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dest",
        metavar="DIR",
        default=None,
        help=f"weights directory (default: ${WEIGHTS_DIR_ENV} or {DEFAULT_WEIGHTS_DIR})",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="Hugging Face token (default: HF_TOKEN or the stored `hf auth login`); "
        f"FLUX.1-dev is gated, accept its licence at {FLUX_LICENCE_URL} first",
    )
    parser.add_argument(
        "--pulid-version",
        choices=[*PULID_VERSIONS, "all"],
        default=DEFAULT_PULID_VERSION,
        help=f"PuLID-FLUX checkpoint(s) to fetch (default: {DEFAULT_PULID_VERSION})",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=COMPONENTS,
        metavar="COMPONENT",
        help=f"fetch only this component (repeatable): {', '.join(COMPONENTS)}",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="fetch again even files already present (and drop partial .part files)",
    )
    parser.add_argument(
        "--revision",
        action="append",
        default=[],
        metavar="COMPONENT=COMMIT",
        help="fetch a component at another commit than its pin in HF_SOURCES (repeatable), "
        f"for: {', '.join(HF_SOURCES)}",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parse_revisions(values: Sequence[str]) -> dict[str, str]:
    revisions = {}
    for value in values:
        component, sep, revision = value.partition("=")
        if not sep or component not in HF_SOURCES or not revision:
            raise DownloadError(f"--revision {value}: expected COMPONENT=COMMIT with COMPONENT one of "
                                f"{', '.join(HF_SOURCES)}")
        revisions[component] = revision
    return revisions


def run(args: argparse.Namespace) -> int:
    if not logger.handlers and not logging.getLogger().handlers:
        # Only this module's messages; httpx would log every request at INFO.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    versions = list(PULID_VERSIONS) if args.pulid_version == "all" else [args.pulid_version]
    dest = Path(args.dest).expanduser() if args.dest else default_weights_dir()
    try:
        paths = download_weights(
            dest,
            components=args.only,
            pulid_versions=versions,
            token=args.token,
            force=args.force,
            progress=not args.no_progress,
            revisions=_parse_revisions(args.revision),
        )
    except DownloadError as exc:
        raise DownloadError(f"some weights could not be fetched into {dest}:\n{exc}") from None
    print(f"weights ready in {paths.weights_dir}", file=sys.stderr)
    return 0
