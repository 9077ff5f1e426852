"""The command line: help for every flag, a tiny end-to-end run on generated folders, clear errors
on bad input, and the demo's pool of runs (see also test_cli_errors.py)."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import yaml

from fakes.digits import write_fake_data_root
from gradharmony.harmonize import MODES
from gradharmony.harmonizer import STRATEGIES
from gradharmony.uda.cli import build_parser, main
from gradharmony.uda.config import NON_OUTCOME_FIELDS, TrainConfig
from gradharmony.uda.methods import METHODS
from gradharmony.uda.runs import read_metrics
from processes import python_env, run_python

TINY = [
    "--image-size",
    "16",
    "--channels",
    "1",
    "--bottleneck-dim",
    "16",
    "--batch-size",
    "8",
    "--method-param",
    "disc_hidden=16",
    "--no-progress",
]


def run_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_train_then_eval_on_generated_usps_and_mnistm_folders(tmp_path, capsys):
    root = write_fake_data_root(tmp_path / "data", count=24)
    out = tmp_path / "run"
    code, text = run_cli(
        [
            "train",
            "--method",
            "dann",
            "--harmonizer",
            "gh++",
            "--source",
            "usps",
            "--target",
            "mnistm",
            "--data-root",
            str(root),
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--out",
            str(out),
            *TINY,
        ],
        capsys,
    )
    assert code == 0, text
    assert text.splitlines()[0].startswith("device: cpu (auto: CUDA not available") or text.startswith("device: cuda")
    assert "finished 4 steps" in text
    assert [r["step"] for r in read_metrics(out)] == [2, 4]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["harmonizer"] == "gh++" and saved["method_params"] == {"disc_hidden": 16}
    code, text = run_cli(["eval", "--checkpoint", str(out / "last.pt"), "--data-root", str(root)], capsys)
    assert code == 0, text
    assert "accuracy" in text and "per class" in text


def test_a_finished_run_started_again_prints_its_result_and_changes_nothing(tmp_path, capsys):
    root = write_fake_data_root(tmp_path / "data", count=24)
    out = tmp_path / "run"
    args = ["train", "--source", "usps", "--target", "mnistm", "--data-root", str(root), "--steps", "2"]
    args += ["--eval-every", "2", "--seed", "1", "--out", str(out), "--device", "cpu", *TINY]
    code, text = run_cli(args, capsys)
    assert code == 0 and "finished 2 steps" in text, text
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, text = run_cli(args, capsys)
    assert code == 0, text
    line = text.strip().splitlines()[-1]
    assert line.startswith("already finished: dann+none usps->mnistm seed 1, 2 steps: target accuracy last "), line
    assert "(step 2, selected on target test labels)" in line and line.endswith(f"nothing was changed in {out}")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_yaml_recipe_with_command_line_override(tmp_path, capsys):
    root = write_fake_data_root(tmp_path / "data", count=24)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "mcc",
                "source": "usps",
                "target": "mnistm",
                "steps": 50,
                "harmonizer": "gh",
                "image_size": 16,
                "channels": 1,
                "bottleneck_dim": 16,
                "batch_size": 8,
            }
        )
    )
    out = tmp_path / "run"
    code, text = run_cli(
        [
            "train",
            "--config",
            str(recipe),
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--data-root",
            str(root),
            "--out",
            str(out),
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, text
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == "mcc" and saved["steps"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--harmonizer", "pcgrad"], "unknown harmonizer mode 'pcgrad'"),
        (["train", "--strategy", "fast"], "unknown strategy 'fast'"),
        (["train", "--amp", "fp8"], "unknown amp 'fp8'"),
        (["train", "--method", "mcd", "--amp", "bf16"], "amp bf16: mcd runs its update phases in full precision"),
        (["train", "--steps", "0"], "steps must be an integer >= 1, got 0"),
        (["train", "--stepz", "10"], "unrecognized arguments"),
        (["train", "--method-param", "oops"], "KEY=VALUE"),
        (["eval", "--checkpoint", "does/not/exist.pt"], "does not exist"),
    ],
)
def test_bad_flags_give_clear_errors(args, message, capsys):
    code, text = run_cli(args, capsys)
    assert code == 2
    assert message in text


def test_unknown_key_in_a_recipe_is_named(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: dann\nlearning_rate: 0.1\n")
    code, text = run_cli(["train", "--config", str(recipe)], capsys)
    assert code == 2 and "unknown config key 'learning_rate'" in text and str(recipe) in text


def test_unknown_method_and_method_param(tmp_path, capsys):
    root = write_fake_data_root(tmp_path / "data", count=24)
    base = [
        "train",
        "--source",
        "usps",
        "--target",
        "mnistm",
        "--data-root",
        str(root),
        "--steps",
        "2",
        "--out",
        str(tmp_path / "run"),
        "--image-size",
        "16",
        "--channels",
        "1",
        "--no-progress",
    ]
    code, text = run_cli([*base, "--method", "dan"], capsys)
    assert code == 2 and "dan" in text and "dann" in text
    code, text = run_cli([*base, "--method", "dann", "--method-param", "disc_hiden=3"], capsys)
    assert code == 2 and "disc_hiden" in text


def test_missing_dataset_folder_says_where_to_put_it(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = run_cli(
        ["train", "--source", "usps", "--target", "mnistm", "--data-root", str(empty), "--out", str(tmp_path / "run")],
        capsys,
    )
    assert code == 2
    assert "usps" in text and str(empty) in text
    errors = [line for line in text.strip().splitlines() if not line.startswith("device: ")]
    assert len(errors) == 1 and "Traceback" not in text  # the paths looked at, on one line


def test_every_config_field_has_help():
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata.get("help", "").strip(), field.name
        assert field.metadata.get("group"), field.name


def _help_of(command: str) -> str:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return " ".join(sub.format_help().split())  # one line: names are not split by wrapping


def test_train_help_explains_every_flag_with_its_choices():
    text = _help_of("train")
    for name in (
        *METHODS,
        *MODES,
        *STRATEGIES,
        "align",
        "cls",
        "bf16",
        "fp16",
        "mnistm-synth",
        "office31:amazon",
        "resnet50",
        "--measure-every",
        "--method-param",
        "--no-progress",
        "--config",
    ):
        assert name in text, name
    for field in dataclasses.fields(TrainConfig):
        if field.name not in ("method_params", "progress"):
            assert "--" + field.name.replace("_", "-") in text, field.name
    assert "(default: auto)" in text  # --device


def test_train_help_lists_overwrite_and_debug():
    text = _help_of("train")
    assert "--overwrite, --no-overwrite start the run over: delete the records and checkpoint" in text
    assert "--debug on an error, show the full traceback" in text
    assert "--debug" in " ".join(build_parser().format_help().split())


@pytest.mark.parametrize("command", ["train", "eval", "sweep", "report", "demo"])
def test_every_flag_of_every_command_has_help(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help and action.help.strip(), (command, action.dest)


def test_device_is_auto_by_default_and_not_part_of_the_run_hash():
    assert TrainConfig().device == "auto"
    assert "device" in NON_OUTCOME_FIELDS
    assert TrainConfig(device="cpu").outcome_hash() == TrainConfig(device="auto").outcome_hash()


def test_demo_pool_reports_progress_and_exits_without_warnings(tmp_path):
    """The demo's pool of runs, on tiny generated data, in a fresh interpreter: it ends cleanly."""
    root = write_fake_data_root(tmp_path / "data", count=24)
    script = textwrap.dedent(f"""
        from pathlib import Path
        from gradharmony.uda import demo
        from gradharmony.uda.config import TrainConfig

        if __name__ == "__main__":
            configs = [TrainConfig(source="usps", target="mnistm", data_root={str(root)!r}, image_size=16,
                                   channels=1, bottleneck_dim=16, batch_size=8, steps=4, eval_every=2,
                                   harmonizer=mode, method_params={{"disc_hidden": 16}}, threads=1,
                                   progress=False, device="cpu", out=str(Path({str(tmp_path)!r}) / mode))
                       for mode in ("none", "gh++")]
            results = demo._train_all(configs, ["DANN", "DANN+GH++"], steps=4, workers=1)
            print("steps", [r["steps"] for r in results])
    """)
    done = run_python("-c", script, cwd=tmp_path, env=python_env(PYTHONWARNINGS="default"), timeout=600)
    assert done.returncode == 0, done.stderr
    assert "steps [4, 4]" in done.stdout
    assert "[DANN+GH++] step 4/4: done" in done.stdout  # not a terminal: one log line per change
    assert "leaked" not in done.stderr and "resource_tracker" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_none_gives_an_optional_flag_its_default_back():
    from gradharmony.uda.cli import config_from_args

    args = build_parser().parse_args(["train", "--threads", "none", "--select-by", "NONE", "--tensorboard", "none"])
    cfg = config_from_args(args)
    assert (cfg.threads, cfg.select_by, cfg.tensorboard) == (None, None, None)
    assert config_from_args(build_parser().parse_args(["train", "--threads", "2"])).threads == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--threads", "two"])
