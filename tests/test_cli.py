"""The command line: a tiny end-to-end run on generated folders, and clear errors on bad input."""

from __future__ import annotations

import pytest
import yaml

from gradharmony.cli import main
from gradharmony.data.fake import write_fake_data_root
from gradharmony.runlog import read_metrics

TINY = ["--image-size", "16", "--channels", "1", "--bottleneck-dim", "16", "--batch-size", "8",
        "--method-param", "disc_hidden=16", "--no-progress"]


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
    code, text = run_cli(["train", "--method", "dann", "--harmonizer", "gh++", "--source", "usps",
                          "--target", "mnistm", "--data-root", str(root), "--steps", "4", "--eval-every", "2",
                          "--out", str(out), *TINY], capsys)
    assert code == 0, text
    assert "finished 4 steps" in text
    assert [r["step"] for r in read_metrics(out)] == [2, 4]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["harmonizer"] == "gh++" and saved["method_params"] == {"disc_hidden": 16}
    code, text = run_cli(["eval", "--checkpoint", str(out / "last.pt"), "--data-root", str(root)], capsys)
    assert code == 0, text
    assert "accuracy" in text and "per class" in text


def test_yaml_recipe_with_command_line_override(tmp_path, capsys):
    root = write_fake_data_root(tmp_path / "data", count=24)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "mcc", "source": "usps", "target": "mnistm", "steps": 50,
                                      "harmonizer": "gh", "image_size": 16, "channels": 1,
                                      "bottleneck_dim": 16, "batch_size": 8}))
    out = tmp_path / "run"
    code, text = run_cli(["train", "--config", str(recipe), "--steps", "2", "--eval-every", "2",
                          "--data-root", str(root), "--out", str(out), "--no-progress"], capsys)
    assert code == 0, text
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == "mcc" and saved["steps"] == 2


@pytest.mark.parametrize("args, message", [
    (["train", "--harmonizer", "pcgrad"], "unknown harmonizer mode 'pcgrad'"),
    (["train", "--strategy", "fast"], "strategy must be one of"),
    (["train", "--steps", "0"], "steps must be a positive integer"),
    (["train", "--stepz", "10"], "unrecognized arguments"),
    (["train", "--method-param", "oops"], "KEY=VALUE"),
    (["eval", "--checkpoint", "does/not/exist.pt"], "does not exist"),
])
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
    base = ["train", "--source", "usps", "--target", "mnistm", "--data-root", str(root), "--steps", "2",
            "--out", str(tmp_path / "run"), "--image-size", "16", "--channels", "1", "--no-progress"]
    code, text = run_cli(base + ["--method", "dan"], capsys)
    assert code == 2 and "dan" in text and "dann" in text
    code, text = run_cli(base + ["--method", "dann", "--method-param", "disc_hiden=3"], capsys)
    assert code == 2 and "disc_hiden" in text


def test_missing_dataset_folder_says_where_to_put_it(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = run_cli(["train", "--source", "usps", "--target", "mnistm", "--data-root", str(empty),
                          "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert "usps" in text and str(empty) in text
