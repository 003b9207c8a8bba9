import argparse
import shutil
from pathlib import Path

from pulid_flux.engine import parity
from reference import reference_dir

FIXTURES = reference_dir()


def check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parity.add_arguments(parser)
    return parity.run(parser.parse_args(argv))


def test_arguments():
    parser = argparse.ArgumentParser()
    parity.add_arguments(parser)
    args = parser.parse_args(["some/dir"])
    assert args.dir == Path("some/dir") and args.tolerance == 1e-4


def test_check_parity_command_passes_on_reference_fixtures(capsys):
    from pulid_flux.cli import main

    assert main(["check-parity", str(FIXTURES)]) == 0
    out = capsys.readouterr().out
    for case in parity.CASES:
        assert case in out
    assert "FAIL" not in out.replace("FAILED: ", "") and "ERROR" not in out
    assert out.count("ok (tol") >= 30
    assert "PASSED: 7 case(s), 0 failure(s)" in out


def test_corrupted_fixture_fails(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    for name in ("idformer", "flux_weights", "flux_forward"):
        for ext in ("json", "safetensors"):
            shutil.copy(FIXTURES / f"{name}.{ext}", tmp_path / f"{name}.{ext}")
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
