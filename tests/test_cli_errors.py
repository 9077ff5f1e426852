"""Every bad checkpoint, recipe or flag ends in one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gradharmony.uda.cli import main


def run_cli(args, capsys) -> tuple[int, str]:
    """Run the command line in-process: ``(exit status, stderr)``."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse refuses a flag by exiting
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("gradharmony: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


class RunsCode:
    """Pickles as a call to ``os.system``: what a booby-trapped checkpoint carries."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def checkpoint(tmp_path):
    """A well-formed checkpoint file (tensors and plain values), to corrupt or truncate."""
    path = tmp_path / "good.pt"
    torch.save({"step": 4, "config": {"method": "dann"}, "model": {"w": torch.randn(64, 64)}}, path)
    return path


def test_corrupt_checkpoint(tmp_path, capsys):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(os.urandom(4096))
    code, err = run_cli(["eval", "--checkpoint", path], capsys)
    assert_one_line_error(code, err, f"cannot read checkpoint {path}", "truncated or not a checkpoint")


def test_truncated_checkpoint(checkpoint, capsys):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    code, err = run_cli(["eval", "--checkpoint", checkpoint], capsys)
    assert_one_line_error(code, err, f"cannot read checkpoint {checkpoint}", "truncated")


def test_checkpoint_carrying_code_is_refused_and_nothing_runs(tmp_path, capsys):
    witness = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "config": {}, "model": RunsCode(f"touch {witness}")}, path)
    code, err = run_cli(["eval", "--checkpoint", path], capsys)
    assert_one_line_error(code, err, f"refusing to load checkpoint {path}", "system")
    assert not witness.exists()


def test_missing_checkpoint(tmp_path, capsys):
    path = tmp_path / "nowhere" / "last.pt"
    code, err = run_cli(["eval", "--checkpoint", path], capsys)
    assert_one_line_error(code, err, f"checkpoint {path} does not exist")


def test_a_checkpoint_that_is_not_a_run(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, path)  # readable, but no run configuration
    code, err = run_cli(["eval", "--checkpoint", path], capsys)
    assert_one_line_error(code, err, "not a gradharmony run checkpoint")


def test_recipe_with_an_unknown_key(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: dann\nlearning_rate: 0.1\n")
    code, err = run_cli(["train", "--config", recipe], capsys)
    assert_one_line_error(code, err, str(recipe), "unknown config key 'learning_rate'")


def test_recipe_with_a_value_of_the_wrong_type(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: dann\nsteps: ten\n")
    code, err = run_cli(["train", "--config", recipe], capsys)
    assert_one_line_error(code, err, str(recipe), "steps must be an integer", "'ten'")


def test_recipe_that_is_not_yaml(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: dann\nsteps: [10\n")
    code, err = run_cli(["train", "--config", recipe], capsys)
    assert_one_line_error(code, err, str(recipe), "not valid YAML", "line")


def test_unknown_method_on_the_command_line(capsys):
    code, err = run_cli(["train", "--method", "dan"], capsys)
    assert_one_line_error(code, err, "--method", "unknown method 'dan'", "did you mean 'dann'")


def test_unknown_flag_suggests_the_nearest(capsys):
    code, err = run_cli(["train", "--stepz", "10"], capsys)
    assert_one_line_error(code, err, "unrecognized arguments", "--steps")


def test_unknown_device(capsys):
    code, err = run_cli(["train", "--device", "gpu", "--steps", "1"], capsys)
    assert_one_line_error(code, err, "unknown device 'gpu'")


def test_python_m_gradharmony_reports_a_corrupt_checkpoint_without_traceback(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip archive")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gradharmony", "eval", "--checkpoint", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"gradharmony: error: cannot read checkpoint {path}: the file is truncated or not a checkpoint"
    ]
