"""The benchmark stages in configs/benchmarks/ expand to the runs the Python stage tables defined.

The digits_parity stages were written as YAML from the start (their hashes are frozen so their runs
resume).  The other expected cells were computed from the stage tables of benchmarks/digits.py, office_caltech.py
and efficientnet_lite.py before those became these YAML grids: (task, method, variant, seed,
TrainConfig.outcome_hash) of a few runs per stage, plus each stage's number of runs.  The hash names
the run's folder, so a grid that still matches them resumes and skips the runs already done.

One deliberate change: the ``none`` variant of the digits and Office-Caltech stages used to be
``{harmonizer: none, refresh_every: 10}`` (under ``none`` the harmonizer measured the geometry on
every refresh); it is now ``{harmonizer: none, measure_every: 10}``, since ``none`` measures only
when ``measure_every`` is set.  Its hashes are the new ones (the old hash is in the comment); all
other fields of those configs are unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gradharmony.uda.sweep import expand, load_grid

GRIDS = Path(__file__).resolve().parents[1] / "configs" / "benchmarks"

# grid file stem -> (number of runs, [(task, method, variant, seed, outcome hash), ...])
EXPECTED = {
    "digits_stage1": (
        48,
        [
            ("mnist->usps", "dann", "none", 0, "4ef2d0ee7c602ab5"),  # was b81d08ddaae4c07a with refresh_every 10
            ("mnist->usps", "dann", "none", 1, "00e679c328f1c9c7"),  # was a027b77577019b3d with refresh_every 10
            ("mnist->mnistm", "dann", "gh", 1, "83abe19c9d723b99"),
            ("mnist->usps", "dann", "gh", 2, "f0cf4adb812cf263"),
            ("mnist->mnistm", "cdan", "gh++/cls", 2, "ab4b229fa139ed7d"),
        ],
    ),
    "digits_stage2": (
        48,
        [
            ("mnist->usps", "mdd", "none", 0, "e1c25e510f2d24fa"),  # was 9e1ccfe437479625 with refresh_every 10
            ("mnist->usps", "mdd", "none", 1, "a8c62e3807461e4e"),  # was 1320c519ad98b9b6 with refresh_every 10
            ("mnist->mnistm", "mdd", "gh", 1, "739afeb62b1df5db"),
            ("mnist->usps", "mdd", "gh", 2, "a6af89c7920db207"),
            ("mnist->mnistm", "mcc", "gh++/cls", 2, "46956cc40283f7c9"),
        ],
    ),
    "digits_stage3": (
        64,
        [
            ("mnist->usps", "dann", "none", 3, "d01c8a0629752b1c"),  # was ece26ba76ac5188d with refresh_every 10
            ("mnist->mnistm", "cdan", "gh", 3, "84ac6a236ffa0025"),
            ("mnist->usps", "dann", "gh", 4, "83ec9c9cad0151c1"),
            ("mnist->usps", "mdd", "gh++/cls", 4, "dbc5234baa7f4008"),
            ("mnist->mnistm", "mcc", "gh++/cls", 4, "be627c4f9175982f"),
        ],
    ),
    "digits_stage4": (
        96,
        [
            ("usps->mnist", "dann", "none", 0, "0622c2beed08aeed"),  # was 21386c617c58f99d with refresh_every 10
            ("usps->mnist", "dann", "none", 1, "e604bbe9773ed427"),  # was 070253fd60e4259a with refresh_every 10
            ("mnist->mnistm-synth", "dann", "gh", 1, "f2feec66a3ada712"),
            ("usps->mnist", "dann", "gh", 2, "79c68802588bcb0e"),
            ("mnist->mnistm-synth", "mcc", "gh++/cls", 2, "97f7bc88edda769c"),
        ],
    ),
    "digits_stage5": (
        48,
        [
            ("mnist->usps", "dann", "none", 0, "4ef2d0ee7c602ab5"),  # was b81d08ddaae4c07a with refresh_every 10
            ("mnist->usps", "dann", "none", 1, "00e679c328f1c9c7"),  # was a027b77577019b3d with refresh_every 10
            ("mnist->mnistm", "dann", "gh++exact/align", 1, "600f7d8df1b893bf"),
            ("mnist->usps", "dann", "gh++exact/align", 2, "75aa9eaecc33cd8f"),
            ("mnist->mnistm", "mcc", "gh++exact/align", 2, "fa877785155cb616"),
        ],
    ),
    "digits_parity_stage1": (
        6,
        [
            ("mnist->usps", "source_only", "none", 0, "8683fb008aedd843"),
            ("mnist->usps", "dann", "none", 0, "e8178d0e91af73d4"),
        ],
    ),
    "digits_parity_stage2": (
        15,
        [
            ("mnist->usps", "dann", "none", 0, "e8178d0e91af73d4"),  # stage 1's run: trained once
            ("mnist->usps", "dann", "gh", 0, "9f765cb510bee8d0"),
            ("mnist->usps", "dann", "gh++", 0, "89764eaf9da35629"),
            ("mnist->usps", "dann", "none", 3, "ecd1031dde66a119"),
        ],
    ),
    "digits_parity_stage3": (
        9,
        [
            ("mnist->usps", "cdan", "none", 0, "3400d0e1ffcd785a"),
            ("mnist->usps", "mdd", "none", 0, "a7aa900ee21a67af"),
            ("mnist->usps", "mcc", "none", 0, "3f2bbb4183b4b9f7"),
        ],
    ),
    "digits_parity_mdd_backbone_lr": (1, [("mnist->usps", "mdd", "none", 0, "4065d4700c41bb8e")]),
    "digits_parity_stage4": (
        15,
        [
            ("mnist->usps", "mcd", "none", 0, "7e4144b73bd55788"),
            ("mnist->usps", "mcd", "gh++", 0, "7c4bf751c8ad53b2"),
        ],
    ),
    "digits_parity_stage5": (
        6,
        [
            ("usps->mnist", "source_only", "none", 0, "419d9c7a87236b8c"),
            ("usps->mnist", "mdd", "none", 0, "baa836d0b7de3121"),
            ("usps->mnist", "mcc", "none", 0, "71e3f51667ab3c79"),
        ],
    ),
    # stage 5 as it first ran (bilinear resizing): the same hashes as then, so those runs resume
    "digits_parity_u2m_bilinear": (
        6,
        [
            ("usps->mnist", "source_only", "none", 0, "c109d349805f16c9"),
            ("usps->mnist", "mdd", "none", 0, "66820cd4d19887fe"),
            ("usps->mnist", "mcc", "none", 0, "8121fb934cbc2d43"),
        ],
    ),
    "digits_parity_m2u_bicubic": (
        2,
        [
            ("mnist->usps", "dann", "none", 0, "543429320f2eb217"),
            ("mnist->usps", "mcc", "none", 0, "a16099cb1a2acedd"),
        ],
    ),
    "digits_parity_stage6": (
        15,
        [
            ("mnist->usps", "dann", "gh++@heads", 0, "09aacff03a861b93"),
            ("mnist->usps", "dann", "gh++@features", 0, "5e1bc5ba171c2b8f"),
            ("mnist->usps", "dann", "gh++@refresh4", 0, "72d5e9655e2e2b0a"),
        ],
    ),
    "model_selection_stage1": (
        72,
        [
            ("digits mnist->mnistm", "cdan", "gh", 0, "eeefe85c460654fd"),
            ("digits mnist->mnistm", "mcc", "none", 0, "d052e9121cf5f649"),
            ("digits mnist->usps", "cdan", "gh", 0, "680f65d7ac021d6b"),
            ("digits mnist->usps", "mdd", "none", 2, "54ebd04efae18469"),
            ("digits mnist->mnistm", "cdan", "none", 1, "274835181a0ebd82"),
        ],
    ),
    "model_selection_stage2": (
        216,
        [
            ("surf A->C", "cdan", "gh", 0, "5039c9a71bfffae8"),
            ("surf C->D", "cdan", "gh", 0, "72e4d4f8dcc26ade"),
            ("surf D->A", "cdan", "gh", 0, "a640507f82a4696a"),
            ("surf W->D", "dann", "none", 2, "0564c388684c1e68"),
            ("surf A->C", "cdan", "none", 1, "5815c077f1a1c87c"),
        ],
    ),
    "model_selection_stage3": (
        216,
        [
            ("surf A->C", "mcc", "gh", 0, "8ef0bacda1604c08"),
            ("surf C->D", "mcc", "gh", 0, "f0a729010f827540"),
            ("surf D->A", "mcc", "gh", 0, "d46f440be2b9b0b7"),
            ("surf W->D", "mdd", "none", 2, "25a781457b271280"),
            ("surf A->C", "mcc", "none", 1, "f8de275899035e4b"),
        ],
    ),
    "office_caltech_stage1": (
        252,
        [
            ("surf A->C", "dann", "none", 0, "55ffbb331e353bac"),  # was dbb8889e80376306 with refresh_every 10
            ("surf A->C", "dann", "none", 1, "7b2d1f8d7c772403"),  # was e89446899945c3d7 with refresh_every 10
            ("surf D->C", "dann", "gh", 1, "ef27a739a8c40547"),
            ("surf A->C", "dann", "gh", 2, "dc50624442d28604"),
            ("decaf W->D", "cdan", "gh++", 2, "649919b0e8a87fcb"),
        ],
    ),
    "office_caltech_stage2": (
        378,
        [
            ("surf A->C", "cdan+e", "none", 0, "6e1b17b8e6d7b1dd"),  # was e53dc2e6075ec800 with refresh_every 10
            ("surf A->C", "cdan+e", "none", 1, "9d903072ede4f24c"),  # was ef070f85538c15bb with refresh_every 10
            ("surf D->C", "cdan+e", "gh", 1, "57f7930b79b1ab82"),
            ("surf A->C", "cdan+e", "gh", 2, "3cf611f0389ad5d8"),
            ("decaf W->D", "mcc", "gh++", 2, "1408b07abf3f4db9"),
        ],
    ),
    "office_caltech_stage3": (
        378,
        [
            ("surf A->C", "mcd", "none", 0, "6e0413293b449cb4"),  # was b88f9d986b1cce91 with refresh_every 10
            ("surf A->C", "mcd", "none", 1, "3975cbf6b5df958a"),  # was b58911ec2a2a9145 with refresh_every 10
            ("surf D->C", "mcd", "gh", 1, "b360a1a90f6bfcc3"),
            ("surf A->C", "mcd", "gh", 2, "e9aa2e5dbc8de069"),
            ("decaf W->D", "dwl", "gh++", 2, "eef5b3d305630b7c"),
        ],
    ),
    "office_caltech_stage4": (
        42,
        [
            ("surf A->C", "gvb", "gh/cap2", 0, "77cc4a838789e1cf"),
            ("surf A->C", "gvb", "gh/cap2", 1, "a51a7697d75e5f34"),
            ("surf D->W", "gvb", "gh/cap2", 1, "b082bd3777244875"),
            ("surf A->D", "gvb", "gh/cap2", 2, "835a40f88b5e682e"),
            ("decaf W->D", "gvb", "gh/cap2", 2, "ce5f5b67aca867ed"),
        ],
    ),
    "efficientnet_lite_stage1": (
        3,
        [
            (
                "mnist->mnistm-synth (32px RGB)",
                "dann",
                "none",
                0,
                "b7a7572a07c8f3e9",
            ),  # was fc1c6f7cd7180c11: measure_every 1
            ("mnist->mnistm-synth (32px RGB)", "dann", "gh", 0, "c1d014e613003bb6"),
            ("mnist->mnistm-synth (32px RGB)", "dann", "gh++", 0, "d2cdbfc33225c4b9"),
        ],
    ),
    "efficientnet_lite_stage2": (
        1,
        [
            ("mnist->mnistm-synth (32px RGB)", "source_only", "none", 0, "d87dd9b87ff94868"),
        ],
    ),
    "efficientnet_lite_stage3": (
        6,
        [
            (
                "mnist->mnistm-synth (32px RGB)",
                "dann",
                "none",
                1,
                "70b1940cb7e30404",
            ),  # was fb901d6d1324c560: measure_every 1
            ("mnist->mnistm-synth (32px RGB)", "dann", "gh++", 1, "543a7649c407a6e2"),
            ("mnist->mnistm-synth (32px RGB)", "dann", "gh", 2, "62cbabc9f0e45204"),
            ("mnist->mnistm-synth (32px RGB)", "dann", "gh++", 2, "8af265a69d875b2a"),
        ],
    ),
    "efficientnet_lite_stage4": (
        2,
        [
            ("mnist->mnistm-synth (32px RGB)", "source_only", "none", 1, "26e107decc32765e"),
            ("mnist->mnistm-synth (32px RGB)", "source_only", "none", 2, "d31afa68ec05a5ea"),
        ],
    ),
}


@pytest.fixture(scope="module")
def expanded():
    return {name: expand(load_grid(GRIDS / f"{name}.yaml")) for name in EXPECTED}


def test_every_benchmark_grid_has_expectations():
    assert sorted(p.stem for p in GRIDS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stage_expands_to_the_frozen_runs(expanded, name):
    runs = expanded[name]
    count, cells = EXPECTED[name]
    assert len(runs) == count
    by_cell = {(r.task, r.method, r.variant, r.seed): r for r in runs}
    assert len(by_cell) == count  # no cell twice
    for task, method, variant, seed, outcome_hash in cells:
        run = by_cell[(task, method, variant, seed)]
        assert run.config.outcome_hash() == outcome_hash, (name, task, method, variant, seed)
        assert run.out.name == outcome_hash


def test_stages_of_a_benchmark_share_one_runs_folder(expanded):
    for benchmark in ("digits", "digits_parity", "office_caltech", "efficientnet_lite", "model_selection"):
        outs = {load_grid(GRIDS / f"{name}.yaml")["out"] for name in EXPECTED if name.startswith(benchmark + "_stage")}
        assert outs == {f"runs/{benchmark}"}


def test_the_measured_baseline_uses_measure_every(expanded):
    for name, runs in expanded.items():
        for run in runs:
            if run.variant == "none" and run.method == "source_only":  # no alignment loss: nothing to measure
                assert (run.config.harmonizer, run.config.measure_every) == ("none", 0)
            elif run.variant == "none" and name.startswith("efficientnet_lite"):  # every step, as in 0.1.0
                assert (run.config.harmonizer, run.config.measure_every) == ("none", 1)
            elif run.variant == "none":
                assert (run.config.harmonizer, run.config.measure_every, run.config.refresh_every) == ("none", 10, 1)


def test_the_mdd_ablation_changes_only_the_backbone_learning_rate(expanded):
    """The ablation is stage 3's MDD run of seed 0 with ``backbone_lr_mult`` 1.0 instead of TLlib's 0.1."""
    (ablation,) = expanded["digits_parity_mdd_backbone_lr"]
    (stage,) = [r for r in expanded["digits_parity_stage3"] if (r.method, r.seed) == ("mdd", 0)]
    changed, reference = ablation.config.to_dict(), stage.config.to_dict()
    assert changed["method_params"].pop("backbone_lr_mult") == 1.0
    assert reference["method_params"].pop("backbone_lr_mult") == 0.1
    assert changed.pop("out") != reference.pop("out")
    assert changed == reference


def _differ_only_in_the_resize_filter(run, reference, filter_of_run: str) -> None:
    changed, unchanged = run.config.to_dict(), reference.config.to_dict()
    assert changed.pop("resize_filter") == filter_of_run
    assert unchanged.pop("resize_filter") != filter_of_run
    changed.pop("out"), unchanged.pop("out")
    assert changed == unchanged


def test_the_resize_filter_ablations_change_only_the_filter(expanded):
    """Stage 5 is its bilinear ablation at bicubic, run for run; the MNIST -> USPS ablation is stage
    1's DANN and stage 3's MCC of seed 0 at bicubic."""
    bilinear = {(r.method, r.seed): r for r in expanded["digits_parity_u2m_bilinear"]}
    for run in expanded["digits_parity_stage5"]:
        _differ_only_in_the_resize_filter(run, bilinear[(run.method, run.seed)], "bicubic")
    stages = {
        (r.method, r.seed): r for name in ("digits_parity_stage1", "digits_parity_stage3") for r in expanded[name]
    }
    for run in expanded["digits_parity_m2u_bicubic"]:
        _differ_only_in_the_resize_filter(run, stages[(run.method, run.seed)], "bicubic")


@pytest.mark.parametrize(("first_status", "stages_run", "status"), [(130, 1, 130), (1, 2, 1), (0, 2, 0)])
def test_an_interrupted_stage_ends_the_sequence(monkeypatch, tmp_path, first_status, stages_run, status):
    """benchmarks/stages.py: after an interrupted stage (exit 130) no later stage starts; a failed one goes on."""
    stages, calls = _fake_stages(monkeypatch, tmp_path, (1, 2), first_status)
    assert stages.run_stages("bench", ["--workers", "1"]) == status
    assert [argv[1] for argv in calls] == ["bench_stage1.yaml", "bench_stage2.yaml"][:stages_run]


def _fake_stages(monkeypatch, tmp_path, numbers, first_status=0):
    """benchmarks/stages.py over grids ``bench_stageN.yaml`` in ``tmp_path``; the sweeps it calls, in order.

    The first sweep exits with ``first_status``, the others with 0.
    """
    monkeypatch.syspath_prepend(str(GRIDS.parents[1] / "benchmarks"))
    import stages

    for n in numbers:
        (tmp_path / f"bench_stage{n}.yaml").write_text("out: runs/bench\n")
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stages, "ROOT", tmp_path)
    monkeypatch.setattr(stages, "GRIDS", tmp_path)
    monkeypatch.setattr(stages, "main", lambda argv: calls.append(argv) or (first_status if len(calls) == 1 else 0))
    return stages, calls


def test_named_stages_run_alone_in_numeric_order(monkeypatch, tmp_path):
    """``--stage N`` (repeatable) runs those stages only, stage 10 after stage 4; the other flags reach the sweep."""
    stages, calls = _fake_stages(monkeypatch, tmp_path, (1, 4, 10))
    assert stages.run_stages("bench", ["--stage", "10", "--workers", "1", "--stage", "4"]) == 0
    assert calls == [
        ["sweep", "bench_stage4.yaml", "--workers", "1"],
        ["sweep", "bench_stage10.yaml", "--workers", "1"],
    ]
    calls.clear()
    assert stages.run_stages("bench", []) == 0
    assert [argv[1] for argv in calls] == ["bench_stage1.yaml", "bench_stage4.yaml", "bench_stage10.yaml"]


def test_a_stage_that_does_not_exist_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    """A wrong ``--stage`` runs nothing, even the stages that exist, and names the ones there are."""
    stages, calls = _fake_stages(monkeypatch, tmp_path, (1, 2))
    assert stages.run_stages("bench", ["--stage", "1", "--stage", "7"]) == 2
    assert calls == []
    error = capsys.readouterr().err
    assert error.strip() == "error: bench has no stage 7 (its stages: 1, 2)"


def test_help_lists_the_stages_and_runs_nothing(monkeypatch, tmp_path, capsys):
    """``--help`` names every stage's grid and the ``--stage`` flag, exits 0, and sweeps nothing."""
    stages, calls = _fake_stages(monkeypatch, tmp_path, (1, 4))
    with pytest.raises(SystemExit) as exit_info:
        stages.run_stages("bench", ["--help"], prog="bench run")
    assert exit_info.value.code == 0
    assert calls == []
    text = capsys.readouterr().out
    assert text.startswith("usage: bench run [--stage N ...]")
    assert "bench_stage1.yaml" in text and "bench_stage4.yaml" in text and "--stage N" in text
