"""Values are validated before anything is written: every numeric field finite and inside the range
written next to it, the method's hyper-parameters of the right type, finite, and accepted by the
method; a refusal is one line naming the field and what is allowed (see also test_cli_errors.py)."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
import yaml

from gradharmony.uda.cli import build_parser, main, user_error_message
from gradharmony.uda.config import ConfigError, TrainConfig, field_range
from gradharmony.uda.methods import METHODS
from test_cli_errors import assert_one_line_error

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def run_cli(args, capsys) -> tuple[int, str, str]:
    """Run the command line in-process: ``(exit status, stdout, stderr)``."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse refuses a flag by exiting
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# (flags, what the one line must say: the field and its allowed range)
REFUSED = [
    (["--lr", "nan"], ["lr must be a finite number > 0", "got nan"]),
    (["--lr", "inf"], ["lr must be a finite number > 0", "got inf"]),
    (["--lr", "-1"], ["lr must be a finite number > 0", "got -1"]),
    (["--momentum", "1.5"], ["momentum", "in [0, 1)", "1.5"]),
    (["--k", "2"], ["k must be a finite number in [0, 1]", "got 2"]),
    (["--trade-off", "nan"], ["trade_off", ">= 0", "got nan"]),
    (["--steps", "0"], ["steps must be an integer >= 1", "got 0"]),
    (["--max-weight", "0.5"], ["max_weight", ">= 1 or none", "0.5"]),
    (["--crop", "300", "--resize", "256"], ["crop", "in [1, resize]", "300", "resize is 256"]),
    (["--method", "mcd", "--method-param", "num_k=0"], ["method_params of mcd", "num_k must be at least 1", "got 0"]),
    (["--method-param", "grl_alpha=nan"], ["method_params of dann", "grl_alpha must be a finite number", "nan"]),
    (["--method-param", "grl_alpha=.inf"], ["grl_alpha must be a finite number", "inf"]),
    (["--method-param", "disc_hidden=2.5"], ["disc_hidden must be an integer", "2.5"]),
    (["--seed", "-1"], ["seed must be an integer >= 0", "-1"]),
    (["--lr-gamma", "-0.1"], ["lr_gamma", ">= 0"]),
    (["--weight-decay", "inf"], ["weight_decay", ">= 0", "inf"]),
    (["--threads", "0"], ["threads must be an integer >= 1 or none"]),
    (["--loader-workers", "-1"], ["loader_workers must be an integer >= 0"]),
    (["--checkpoint-every", "0"], ["checkpoint_every must be an integer >= 1 or none"]),
    (["--source-limit", "0"], ["source_limit must be an integer >= 1 or none"]),
    (["--source-eval-size", "-5"], ["source_eval_size must be an integer >= 0"]),
]


@pytest.mark.parametrize("flags, fragments", REFUSED, ids=[" ".join(flags) for flags, _ in REFUSED])
def test_out_of_range_values_are_refused_in_one_line_and_nothing_is_written(flags, fragments, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", *flags, "--out", out, "--no-progress"], capsys)
    assert_one_line_error(code, err, *fragments)
    assert stdout == ""  # refused before even the device line
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_with_a_wrong_type_is_one_line_and_writes_nothing(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: dann\nsteps: ten\nout: {tmp_path / 'run'}\n")
    code, _, err = run_cli(["train", "--config", recipe], capsys)
    assert_one_line_error(code, err, str(recipe), "steps must be an integer", "'ten'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["lr: .nan", "lr: nan", "momentum: 1", "k: -0.5", "trade_off: .inf"])
def test_a_recipe_with_a_value_out_of_range_is_refused(text, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text + "\n")
    field = text.split(":")[0]
    with pytest.raises(ConfigError, match=rf"{recipe}: {field} must be a finite number"):
        TrainConfig.from_yaml(recipe)


def test_every_numeric_field_has_a_range_except_channels():
    hints = typing.get_type_hints(TrainConfig)
    numeric = [
        name
        for name in FIELDS
        if {a for a in typing.get_args(hints[name]) or (hints[name],) if a is not type(None)} <= {int, float}
        and name != "channels"
    ]
    assert len(numeric) >= 20
    for name in numeric:
        assert field_range(FIELDS[name]), name
    assert field_range(FIELDS["channels"]) is None  # 1 or 3: a choice, checked as such


@pytest.mark.parametrize(
    "values",
    [
        {"momentum": 0.0},
        {"momentum": 0},
        {"momentum": 0.999},
        {"k": 0},
        {"k": 1},
        {"lr": 1e-12},
        {"max_weight": 1.0},
        {"max_weight": None},
        {"trade_off": 0},
        {"weight_decay": 0.0, "lr_gamma": 0, "lr_decay": 0},
        {"resize": 32, "crop": 32},
        {"measure_every": 0, "source_eval_size": 0, "loader_workers": 0, "seed": 0},
        {"threads": 1, "checkpoint_every": 1, "source_limit": 1, "target_limit": 1},
    ],
)
def test_values_on_the_bounds_are_accepted(values):
    cfg = TrainConfig(**values)
    for name, value in values.items():
        assert getattr(cfg, name) == value


@pytest.mark.parametrize(
    "values, message",
    [
        ({"momentum": 1.0}, "momentum must be a finite number in [0, 1), got 1.0"),
        ({"lr": 0}, "lr must be a finite number > 0, got 0"),
        ({"k": math.inf}, "k must be a finite number in [0, 1], got inf"),
        ({"max_weight": math.nan}, "max_weight must be a finite number >= 1 or none, got nan"),
        ({"lr_decay": -math.inf}, "lr_decay must be a finite number >= 0, got -inf"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"eval_every": -1}, "eval_every must be an integer >= 1, got -1"),
        ({"refresh_every": 0}, "refresh_every must be an integer >= 1, got 0"),
        ({"image_size": 0}, "image_size must be an integer >= 1, got 0"),
        ({"bottleneck_dim": 0}, "bottleneck_dim must be an integer >= 1, got 0"),
        ({"measure_every": -1}, "measure_every must be an integer >= 0, got -1"),
        ({"target_limit": 0}, "target_limit must be an integer >= 1 or none, got 0"),
        ({"resize": 0, "crop": 0}, "resize must be an integer >= 1, got 0"),
        ({"resize": 36, "crop": 40}, "crop must be an integer in [1, resize], got 40 (resize is 36)"),
    ],
)
def test_each_refusal_names_the_field_and_its_range(values, message):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**values)
    assert str(caught.value) == message


def test_the_method_params_types_follow_their_defaults():
    with pytest.raises(ConfigError, match="method_params of dann: disc_hidden must be an integer, got '16' \\(str\\)"):
        TrainConfig(method_params={"disc_hidden": "16"})
    with pytest.raises(ConfigError, match="grl_alpha must be a finite number, got True \\(bool\\)"):
        TrainConfig(method_params={"grl_alpha": True})
    with pytest.raises(ConfigError, match="eval_head must be one of"):  # the method's own check
        TrainConfig(method="mcd", method_params={"eval_head": "f3"})
    with pytest.raises(ConfigError, match="head_hidden must be an integer or null"):  # a None default: its annotation
        TrainConfig(method="mcd", method_params={"head_hidden": "wide"})
    assert TrainConfig(method="mcd", method_params={"head_hidden": None}).method_params == {"head_hidden": None}
    # None where the annotation allows it, although the default is a number (float | None = 0.0)
    assert (
        TrainConfig(method="mcd", method_params={"generator_momentum": None}).method_params["generator_momentum"]
        is None
    )
    with pytest.raises(ConfigError, match="num_k must be an integer, got None"):
        TrainConfig(method="mcd", method_params={"num_k": None})
    # an int where the default is a float stays as written (the run hash is unchanged)
    assert TrainConfig(method_params={"grl_alpha": 5}).method_params == {"grl_alpha": 5}
    # a number that YAML read as a string (1e-3) becomes a float, as for the config's own fields
    cfg = TrainConfig(method="mcd", method_params=yaml.safe_load("{entropy_weight: 1e-3}"))
    assert cfg.method_params == {"entropy_weight": 0.001}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_passes_with_its_defaults_and_the_check_leaves_the_random_state_alone(method):
    state = torch.random.get_rng_state()
    defaults = {k: v for k, v in METHODS[method].hparam_defaults().items() if k != "bottleneck_dim"}
    cfg = TrainConfig(method=method, method_params=defaults)
    assert cfg.method_params == defaults
    assert torch.equal(state, torch.random.get_rng_state())


def test_a_method_refusing_its_hyper_parameters_during_training_is_one_line():
    """Checks that need the real backbone (SSRT's sr_layers against the ViT's depth) run in training:
    their ValueError is still reported as the method's refusal, in one line."""
    from torch import nn

    from gradharmony.uda.methods import build_method

    class TwoBlocks(nn.Module):
        out_features = 8

        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Identity(), nn.Identity())

    with pytest.raises(ValueError) as caught:
        build_method("ssrt", TwoBlocks(), num_classes=10, max_steps=10, bottleneck_dim=8, sr_layers=(5,))
    message = user_error_message(caught.value)
    assert message is not None and message.startswith("method_params of ssrt: sr_layers entries")
    assert "\n" not in message
    assert user_error_message(ValueError("a bug elsewhere")) is None  # not a method's refusal: a traceback


def test_help_shows_each_range():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    text = " ".join(sub.format_help().split())
    for fragment in (
        "SGD momentum (in [0, 1); default: 0.9)",
        "initial learning rate of SGD (> 0; default: 0.01)",
        "(>= 1 or none; default: none)",
        "(in [0, 1]; default: 0.5)",
        "(in [1, resize]; default: 224)",
    ):
        assert fragment in text, fragment
