import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from pulid_flux.engine import parity
from pulid_flux.engine.pipeline import to_uint8
from reference import reference_dir

FIXTURES = reference_dir()
PUBLIC_CASES = ("idformer", "flux_forward", "denoise", "denoise_nocfg", "denoise_odd_size", "eva", "face_features",
                "pipeline")


def check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parity.add_arguments(parser)
    return parity.run(parser.parse_args(argv))


def copy_case(name: str, dest: Path, as_name: str | None = None, **json_overrides) -> None:
    meta = json.loads((FIXTURES / f"{name}.json").read_text()) | json_overrides
    (dest / f"{as_name or name}.json").write_text(json.dumps(meta))
    shutil.copy(FIXTURES / f"{name}.safetensors", dest / f"{as_name or name}.safetensors")


def test_arguments():
    parser = argparse.ArgumentParser()
    parity.add_arguments(parser)
    args = parser.parse_args(["some/dir"])
    assert args.dir == Path("some/dir") and args.tolerance == 1e-4


def test_math_path_is_pinned_for_the_suite():
    assert os.environ["MKL_ENABLE_INSTRUCTIONS"] == parity.MKL_MATH_PATH


def test_check_parity_command_passes_on_reference_fixtures(capsys):
    from pulid_flux.cli import main

    assert main(["check-parity", str(FIXTURES)]) == 0
    out = capsys.readouterr().out
    for case in PUBLIC_CASES:
        assert case in out
    assert "FAIL" not in out.replace("FAILED: ", "") and "ERROR" not in out
    assert out.count("ok (tol") >= 34
    # the whole pipeline: latents, the VAE decode from BFL ae weights, and the uint8 image
    for line in ("final_latents_unpacked", "decoded", "image (bytes off outside boundary)"):
        assert any(l.startswith("pipeline") and line in l and " ok " in l for l in out.splitlines()), line
    assert "PASSED: 8 case(s), 0 failure(s)" in out


def test_every_case_runs_by_kind_and_an_unknown_kind_fails(tmp_path, capsys):
    for name in ("idformer", "flux_weights"):
        copy_case(name, tmp_path)
    copy_case("denoise_nocfg", tmp_path, as_name="denoise_renamed")  # kind from the name's prefix
    copy_case("idformer", tmp_path, as_name="sparkles", kind="sparkles")  # a kind nobody checks
    assert check([str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(l.startswith("denoise_renamed") and "final_latents" in l and " ok " in l for l in lines)
    assert any(l.startswith("sparkles") and "ERROR" in l and "unknown kind" in l for l in lines)
    assert "FAILED: 3 case(s), 1 failure(s)" in lines[-1]


def test_pipeline_case_catches_a_wrong_pixel_path(tmp_path, capsys, monkeypatch):
    from pulid_flux.engine import pipeline

    for name in ("idformer", "flux_weights", "ae_weights", "pipeline"):
        copy_case(name, tmp_path)
    # rounding instead of the official truncation moves thousands of bytes outside the boundary mask
    monkeypatch.setattr(pipeline, "to_uint8", lambda x: (127.5 * (x.clamp(-1, 1) + 1)).round().to(torch.uint8))
    assert check([str(tmp_path), "--cases", "pipeline"]) == 1
    line = next(l for l in capsys.readouterr().out.splitlines() if "bytes off" in l)
    assert "FAIL" in line and float(line.split("max_abs=")[1].split()[0]) > 1000


def test_pixels_are_converted_in_the_decoders_dtype():
    # 127.5 * (x + 1) = 200.7: truncated in fp32, but in bf16 it first lands on 201 (bf16's grid)
    x = torch.tensor([200.7 / 127.5 - 1])
    assert to_uint8(x).item() == 200
    assert to_uint8(x.bfloat16()).item() == 201
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_corrupted_fixture_fails(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    for name in ("idformer", "flux_weights", "flux_forward"):
        copy_case(name, tmp_path)
    path = tmp_path / "flux_forward.safetensors"
    tensors = load_file(str(path))
    tensors["pred_id"][0, 5, 7] += 1e-3  # 10x the tolerance, on one element
    save_file(tensors, str(path))

    assert check([str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any("pred_id" in line and "FAIL" in line for line in lines)
    assert any("pred_noid" in line and line.rstrip().endswith("(tol 0.0001)") and " ok " in line for line in lines)
    assert any("id_embedding" in line and " ok " in line for line in lines)
    # a looser tolerance accepts the same files
    assert check([str(tmp_path), "--tolerance", "2e-3"]) == 0
    # a requested case without fixture files is an error, not a silent pass
    assert check([str(tmp_path), "--cases", "eva"]) != 0


def test_not_a_fixture_dir(tmp_path):
    assert check([str(tmp_path)]) != 0
    assert check([str(tmp_path / "nope")]) != 0


def test_command_pins_the_math_path_before_torch_loads(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MKL_ENABLE_INSTRUCTIONS"}
    code = ("import os, sys; from pulid_flux.cli import main; main(['check-parity', sys.argv[1]]); "
            "print(os.environ.get('MKL_ENABLE_INSTRUCTIONS'), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.splitlines()[-1] == f"{parity.MKL_MATH_PATH} True", done.stdout + done.stderr
    assert "note: torch was loaded" not in done.stdout
