"""The command line as a user meets it: one-line errors, --version, help on every option, inputs
checked before a model loads, the default model, a busy port refused before any worker starts."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from pulid_flux import __version__
from pulid_flux.cli import build_parser, main


def _cli(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pulid_flux.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_option_of_every_command_has_help():
    commands = _subcommands()
    assert set(commands) == {"generate", "download", "check-parity", "serve", "worker", "make-cert"}
    for name, parser in commands.items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:  # internal (serve -> worker) only
                assert action.option_strings == ["--parent-pid"], (name, action.option_strings)
                continue
            assert action.help and action.help.strip(), (name, action.option_strings or action.dest)
            if action.option_strings and action.default not in (None, False, "", [], argparse.SUPPRESS):
                shown = parser._get_formatter()._get_help_string(action)
                assert "default" in shown, (name, action.option_strings)


def test_help_shows_defaults():
    text = _subcommands()["generate"].format_help()
    assert "denoising steps (default: 20)" in " ".join(text.split())
    assert "FLUX distilled guidance (default: 4.0)" in " ".join(text.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "default: flux-dev with a CUDA GPU, else tiny" in " ".join(text.split())


def test_version():
    done = _cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"pulid-flux {__version__}"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a command gets as far as loading a model."""
    from pulid_flux.engine.pipeline import PuLIDFluxPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(PuLIDFluxPipeline, "from_preset", refuse)


@pytest.fixture
def face_png(tmp_path):
    path = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (200, 150, 120)).save(path)
    return path


def _generate(tmp_path, *extra: str, reference=None, out=None) -> list[str]:
    return ["generate", "--model", "tiny", "--prompt", "a portrait", "--reference", str(reference),
            "--out", str(out or tmp_path / "out.png"), *extra]


@pytest.mark.parametrize("case, expected", [
    ("missing reference", "--reference {missing}: no such file"),
    ("not an image", "--reference {text}: the file is not a supported image"),
    ("bad suffix", "--out {bad_out}: the file name must end in .jpg"),
    ("width alone", "--width and --height go together"),
    ("too many steps", "--steps: Input should be less than or equal to 50"),
    ("out under a file", "cannot create {text}"),
])
def test_generate_checks_its_inputs_before_loading_the_model(case, expected, tmp_path, face_png, no_model_load,
                                                             capsys):
    missing, text = tmp_path / "nope.png", tmp_path / "notes.txt"
    text.write_text("not an image")
    bad_out = tmp_path / "out.gif"
    argv = {
        "missing reference": _generate(tmp_path, reference=missing),
        "not an image": _generate(tmp_path, reference=text),
        "bad suffix": _generate(tmp_path, reference=face_png, out=bad_out),
        "width alone": _generate(tmp_path, "--width", "512", reference=face_png),
        "too many steps": _generate(tmp_path, "--steps", "500", reference=face_png),
        "out under a file": _generate(tmp_path, reference=face_png, out=text / "out.png"),
    }[case]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("pulid-flux: error: ") and err.count("\n") == 1, err
    assert expected.format(missing=missing, text=text, bad_out=bad_out) in err


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    argv = _generate(tmp_path, reference=tmp_path / "nope.png")
    done = _cli(*argv)
    assert done.returncode == 1
    assert done.stderr == f"pulid-flux: error: --reference {tmp_path / 'nope.png'}: no such file\n"
    debug = _cli(*argv, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "InputError" in debug.stderr


def test_generate_default_model_is_chosen_like_serve(tmp_path, face_png, monkeypatch):
    import torch

    from pulid_flux.engine.pipeline import PuLIDFluxPipeline

    chosen = []

    def record(model, **options):
        chosen.append(model)
        raise KeyboardInterrupt  # stop here: the choice is what is tested

    monkeypatch.setattr(PuLIDFluxPipeline, "from_preset", record)
    argv = ["generate", "--prompt", "a portrait", "--reference", str(face_png), "--out", str(tmp_path / "o.png")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(argv) == 130
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv) == 130
    assert chosen == ["flux-dev", "tiny"]


def test_weight_path_settings_reach_the_flux_dev_loader(tmp_path, face_png, monkeypatch, capsys):
    # PULID_FLUX_<FIELD> is read when flux-dev loads: the missing single file it names is reported.
    bfl = tmp_path / "bfl" / "flux1-dev.safetensors"
    monkeypatch.setenv("PULID_FLUX_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("PULID_FLUX_FLUX_TRANSFORMER", str(bfl))
    monkeypatch.setenv("PULID_FLUX_PULID_VERSION", "v0.9.0")
    argv = ["generate", "--model", "flux-dev", "--device", "cpu", "--prompt", "a portrait",
            "--reference", str(face_png), "--out", str(tmp_path / "o.png")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("pulid-flux: error: missing weight file(s):")
    assert str(bfl) in err and "set explicitly (flux_transformer)" in err
    assert "pulid_flux_v0.9.0.safetensors" in err
    assert f"pulid-flux download --dest {tmp_path / 'weights'}" in err


def test_serve_refuses_a_busy_port_before_any_worker_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        done = _cli("serve", "--port", str(port), "--data-dir", str(tmp_path), "--model", "tiny",
                    "--log-level", "info", timeout=60)
    assert done.returncode == 1
    assert f"pulid-flux: error: cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "started worker" not in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 60


def test_a_setting_out_of_bounds_is_one_line(tmp_path, capsys):
    assert main(["serve", "--port", "70000", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pulid-flux: error: invalid setting: port: Input should be less than or equal to 65535")
    assert err.count("\n") == 1
