"""Label-free model selection end to end: the engine scores each evaluation, stores the target
predictions and keeps the picked checkpoints (consistently after a kill and resume); the reports
pick by validator, measure the regret to the oracle, and decide GH on or off; bad input is one line.

The report tests read hand-written run folders whose answers are known; the engine tests train the
tiny in-memory domains of ``test_engine``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark_scripts import load_benchmark
from fakes.digits import write_fake_data_root
from gradharmony.uda.cli import main
from gradharmony.uda.config import ConfigError, TrainConfig
from gradharmony.uda.engine import Trainer, train
from gradharmony.uda.engine import checkpoint as checkpoint_module
from gradharmony.uda.report import (
    collect,
    gh_decision_rows,
    selection_benchmark,
    selection_benchmark_markdown,
    selection_rows,
    table_rows,
    write_report,
)
from gradharmony.uda.runs import (
    TIMING_FIELDS,
    read_metrics,
    read_predictions,
    read_target_index,
    write_labels,
    write_predictions,
    write_target_index,
)
from gradharmony.uda.selection import candidates, label_free_pick, outcome, pick, rank_correlation, scores_of
from test_cli_errors import assert_one_line_error
from test_engine import config, tiny_domains, without_timing
from test_resume import Killed, _kill_after_evaluation, weights

# ----------------------------------------------------------------------------- hand-written runs


def fake_run(
    root: Path,
    name: str,
    accuracies: list[float],
    scores: dict[str, list[float]],
    *,
    task: str = "t",
    method: str = "dann",
    variant: str = "none",
    seed: int = 0,
    predictions: list[np.ndarray] | None = None,
    select_by: str | None = None,
    mixval_probes: list[tuple[float, float]] | None = None,
) -> Path:
    """A finished sweep run: one record per accuracy (steps 10, 20, ...), with validator scores."""
    folder = root / name
    write_labels(folder, task, method, variant, seed)
    harmonizer = variant.split("/")[0]
    lines = []
    for i, accuracy in enumerate(accuracies):
        step = 10 * (i + 1)
        record = {
            "step": step,
            "target_acc": accuracy,
            "best_target_acc": max(accuracies[: i + 1]),
            "config": {
                "steps": 10 * len(accuracies),
                "harmonizer": harmonizer,
                "validators": [*scores, *(["mixval"] if mixval_probes else [])],
                "select_by": select_by,
            },
            "harmonizer": {},
            "validators": {k: v[i] for k, v in scores.items()},
        }
        if predictions is not None:
            write_predictions(folder, step, predictions[i].astype(np.float16))
            record["validation"] = {"predictions": f"predictions/step_{step:07d}.npy"}
        if mixval_probes is not None:
            intra, inter = mixval_probes[i]
            record["validators"]["mixval"] = (intra + inter) / 2
            record["validation"] = {**record.get("validation", {}), "mixval_intra": intra, "mixval_inter": inter}
        lines.append(json.dumps(record))
    if predictions is not None:
        write_target_index(folder, np.arange(len(predictions[0])))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def one_hot(labels: list[int], classes: int = 2) -> np.ndarray:
    return np.eye(classes)[labels]


def test_each_validator_picks_its_highest_score_and_the_report_shows_regret_and_worst_picks(tmp_path):
    fake_run(tmp_path, "a", [0.5, 0.8, 0.6], {"snd": [1.0, 3.0, 2.0], "entropy": [3.0, 1.0, 2.0]}, select_by="snd")
    fake_run(tmp_path, "b", [0.7, 0.7, 0.9], {"snd": [0.0, 0.0, 5.0], "entropy": [1.0, 1.0, 0.5]}, seed=1)
    cells = collect(tmp_path)
    (row,) = table_rows(cells, "snd")
    assert row["last"] == "75.00 +- 21.21" and row["best"] == "85.00 +- 7.07"
    assert row["pick"] == "85.00 +- 7.07" and row["regret"] == "0.00" and row["pick_worst"] == "0/2"
    (row,) = selection_rows(cells, ["entropy", "last", "oracle"])
    assert row["entropy"] == "60.00 +- 14.14"  # run a: the worst (0.5); run b: the first of equal scores (0.7)
    assert row["entropy_regret"] == "25.00" and row["entropy_worst"] == "2/2"
    assert row["last"] == "75.00 +- 21.21" and row["oracle"] == "85.00 +- 7.07"
    text = write_report(tmp_path, tmp_path / "all", cells, select=["all"])[0].read_text()
    assert "| task | method | variant | seeds | entropy | snd | last | oracle |" in text  # what the runs computed
    md, csv_path = write_report(tmp_path, tmp_path / "out", cells, select=["entropy"])
    text = md.read_text()
    assert "pick: entropy (%)" in text and "60.00 +- 14.14 (regret 25.00, worst 2/2)" in text
    assert "pick,best,regret,pick_worst" in csv_path.read_text().splitlines()[0]
    # without --select: the validator the runs name (their select_by, else the default)
    assert "pick: snd (%)" in write_report(tmp_path, tmp_path / "default", cells)[0].read_text()


def test_runs_without_validators_are_reported_with_no_pick(tmp_path):
    fake_run(tmp_path, "a", [0.5, 0.8], {})
    md, _ = write_report(tmp_path)
    assert "label-free pick (%)" in md.read_text() and "No run computed a label-free validator" in md.read_text()


def test_gh_on_or_off_is_decided_over_the_pool_of_every_variants_evaluations(tmp_path):
    for seed in (0, 1):
        fake_run(tmp_path, f"none{seed}", [0.6, 0.7], {"im": [1.0, 2.0], "bnm": [9.0, 9.0]}, seed=seed)
        fake_run(tmp_path, f"gh{seed}", [0.75, 0.8], {"im": [3.0, 4.0], "bnm": [1.0, 1.0]}, variant="gh", seed=seed)
        fake_run(
            tmp_path, f"ghpp{seed}", [0.72, 0.74], {"im": [2.5, 2.0], "bnm": [1.0, 2.0]}, variant="gh++", seed=seed
        )
    cells = collect(tmp_path)
    (agree,) = gh_decision_rows(cells, "im")
    assert (agree["seeds"], agree["on"], agree["oracle_on"], agree["agree"], agree["regret"]) == (2, 2, 2, 2, 0.0)
    (disagree,) = gh_decision_rows(cells, "bnm")  # picks `none` at its first evaluation: GH off, 20 points lost
    assert (disagree["on"], disagree["agree"]) == (0, 0) and disagree["regret"] == pytest.approx(20.0)
    text = write_report(tmp_path, select=["im", "bnm"])[0].read_text()
    assert "GH on or off? Decided by im" in text and "| t | dann | 2 | 2/2 | 2/2 | 2/2 | 0.00 |" in text
    assert "| t | dann | 2 | 0/2 | 2/2 | 0/2 | 20.00 |" in text


def test_gh_on_or_off_is_not_decided_by_a_validator_that_scored_one_side_only(tmp_path):
    fake_run(tmp_path, "none", [0.9, 0.95], {"im": [1.0, 2.0]})  # trained without bnm
    fake_run(tmp_path, "gh", [0.5, 0.6], {"im": [0.0, 0.5], "bnm": [1.0, 2.0]}, variant="gh")
    cells = collect(tmp_path)
    assert gh_decision_rows(cells, "bnm") == []  # its pick could only have been a GH run
    (decided,) = gh_decision_rows(cells, "im")
    assert (decided["on"], decided["agree"]) == (0, 1)


def test_ensv_picks_the_candidate_agreeing_with_the_pools_average(tmp_path):
    truth = [0, 0, 1, 1, 0, 1]
    good, bad = one_hot(truth), one_hot([1, 1, 1, 1, 0, 1])  # bad: calls the first two of class 0 class 1
    folder = fake_run(tmp_path, "a", [0.9, 0.4, 0.95], {"snd": [0, 0, 0]}, predictions=[good, bad, good])
    pool = candidates(folder, read_metrics(folder))
    assert pick(pool, "ensv") == 0  # the first of the two that agree with the ensemble
    assert np.array_equal(read_target_index(folder), np.arange(6))
    assert read_predictions(folder, 20).dtype == np.float16
    (row,) = selection_rows(collect(tmp_path), ["ensv"])
    assert row["ensv"] == "90.00" and row["ensv_regret"] == "5.00"


def test_mixval_rank_picks_the_best_mean_rank_of_the_two_probes_where_the_raw_mean_does_not(tmp_path):
    # the first evaluation is strong on one probe only: the raw mean picks it, the ranks the third
    probes = [(0.99, 0.20), (0.80, 0.35), (0.81, 0.36), (0.79, 0.33)]
    folder = fake_run(tmp_path, "a", [0.6, 0.7, 0.9, 0.5], {"snd": [0, 0, 0, 0]}, mixval_probes=probes)
    pool = candidates(folder, read_metrics(folder))
    assert pool[0].mixval_probes == (0.99, 0.20)
    assert (pick(pool, "mixval"), pick(pool, "mixval_rank")) == (0, 2)
    assert [round(s, 3) for s in scores_of(pool, "mixval_rank")] == [2.574, 2.572, 3.573, 1.57]
    (row,) = selection_rows(collect(tmp_path), ["mixval", "mixval_rank"])
    assert (row["mixval"], row["mixval_rank"], row["mixval_rank_regret"]) == ("60.00", "90.00", "0.00")
    out = tmp_path / "report"
    assert main(["report", str(tmp_path), "--select", "all", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| task | method | variant | seeds | snd | mixval | mixval_rank | last | oracle |" in text
    assert "90.00 (regret 0.00, worst 0/1)" in text


def test_ensv_never_picks_a_diverged_candidate(tmp_path):
    truth = [0, 0, 1, 1, 0, 1]
    diverged = np.full((6, 2), np.nan)  # a model whose weights became NaN: every class 0 by arg-max
    predictions = [one_hot(truth), one_hot([1, 1, 1, 1, 0, 1]), diverged, one_hot(truth)]
    folder = fake_run(tmp_path, "a", [0.9, 0.4, 0.5, 0.95], {"snd": [0, 0, 0, 0]}, predictions=predictions)
    pool = candidates(folder, read_metrics(folder))
    assert pick(pool, "ensv") == 0  # it picked the diverged one, which agreed with the NaN average
    scores = scores_of(pool, "ensv")
    assert math.isnan(scores[2]) and scores[0] == scores[3] == 1.0


def test_one_short_run_does_not_abort_the_benchmark_and_unscored_runs_are_counted(tmp_path, capsys):
    for seed in (0, 1):
        fake_run(tmp_path, f"a{seed}", [0.5, 0.9, 0.7], {"im": [1, 3, 2]}, seed=seed, predictions=[one_hot([0, 1])] * 3)
    # a run stopped after one evaluation: EnsV has nothing to compare it with; its im diverged
    short = fake_run(tmp_path, "short", [0.6], {"im": [math.nan]}, seed=2, predictions=[one_hot([0, 1])])
    pool = candidates(short, read_metrics(short))
    assert outcome(pool, "ensv") is None and math.isnan(rank_correlation(pool, "ensv"))
    rows = {r["validator"]: r for r in selection_benchmark(collect(tmp_path), ["im", "ensv", "last", "oracle"])}
    assert (rows["ensv"]["runs"], rows["ensv"]["not_scored"]) == (2, 1)
    assert (rows["im"]["runs"], rows["im"]["not_scored"]) == (2, 1) and rows["im"]["mean_acc"] == pytest.approx(90.0)
    assert (rows["last"]["runs"], rows["last"]["not_scored"]) == (3, 0)
    text = selection_benchmark_markdown(list(rows.values()))
    assert "| validator | runs | not scored |" in text and "| ensv | 2 | 1 |" in text
    # `report --select ensv`: the short run has no EnsV pick, the others do
    (row,) = selection_rows(collect(tmp_path), ["ensv"])
    assert row["ensv"] == "50.00 +- 0.00" and row["ensv_worst"] == "2/2"  # equal scores: the first
    out = tmp_path / "report"
    assert main(["report", str(tmp_path), "--select", "ensv", "--out", str(out)]) == 0
    assert "| t | dann | none | 3 | 50.00 +- 0.00 (regret 40.00, worst 2/2) |" in (out / "report.md").read_text()


def test_selection_benchmark_summarises_each_validator(tmp_path):
    for seed in (0, 1):
        fake_run(tmp_path, f"none{seed}", [0.5, 0.6, 0.7], {"im": [1, 2, 3], "snd": [3, 2, 1]}, seed=seed)
        fake_run(tmp_path, f"gh{seed}", [0.8, 0.7, 0.6], {"im": [9, 8, 7], "snd": [1, 2, 2.5]}, variant="gh", seed=seed)
    rows = {r["validator"]: r for r in selection_benchmark(collect(tmp_path), ["im", "snd", "last", "oracle"])}
    assert rows["im"]["mean_acc"] == pytest.approx(75.0) and rows["im"]["mean_regret"] == pytest.approx(0.0)
    assert rows["im"]["spearman"] == pytest.approx(1.0) and rows["im"]["worst_rate"] == 0.0
    assert rows["snd"]["spearman"] == pytest.approx(-1.0) and rows["snd"]["worst_rate"] == 1.0
    assert rows["im"]["gh_match_rate"] == 1.0 and rows["im"]["gh_decisions"] == 2
    assert rows["snd"]["gh_match_rate"] == 0.0  # its pool-wide pick is `none` at 0.5
    assert rows["oracle"]["mean_regret"] == 0.0 and math.isnan(rows["oracle"]["spearman"])
    assert rows["last"]["mean_acc"] == pytest.approx(65.0)


def benchmark_script(monkeypatch):
    """benchmarks/model_selection.py as a module."""
    return load_benchmark("model_selection", monkeypatch)


def test_the_benchmark_reports_the_validation_cost_against_the_training_time(tmp_path, monkeypatch):
    script = benchmark_script(monkeypatch)

    def timed_run(name, timings, task="digits a", steps=None, seed=0):
        folder = fake_run(tmp_path, name, [0.5] * len(timings), {"im": [1.0] * len(timings)}, task=task, seed=seed)
        records = read_metrics(folder)
        for record, (validate, per_step) in zip(records, timings, strict=True):
            record.update(validate_seconds=validate, seconds_per_step=per_step)
            record["config"]["steps"] = steps or record["config"]["steps"]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    timed_run("finished", [(1.0, 0.1), (1.0, 0.3)])  # steps 10 and 20: 4 s of training, 2 s of validation
    timed_run("unfinished", [(50.0, 0.1)], steps=100, seed=1)  # still running: not counted
    timed_run("other task", [(50.0, 0.1)], task="digits b")
    text = script.validation_cost({key: cell for key, cell in collect(tmp_path).items() if key[0] == "digits a"})
    assert "1.00 s per evaluation on average (2 evaluations of 1 runs), 50.0% of the training time" in text
    fake_run(tmp_path, "untimed", [0.5], {"im": [1.0]}, task="digits c")  # written before the timings existed
    untimed = {key: cell for key, cell in collect(tmp_path).items() if key[0] == "digits c"}
    assert script.validation_cost(untimed) == "Validation cost: no timed evaluation among these runs."


def test_the_default_candidates_are_ranked_by_regret_then_worst_picks_against_last(monkeypatch):
    script = benchmark_script(monkeypatch)

    def row(name, regret, worst):
        return {"validator": name, "mean_regret": regret, "worst_rate": worst, "gh_match_rate": 0.5, "runs": 4}

    rows = [row("snd", 1.0, 0.5), row("mixval", 1.0, 0.25), row("dev", 0.1, 0.0), row("last", 0.9, 0.25)]
    text = script.default_ranking([*rows, row("entropy", math.nan, math.nan)])
    lines = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [line.split("|")[2].strip() for line in lines] == ["mixval", "snd"]  # dev needs a source split
    assert "the first-ranked validator, mixval, does not beat it on mean regret" in text
    assert "beats it" in script.default_ranking([row("im", 0.5, 0.0), row("last", 0.9, 0.25)])
    tied = script.default_ranking([row("entropy", 0.5, 0.0), row("im", 0.5, 0.0), row("last", 0.5, 0.25)])
    assert "the first-ranked validators, entropy and im (tied), do not beat it" in tied


def test_the_label_free_pick_of_a_run_follows_its_select_by():
    records = [
        {"step": 5, "target_acc": 0.3, "validators": {"snd": 1.0, "mixval": 0.9}},
        {"step": 10, "target_acc": 0.6, "validators": {"snd": 2.0, "mixval": 0.5}},
    ]
    assert label_free_pick(records, {"validators": ["snd", "mixval"]}) == {  # no bnm: the first computed
        "validator": "snd",
        "step": 10,
        "target_acc": 0.6,
    }
    assert label_free_pick(
        [{**r, "validators": {**r["validators"], "bnm": -i}} for i, r in enumerate(records)],
        {"validators": ["snd", "bnm", "mixval"]},
    ) == {"validator": "bnm", "step": 5, "target_acc": 0.3}  # the default, though not the first computed
    assert label_free_pick(records, {"validators": ["snd", "mixval"], "select_by": "snd"})["step"] == 10
    assert label_free_pick(records, {"validators": []}) is None
    for record, (intra, inter) in zip(records, [(0.7, 0.2), (0.8, 0.35)]):
        record["validation"] = {"mixval_intra": intra, "mixval_inter": inter}
    ranked = label_free_pick(records, {"validators": ["snd", "mixval"], "select_by": "mixval_rank"})
    assert ranked == {"validator": "mixval_rank", "step": 10, "target_acc": 0.6}  # higher on both probes
    assert label_free_pick(records, {"validators": ["snd", "mixval"], "select_by": "ensv"}) is None


# ----------------------------------------------------------------------------- bad input to report
def run_cli(args, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "select, fragments",
    [
        ("sndd", ["unknown validator 'sndd' (did you mean 'snd'?)"]),
        ("dev", ["no run computed the validator 'dev'", "computed: snd"]),
        ("ensv", ["EnsV needs a pool of at least 2 candidates, got 1"]),
        ("mixval_rank", ["no run computed the validator 'mixval', whose two probes mixval_rank ranks"]),
    ],
)
def test_a_bad_selection_is_one_line_and_writes_nothing(tmp_path, capsys, select, fragments):
    runs = tmp_path / "runs"
    fake_run(runs, "a", [0.5], {"snd": [1.0]}, predictions=[one_hot([0, 1])])
    out = tmp_path / "report"
    code, err = run_cli(["report", runs, "--select", select, "--out", out], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists() and not (runs / "report.md").exists()


# ----------------------------------------------------------------------------- the engine
def test_the_source_validation_split_is_never_trained_on(tmp_path):
    domains = tiny_domains()
    trainer = Trainer(config(tmp_path, source_val_fraction=0.25, validators=["source_val", "dev"]), domains)
    train_rows = {bytes(x.cpu().numpy()) for x in trainer.domains["source"].images}
    val_rows = {bytes(x.cpu().numpy()) for x in trainer.validation.source.images}
    all_rows = {bytes(x.numpy()) for x in domains["source"].images}
    assert len(train_rows) == 36 and len(val_rows) == 12 and train_rows | val_rows == all_rows
    assert train_rows.isdisjoint(val_rows)
    assert trainer.source_batches.images is trainer.domains["source"].images  # what the batches are drawn from
    assert torch.bincount(trainer.validation.source.labels.cpu()).tolist() == [3, 3, 3, 3]  # stratified
    trainer.run()
    record = read_metrics(tmp_path / "run")[-1]
    assert record["validation"]["source_size"] == 12 and record["validation"]["source_held_out"] == 12
    assert 0.0 <= record["validators"]["source_val"] <= 1.0 and math.isfinite(record["validators"]["dev"])


def test_validators_change_nothing_of_training(tmp_path):
    plain = config(tmp_path / "plain", validators=[])
    scored = config(tmp_path / "scored", validators=["entropy", "im", "bnm", "snd", "mixval"], select=["snd"])
    train(plain, tiny_domains())
    train(scored, tiny_domains())
    a, b = weights(Path(plain.out)), weights(Path(scored.out))
    assert all(torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k] for k, v in a.items())
    assert (Path(plain.out) / "steps.csv").read_bytes() == (Path(scored.out) / "steps.csv").read_bytes()
    differ = ("validators", "validation", "selected", "config", "config_hash", *TIMING_FIELDS)

    def kept(records):
        return [{k: v for k, v in r.items() if k not in differ} for r in records]

    assert kept(read_metrics(scored.out)) == kept(read_metrics(plain.out))


def test_each_evaluation_stores_scores_and_predictions_and_keeps_the_first_best_picks(tmp_path):
    cfg = config(tmp_path, select=["snd", "oracle"], target_val_size=20)
    train(cfg, tiny_domains())
    folder = Path(cfg.out)
    records = read_metrics(folder)
    for record in records:
        assert set(record["validators"]) == {"entropy", "im", "bnm", "snd", "mixval"}
        assert record["validate_seconds"] > 0 and record["validation"]["target_size"] == 20
        probs = read_predictions(folder, record["step"])
        assert probs.dtype == np.float16 and probs.shape == (20, 4)
        assert np.allclose(probs.astype(np.float64).sum(axis=1), 1.0, atol=1e-2)
    index = read_target_index(folder)
    assert len(index) == 20 and len(set(index.tolist())) == 20 and index.max() < 48
    state = torch.load(folder / "last.pt", weights_only=False)
    for name, key in (("snd", lambda r: r["validators"]["snd"]), ("oracle", lambda r: r["target_acc"])):
        best = max(records, key=key)  # the first of the highest
        assert state["picks"][name]["step"] == best["step"] == records[-1]["selected"][name]
        (kept,) = (folder / "selected" / name).iterdir()
        assert kept.name == f"step_{best['step']:07d}.pt"
        assert torch.load(kept, weights_only=True)["step"] == best["step"]


def _kill_after_validation_files(monkeypatch, step):
    original = Trainer.write_validation_files

    def write_then_die(self):
        original(self)
        if self.step == step:
            raise Killed

    monkeypatch.setattr(Trainer, "write_validation_files", write_then_die)


def _kill_while_keeping_a_pick(monkeypatch, step):
    real_replace = os.replace

    def replace(src, dst):
        if "selected" in str(dst) and torch.load(src, weights_only=False)["step"] == step:
            raise Killed  # the new pick is whole in its .tmp; the folder holds the previous one
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", replace)


def _files(folder: Path) -> dict[str, bytes]:
    """The validation files of a run folder: predictions (bytes) and kept picks (their step)."""
    out = {p.relative_to(folder).as_posix(): p.read_bytes() for p in (folder / "predictions").rglob("*.npy")}
    for p in (folder / "selected").rglob("*.pt"):
        out[p.relative_to(folder).as_posix()] = str(torch.load(p, weights_only=True)["step"]).encode()
    return out


@pytest.mark.parametrize(
    "kill_point, overrides",
    [
        (_kill_after_evaluation, {}),
        (_kill_after_validation_files, {}),
        (_kill_while_keeping_a_pick, {}),
        (_kill_after_validation_files, {"checkpoint_every": 12}),  # before the first checkpoint
    ],
    ids=["after-evaluation", "after-validation-files", "while-keeping-a-pick", "before-first-checkpoint"],
)
def test_predictions_and_picks_are_those_of_an_uninterrupted_run_after_a_kill(tmp_path, kill_point, overrides):
    # scores of steps 4, 8, 12 vary, so that the picks move; the held-out split is in play too
    values = dict(source_val_fraction=0.25, validators=["source_val", "snd", "mixval"], **overrides)
    values["select"] = ["source_val", "snd", "oracle"]
    straight = config(tmp_path / "straight", **values)
    train(straight, tiny_domains())
    killed = config(tmp_path / "killed", **values)
    with pytest.MonkeyPatch.context() as patch:
        kill_point(patch, step=8)
        with pytest.raises(Killed):
            train(killed, tiny_domains())
    train(killed, tiny_domains())
    a, b = Path(straight.out), Path(killed.out)
    assert without_timing(read_metrics(b)) == without_timing(read_metrics(a))
    assert _files(b) == _files(a)
    assert len([p for p in (b / "selected").rglob("*") if p.is_file()]) == 3  # one kept pick per validator


def test_eval_evaluates_a_kept_pick_and_bad_sizes_are_one_line(tmp_path, capsys):
    root = write_fake_data_root(tmp_path / "data", count=24)
    tiny = ["--image-size", "16", "--channels", "1", "--bottleneck-dim", "16", "--batch-size", "8"]
    tiny += ["--method-param", "disc_hidden=16", "--no-progress", "--data-root", root]
    out = tmp_path / "run"
    base = ["train", "--source", "usps", "--target", "mnistm", "--steps", "4", "--eval-every", "2", *tiny]
    code = main([str(a) for a in [*base, "--select", "snd,oracle", "--out", out]])
    text = capsys.readouterr().out
    assert code == 0 and "label-free pick (bnm, no target labels): step " in text, text
    state = torch.load(out / "last.pt", weights_only=False)
    assert main(["eval", "--checkpoint", str(out), "--select", "snd", "--data-root", str(root)]) == 0
    assert f"step {state['picks']['snd']['step']}, picked by snd)" in capsys.readouterr().out
    code, err = run_cli(["eval", "--checkpoint", out, "--select", "im", "--data-root", root], capsys)
    assert_one_line_error(code, err, "kept no checkpoint picked by 'im'", "kept: oracle, snd")
    code, err = run_cli(["eval", "--checkpoint", out, "--select", "bogus", "--data-root", root], capsys)
    assert_one_line_error(code, err, "unknown validator 'bogus'")
    refused = [
        (["--validators", "sndd"], ["unknown validator 'sndd' (did you mean 'snd'?)"]),
        (["--target-val-size", "25"], ["target_val_size 25 is larger than the target train split", "(24 samples)"]),
        (["--validators", "source_val", "--source-val-fraction", "0.1"], ["too small to hold out", "at least 2"]),
        (["--validators", "source_val"], ["source_val needs a held-out source validation split"]),
        (["--select", "ensv"], ["select: ensv scores a pool"]),
    ]
    for flags, fragments in refused:
        other = tmp_path / "refused"
        code, err = run_cli([*base, *flags, "--out", other], capsys)
        assert_one_line_error(code, err, *fragments)
        assert not other.exists(), flags


def test_config_lists_are_canonical_and_new_keys_keep_existing_hashes():
    assert TrainConfig(validators="snd, entropy,snd").validators == ["entropy", "snd"]
    assert TrainConfig(validators="none").validators == []
    assert TrainConfig(select=["oracle", "snd"]).select == ["snd", "oracle"]
    default = TrainConfig()
    assert default.outcome_hash() == TrainConfig(select_by="snd").outcome_hash()  # a report preference only
    for changed in ({"validators": []}, {"select": ["snd"]}, {"target_val_size": 500}):
        assert TrainConfig(**changed).outcome_hash() != default.outcome_hash(), changed
    assert TrainConfig(source_val_fraction=0.1, validators=["source_val"]).outcome_hash() != default.outcome_hash()
    with pytest.raises(ConfigError, match="select_by must be label-free"):
        TrainConfig(select_by="oracle")
    with pytest.raises(ConfigError, match="select_by: dev is not computed"):
        TrainConfig(select_by="dev")
    assert TrainConfig(select_by="mixval_rank").select_by == "mixval_rank"  # mixval is a default validator
    with pytest.raises(ConfigError, match="select_by: mixval_rank ranks the probes of mixval; add mixval"):
        TrainConfig(select_by="mixval_rank", validators=["snd"])
    with pytest.raises(ConfigError, match="validators: mixval_rank scores a pool of candidates, not one model"):
        TrainConfig(validators=["mixval_rank"])


# ----------------------------------------------------------------------------- the benchmark script
def test_the_model_selection_benchmark_runs_its_stages_then_summarises(tmp_path, capsys, monkeypatch):
    import yaml

    script = benchmark_script(monkeypatch)
    root = write_fake_data_root(tmp_path / "data", count=24)
    runs = tmp_path / "runs"
    grid = {
        "out": str(runs),
        "base": {
            "image_size": 16,
            "channels": 1,
            "bottleneck_dim": 16,
            "batch_size": 8,
            "steps": 6,
            "eval_every": 2,
            "data_root": str(root),
            "threads": 1,
            "method_params": {"disc_hidden": 16},
        },
        "tasks": {"digits usps->mnistm": {"source": "usps", "target": "mnistm"}},
        "methods": ["dann"],
        "variants": {"none": {"harmonizer": "none"}, "gh": {"harmonizer": "gh"}},
        "seeds": [0],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert script.main(["--grids", str(path), "--runs", str(runs), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "### Over the 1 digits tasks" in text
    summary, ranking = text.split("### Candidates for the default validator, over the 1 digits tasks")
    summary, per_method = summary.split("Per method, over the 1 digits tasks")
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines() if line.startswith("| ")}
    method_rows = {line.split("|")[1].strip(): line for line in per_method.splitlines() if line.startswith("| ")}
    assert method_rows["validator"].split("|")[2].strip() == "dann"
    assert method_rows["oracle"].split("|")[2].strip() == "0.00 (0%)"
    for name in ("entropy", "im", "bnm", "snd", "mixval", "ensv", "last", "oracle"):
        assert name in rows, name
    assert rows["oracle"].split("|")[5].strip() == "0.00"  # no regret
    assert rows["mixval"].split("|")[2].strip() == "2" and rows["mixval"].split("|")[8].strip() == "1"
    assert all(rows[name].split("|")[3].strip() == "0" for name in rows if name != "validator")  # all scored
    ranked_rows = [line.split("|") for line in ranking.splitlines() if line.startswith("| ")][1:]  # no header
    ranked = [cells[2].strip() for cells in ranked_rows]
    assert sorted(ranked) == sorted(["entropy", "im", "bnm", "snd", "mixval", "mixval_rank", "ensv"]), text
    regrets = [float(cells[3]) for cells in ranked_rows]
    assert regrets == sorted(regrets) and "Reference: `last` has a mean regret of" in ranking
    on = gh_decision_rows(collect(runs), "oracle")[0]["oracle_on"]
    assert f"The oracle's pick is a GH run in {on} of the 1 GH on/off decisions" in summary
    assert f'always answering "on" would agree with it in {100 * on}%, always "off" in {100 * (1 - on)}%' in summary
    assert "Validation cost: " in summary and "s per evaluation on average (6 evaluations of 2 runs)" in summary
    assert (runs / "model_selection.md").read_text().startswith("## Label-free model selection")
    assert script.main(["--summary-only", "--runs", str(tmp_path / "empty")]) == 2
    assert "no summary" in capsys.readouterr().err


def test_on_image_benchmarks_validation_reads_the_training_splits_without_augmentation_and_changes_nothing(
    tmp_path,
):
    from fakes.images import write_benchmark_tree
    from test_image_training import image_config

    root = tmp_path / "data"
    write_benchmark_tree(root, "office31", domains=["amazon", "webcam"], per_class=2, size=40)
    plain = image_config(tmp_path / "plain", root, validators=[], steps=2)
    scored = image_config(
        tmp_path / "scored",
        root,
        validators=["entropy", "snd", "mixval"],
        select=["mixval"],
        target_val_size=20,
        steps=2,
    )
    train(plain)
    trainer = Trainer(scored)
    view = trainer.domains["target_eval_view"]
    assert view.transform is not trainer.domains["target"].transform  # the evaluation transforms
    trainer.run()
    a, b = weights(Path(plain.out)), weights(Path(scored.out))
    assert all(torch.equal(v, b[k]) for k, v in a.items() if isinstance(v, torch.Tensor))
    record = read_metrics(scored.out)[-1]
    assert record["validation"]["target_size"] == 20 and math.isfinite(record["validators"]["mixval"])
    assert read_predictions(scored.out, record["step"]).shape == (20, 31)
    held_out = image_config(
        tmp_path / "held_out", root, validators=["source_val", "dev"], source_val_fraction=0.5, steps=1, eval_every=1
    )
    trainer = Trainer(held_out)
    assert len(trainer.domains["source"]) == 31 and len(trainer.validation.source) == 31
    trainer.run()
    assert math.isfinite(read_metrics(held_out.out)[-1]["validators"]["dev"])
