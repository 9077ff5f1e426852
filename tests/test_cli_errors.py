"""Every bad checkpoint, recipe or flag ends in one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import os

import pytest
import torch

from gradharmony.uda.cli import main
from gradharmony.uda.config import ConfigError
from processes import python_env, run_python


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


def test_unknown_resize_filter_in_a_recipe(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: dann\nresize_filter: bicubc\n")
    code, err = run_cli(["train", "--config", recipe], capsys)
    assert_one_line_error(code, err, str(recipe), "unknown resize_filter 'bicubc'", "did you mean 'bicubic'")


def test_unknown_flag_suggests_the_nearest(capsys):
    code, err = run_cli(["train", "--stepz", "10"], capsys)
    assert_one_line_error(code, err, "unrecognized arguments", "--steps")


def test_unknown_device(capsys):
    code, err = run_cli(["train", "--device", "gpu", "--steps", "1"], capsys)
    assert_one_line_error(code, err, "unknown device 'gpu'")


def test_python_m_gradharmony_reports_a_corrupt_checkpoint_without_traceback(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip archive")
    done = run_python("-m", "gradharmony", "eval", "--checkpoint", str(path), cwd=tmp_path, env=python_env())
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"gradharmony: error: cannot read checkpoint {path}: the file is truncated or not a checkpoint"
    ]


# ---------------------------------------------------------------------- one error path


def test_an_out_under_a_file_is_one_line_naming_the_path_and_nothing_is_written(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    code, err = run_cli(["train", "--out", out, "--steps", "1", "--device", "cpu"], capsys)
    assert_one_line_error(code, err, f"--out {out}", f"{blocker} is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and blocker.read_text() == "not a folder"


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("")
    code, err = run_cli(["train", "--out", out, "--device", "cpu"], capsys)
    assert_one_line_error(code, err, f"--out {out} is a file, not a folder")


def _train_raising(monkeypatch, error: BaseException) -> None:
    """Make ``gradharmony train`` fail inside training with ``error``."""
    import gradharmony.uda.engine

    def train(cfg):
        raise error

    monkeypatch.setattr(gradharmony.uda.engine, "train", train)


TRAIN = ["train", "--device", "cpu", "--no-progress", "--steps", "1"]


@pytest.mark.parametrize(
    "error, fragments",
    [
        (
            PermissionError(13, "Permission denied", "/data/runs/x/metrics.jsonl"),
            ["/data/runs/x/metrics.jsonl", "Permission denied"],
        ),
        (NotADirectoryError(20, "Not a directory", "/tmp/f/run"), ["cannot use /tmp/f/run: Not a directory"]),
        (FileExistsError(17, "File exists", "/tmp/run/last.pt"), ["/tmp/run/last.pt", "File exists"]),
        (IsADirectoryError(21, "Is a directory", "/tmp/run/config.yaml"), ["/tmp/run/config.yaml", "Is a directory"]),
        (OSError(30, "Read-only file system", "/mnt/ro/run"), ["/mnt/ro/run", "Read-only file system"]),
        (
            FileNotFoundError(2, "No such file or directory", "/proc/x"),
            ["cannot use /proc/x: No such file or directory"],
        ),
    ],
    ids=["permission", "not-a-directory", "exists", "is-a-directory", "read-only", "missing"],
)
def test_file_system_errors_are_one_line_naming_the_path_and_the_reason(
    error, fragments, tmp_path, monkeypatch, capsys
):
    _train_raising(monkeypatch, error)
    code, err = run_cli([*TRAIN, "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, *fragments)


def test_a_busy_run_folder_is_one_line_naming_the_holder(tmp_path, monkeypatch, capsys):
    from gradharmony.uda.runs import RunFolderBusy

    out = tmp_path / "run"
    _train_raising(monkeypatch, RunFolderBusy(f"{out} is being written by another process (PID 4242); wait for it"))
    code, err = run_cli([*TRAIN, "--out", out], capsys)
    assert_one_line_error(code, err, str(out), "PID 4242")


def test_a_busy_run_folder_really_held(tmp_path, capsys):
    """A second writer of a folder whose lock this process holds: refused in one line, with the PID."""
    from fakes.digits import write_fake_data_root
    from gradharmony.uda.runs import RunFolderLock

    root = write_fake_data_root(tmp_path / "data", count=24)
    out = tmp_path / "run"
    args = [
        "--source",
        "usps",
        "--target",
        "mnistm",
        "--data-root",
        root,
        "--image-size",
        "16",
        "--channels",
        "1",
        "--batch-size",
        "8",
    ]
    with RunFolderLock(out):
        code, err = run_cli([*TRAIN, *args, "--out", out, "--method-param", "disc_hidden=16"], capsys)
    assert_one_line_error(code, err, str(out), f"PID {os.getpid()}")


def test_divergence_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from gradharmony.uda.engine import TrainingDiverged

    last = tmp_path / "run" / "last.pt"
    _train_raising(
        monkeypatch, TrainingDiverged(f"non-finite loss at step 12.\nThe last good checkpoint is {last} (step 10)")
    )
    code, err = run_cli([*TRAIN, "--out", tmp_path / "run"], capsys)
    assert_one_line_error(
        code, err, "training diverged: non-finite loss at step 12.", f"checkpoint is {last} (step 10)"
    )


def test_dataset_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from gradharmony.uda.data import DatasetFormatError, DatasetNotFoundError

    _train_raising(monkeypatch, DatasetFormatError(tmp_path / "usps.h5", "HDF5", OSError("truncated file:\n eof 12")))
    code, err = run_cli([*TRAIN, "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, f"cannot read {tmp_path / 'usps.h5'} (expected HDF5)", "truncated file: eof 12")
    _train_raising(
        monkeypatch,
        DatasetNotFoundError("dataset 'usps' not found. Looked at:\n  /a/usps.h5\n  /b/usps.bz2\nGet it: here"),
    )
    code, err = run_cli([*TRAIN, "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "dataset 'usps' not found. Looked at: /a/usps.h5; /b/usps.bz2; Get it: here")


def test_a_missing_dataset_is_one_line_listing_the_paths(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["train", "--source", "usps", "--target", "mnistm", "--data-root", empty, "--out", tmp_path / "run"]
    code, err = run_cli([*args, "--device", "cpu", "--no-progress"], capsys)
    assert_one_line_error(code, err, "usps", str(empty / "usps"))


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, tmp_path, capsys):
    args = ["train", "--lr", "nan", "--out", str(tmp_path / "run")]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    with pytest.raises(ConfigError, match="lr must be a finite number > 0"):
        main(args)
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback_of_a_checkpoint_error(tmp_path):
    from gradharmony.uda.engine import CheckpointError

    path = tmp_path / "corrupt.pt"
    path.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError):
        main(["eval", "--checkpoint", str(path), "--debug"])


def test_an_unexpected_exception_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    _train_raising(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main([*TRAIN, "--out", str(tmp_path / "run")])
    _train_raising(monkeypatch, KeyError("a bug"))
    with pytest.raises(KeyError):
        main([*TRAIN, "--out", str(tmp_path / "run")])


def test_an_already_finished_run_prints_its_stored_result(tmp_path, monkeypatch, capsys):
    import gradharmony.uda.engine

    summary = {
        "already_finished": True,
        "steps": 300,
        "last_target_acc": 0.7723,
        "best_target_acc": 0.781,
        "best_step": 200,
    }
    monkeypatch.setattr(gradharmony.uda.engine, "train", lambda cfg: summary)
    out = tmp_path / "run"
    code = main(
        [
            *TRAIN,
            "--out",
            str(out),
            "--method",
            "mcc",
            "--harmonizer",
            "gh++",
            "--seed",
            "3",
            "--source",
            "usps",
            "--target",
            "mnist",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == (
        "already finished: mcc+gh++ usps->mnist seed 3, 300 steps: target accuracy last 77.23%, best 78.10% "
        f"(step 200, selected on target test labels); nothing was changed in {out}"
    )


def test_python_m_gradharmony_refuses_nan_in_one_line_and_writes_nothing(tmp_path):
    env = python_env()
    out = tmp_path / "run"
    command = ["-m", "gradharmony", "train", "--lr", "nan", "--out", str(out)]
    done = run_python(*command, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["gradharmony: error: lr must be a finite number > 0, got nan"]
    assert done.stdout == "" and not out.exists()
    done = run_python(*command, "--debug", cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ConfigError: lr must be a finite number > 0, got nan" in done.stderr
    assert not out.exists()
