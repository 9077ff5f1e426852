"""The training loop on tiny in-memory domains: resume equivalence, skipping, logs, NaN handling,
the one update contract, and plain training under ``--harmonizer none``."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from gradharmony.uda.config import ConfigError, TrainConfig
from gradharmony.uda.data import Domain
from gradharmony.uda.engine import CheckpointError, Trainer, TrainingDiverged, train
from gradharmony.uda.runs import TIMING_FIELDS, read_metrics, read_steps
from trainer_faults import nan_cls_loss_from, sigint_during_step


def tiny_domain(name: str, split: str, n: int, shift: float, seed: int) -> Domain:
    """Class k is a bright bar at row 2k (+ noise); the target domain is brighter overall."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.rand(n, 1, 16, 16, generator=g) * 60 + shift
    for i, k in enumerate(labels.tolist()):
        images[i, 0, 3 * k + 2 : 3 * k + 4, 3:13] += 150
    return Domain(name, split, images.clamp(0, 255).to(torch.uint8), labels, num_classes=4)


def tiny_domains() -> dict[str, Domain]:
    return {
        "source": tiny_domain("s", "train", 48, 0, 0),
        "target": tiny_domain("t", "train", 48, 60, 1),
        "source_test": tiny_domain("s", "test", 16, 0, 2),
        "target_test": tiny_domain("t", "test", 16, 60, 3),
    }


def config(tmp_path, **overrides) -> TrainConfig:
    values = dict(
        method="dann",
        harmonizer="gh",
        image_size=16,
        channels=1,
        bottleneck_dim=16,
        steps=12,
        batch_size=8,
        eval_every=4,
        out=str(tmp_path / "run"),
        progress=False,
        method_params={"disc_hidden": 16},
    )
    return TrainConfig(**{**values, **overrides})


def interrupted_run(cfg: TrainConfig, at_step: int, signum: int = signal.SIGINT) -> None:
    """Run ``cfg`` and press Ctrl-C (a real SIGINT; or send ``signum``) in the middle of step ``at_step - 1``."""
    trainer = Trainer(cfg, tiny_domains())
    sigint_during_step(trainer, at_step - 1, signum)  # arrives mid-step: the step still completes
    with pytest.raises(KeyboardInterrupt, match="resume"):
        trainer.run()


def without_timing(records):
    """Records without wall-clock times and output paths (which legitimately differ)."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k not in TIMING_FIELDS}
        r["config"] = {k: v for k, v in r["config"].items() if k != "out"}
        out.append(r)
    return out


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_supervisors_sigterm_or_a_closed_terminals_sighup_stops_like_ctrl_c(tmp_path, monkeypatch, name):
    from gradharmony.uda import stopping

    detached = []  # a hang-up points the terminal's output at /dev/null: not pytest's own terminal here
    monkeypatch.setattr(stopping, "detach_from_terminal", lambda: detached.append(True))
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # pytest may run under nohup, which ignores it
    try:
        _stops_like_ctrl_c(tmp_path, getattr(signal, name))
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert detached == ([True] if name == "SIGHUP" else [])


def _stops_like_ctrl_c(tmp_path, signum: int) -> None:
    straight = config(tmp_path / "a")
    train(straight, tiny_domains())
    resumed = config(tmp_path / "b")
    interrupted_run(resumed, at_step=6, signum=signum)  # the step finishes, then a checkpoint
    assert torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=False)["step"] == 6
    train(resumed, tiny_domains())
    assert without_timing(read_metrics(straight.out)) == without_timing(read_metrics(resumed.out))
    assert str(read_steps(straight.out)) == str(read_steps(resumed.out))


def test_each_record_times_its_steps_by_the_wall_clock_and_by_the_processs_cpu_time(tmp_path):
    train(config(tmp_path), tiny_domains())
    for record in read_metrics(tmp_path / "run"):
        assert record["seconds_per_step"] > 0
        assert math.isfinite(record["cpu_seconds_per_step"]) and record["cpu_seconds_per_step"] > 0


def test_each_record_names_the_machine_and_software_it_was_trained_on(tmp_path):
    train(config(tmp_path), tiny_domains())
    for record in read_metrics(tmp_path / "run"):
        machine = record["machine"]
        assert (
            machine["torch"] == torch.__version__
            and machine["threads"] == torch.get_num_threads()
            and machine["device"] == "cpu"
        )
        assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and machine["cpu"]


def test_a_checkpoint_without_the_cpu_clock_leaves_only_its_own_interval_untimed(tmp_path):
    """A run resumed mid-interval from a checkpoint written before ``cpu_seconds_per_step`` existed:
    that interval's CPU time is unknown (None, not a partial sum); the next intervals have it."""
    cfg = config(tmp_path)
    interrupted_run(cfg, at_step=6)
    checkpoint = tmp_path / "run" / "last.pt"
    state = torch.load(checkpoint, weights_only=False)
    assert state["interval"]["steps"] == 2
    del state["interval"]["cpu_seconds"]
    torch.save(state, checkpoint)
    train(cfg, tiny_domains())
    cpu = {r["step"]: r["cpu_seconds_per_step"] for r in read_metrics(cfg.out)}
    assert cpu[4] > 0 and cpu[8] is None and cpu[12] > 0


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(harmonizer="gh++", refresh_every=3),
        dict(method="cdan+e", harmonizer="gh++exact", strategy="reweight"),
    ],
)
def test_resumed_run_ends_identical_to_an_uninterrupted_one(tmp_path, overrides):
    straight = config(tmp_path / "a", **overrides)
    result = train(straight, tiny_domains())
    resumed = config(tmp_path / "b", **overrides)
    interrupted_run(resumed, at_step=6)  # mid-interval: between the evaluations at steps 4 and 8
    assert torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=False)["step"] == 6
    result_b = train(resumed, tiny_domains())
    assert result_b["last_target_acc"] == result["last_target_acc"]
    a = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=False)["model"]
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
    # Each record exactly once, and the same records.
    metrics_a, metrics_b = read_metrics(tmp_path / "a" / "run"), read_metrics(tmp_path / "b" / "run")
    assert [m["step"] for m in metrics_b] == [4, 8, 12]
    assert without_timing(metrics_a) == without_timing(metrics_b)
    steps_b = read_steps(tmp_path / "b" / "run")
    assert [r["step"] for r in steps_b] == list(range(12))
    assert str(read_steps(tmp_path / "a" / "run")) == str(steps_b)


@pytest.mark.parametrize(
    "method, params, key",
    [
        ("dann", {"disc_hidden": 16}, "source_acc"),
        ("mcd", {"num_k": 2}, "generator_updates"),
    ],
)
def test_metrics_hold_the_methods_own_scalars(tmp_path, method, params, key):
    cfg = config(tmp_path, method=method, method_params=params)
    train(cfg, tiny_domains())
    last = read_metrics(cfg.out)[-1]
    assert key in last["method_logs_mean"] and key in last["method_logs_last"]
    assert "cls_loss" not in last["method_logs_mean"]  # that one is the record's loss_cls
    if method == "mcd":
        assert last["method_logs_mean"]["generator_updates"] == 2.0
    else:
        assert 0.0 <= last["method_logs_mean"]["source_acc"] <= 1.0


def test_metrics_hold_config_accuracy_and_harmonizer_stats(tmp_path):
    cfg = config(tmp_path)
    train(cfg, tiny_domains())
    records = read_metrics(cfg.out)
    assert len(records) == 3
    last = records[-1]
    assert last["config"] == cfg.to_dict() and last["config_hash"] == cfg.outcome_hash()
    assert 0.0 <= last["target_acc"] <= 1.0 and len(last["target_per_class_acc"]) == 4
    assert last["best_target_acc"] == max(r["target_acc"] for r in records)
    h = last["harmonizer"]
    assert h["steps"] == 4 and 0.0 <= h["conflict_rate"] <= 1.0 and h["mean_w_align"] >= 1.0
    assert (tmp_path / "run" / "config.yaml").exists()


def test_finished_run_is_not_repeated(tmp_path):
    cfg = config(tmp_path)
    first = train(cfg, tiny_domains())
    trainer = Trainer(cfg, tiny_domains())
    trainer.train_step = lambda: pytest.fail("a finished run must not train again")
    assert first["already_finished"] is False
    assert trainer.run() == {**first, "already_finished": True}


def test_a_different_config_in_the_same_folder_is_refused(tmp_path):
    train(config(tmp_path), tiny_domains())
    with pytest.raises(ConfigError, match="different configuration"):
        train(config(tmp_path, seed=1), tiny_domains())


def test_corrupt_checkpoint_is_reported_by_path(tmp_path):
    cfg = config(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"last\.pt: the file is truncated or not a checkpoint"):
        train(cfg, tiny_domains())


def test_nonfinite_steps_are_skipped_then_the_run_stops_with_a_clear_error(tmp_path):
    cfg = config(tmp_path, steps=40, eval_every=20)
    trainer = Trainer(cfg, tiny_domains())
    nan_cls_loss_from(trainer, 2)
    with pytest.raises(TrainingDiverged, match="non-finite") as error:
        trainer.run()
    assert trainer.step == 12  # 2 good steps, then 10 skipped ones
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert "there is no checkpoint" in str(error.value)  # none written before step 20
    rows = read_steps(cfg.out)  # the diverged steps are logged
    assert [r["step"] for r in rows] == list(range(12)) and "skipped_step" in rows[-1]["guards"]


def test_source_only_bypasses_the_harmonizer(tmp_path):
    cfg = config(tmp_path, method="source_only", method_params={})
    result = train(cfg, tiny_domains())
    assert result["steps"] == 12
    assert read_steps(cfg.out)[0]["guards"] == "no_align"


def test_bottleneck_scope_and_features_strategy_run(tmp_path):
    for i, overrides in enumerate([dict(scope="bottleneck"), dict(strategy="features")]):
        result = train(config(tmp_path / str(i), **overrides), tiny_domains())
        assert 0.0 <= result["last_target_acc"] <= 1.0


def test_jsonl_has_no_nan_literals(tmp_path):
    cfg = config(tmp_path, method="source_only", method_params={})
    train(cfg, tiny_domains())
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def rgb(domains: dict[str, Domain]) -> dict[str, Domain]:
    return {
        k: Domain(d.name, d.split, d.images.repeat(1, 3, 1, 1), d.labels, d.num_classes) for k, d in domains.items()
    }


def test_an_imagenet_scale_backbone_trains_on_in_memory_images(tmp_path):
    cfg = config(tmp_path, backbone="efficientnet_lite0", channels=3, steps=2, eval_every=2, batch_size=4)
    result = train(cfg, rgb(tiny_domains()))
    assert result["steps"] == 2
    with pytest.raises(ConfigError, match="pretrained weights apply"):
        config(tmp_path, pretrained="imagenet")


def test_bf16_autocast_trains_and_resumes_exactly(tmp_path):
    straight = config(tmp_path / "a", amp="bf16")
    result = train(straight, tiny_domains())
    resumed = config(tmp_path / "b", amp="bf16")
    interrupted_run(resumed, at_step=6)
    assert train(resumed, tiny_domains())["last_target_acc"] == result["last_target_acc"]
    a = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items() if isinstance(v, torch.Tensor))


def test_amp_is_refused_for_a_method_whose_own_update_does_not_use_it(tmp_path):
    from gradharmony.uda.methods import METHODS, Method

    assert {name for name, cls in METHODS.items() if not cls.supports_amp} == {"mcd", "gvb", "dwl", "ssrt"}
    for name in ("mcd", "gvb", "dwl", "ssrt"):
        cfg = TrainConfig(method=name, amp="bf16", out=str(tmp_path / name))  # a stored config still loads
        with pytest.raises(ConfigError, match=f"amp bf16: {name} runs its update phases in full precision"):
            Trainer(cfg)  # refused before any data is read (there is none here) or anything written
        assert not (tmp_path / name).exists()

    class Phased(Method):  # a user's method with its own update: refused unless it says it uses amp
        def update(self, batch, context):
            raise NotImplementedError

    class PhasedWithAmp(Phased):
        supports_amp = True

    assert (Phased.supports_amp, PhasedWithAmp.supports_amp) == (False, True)


def test_a_run_that_an_earlier_version_started_with_amp_ignored_resumes_in_full_precision(
    tmp_path, monkeypatch, capsys
):
    from gradharmony.uda.methods import METHODS

    straight = config(tmp_path / "a", method="mcd", method_params={}, steps=6, eval_every=3, amp="bf16")
    resumed = config(tmp_path / "b", method="mcd", method_params={}, steps=6, eval_every=3, amp="bf16")
    with monkeypatch.context() as earlier:  # as before: amp accepted, and ignored by MCD's own update
        earlier.setattr(METHODS["mcd"], "supports_amp", True)
        train(straight, tiny_domains())
        interrupted_run(resumed, at_step=4)
    assert train(resumed, tiny_domains())["steps"] == 6
    assert "note: amp bf16 is ignored: mcd trains in full precision, as this run has so far" in capsys.readouterr().err
    assert without_timing(read_metrics(straight.out)) == without_timing(read_metrics(resumed.out))


def test_fp16_needs_cuda(tmp_path):
    with pytest.raises(ConfigError, match="fp16"):
        Trainer(config(tmp_path, amp="fp16"), tiny_domains())


@pytest.mark.parametrize("method, harmonizer", [("mcd", "gh"), ("gvb", "gh"), ("dwl", "gh"), ("gvb", "none")])
def test_multi_step_methods_train_and_resume_through_the_engine(tmp_path, method, harmonizer):
    params = {} if method == "mcd" else {"disc_hidden": 16} if method == "gvb" else {}
    extra = dict(harmonizer=harmonizer, measure_every=2 if harmonizer == "none" else 0)
    straight = config(tmp_path / "a", method=method, method_params=params, steps=6, eval_every=3, **extra)
    result = train(straight, tiny_domains())
    assert result["steps"] == 6 and 0.0 <= result["last_target_acc"] <= 1.0
    if harmonizer == "none":  # measured at steps 0, 2, 4; plain training in between
        assert [r["measured"] for r in read_steps(straight.out)] == [True, False] * 3
    resumed = config(tmp_path / "b", method=method, method_params=params, steps=6, eval_every=3, **extra)
    interrupted_run(resumed, at_step=4)
    assert train(resumed, tiny_domains())["last_target_acc"] == result["last_target_acc"]
    a = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items() if isinstance(v, torch.Tensor))


def test_the_hash_that_names_run_folders_is_stable():
    # Sweeps name run folders by this hash: a new config field must not rename existing runs.
    assert TrainConfig().outcome_hash() == "c89608463b31d70a"
    assert TrainConfig(amp="bf16").outcome_hash() != TrainConfig().outcome_hash()
    assert TrainConfig(resize_filter="bicubic").outcome_hash() != TrainConfig().outcome_hash()
    assert TrainConfig(out="elsewhere", threads=2).outcome_hash() == TrainConfig().outcome_hash()


def test_tensorboard_events_hold_the_same_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, tensorboard=str(tmp_path / "tb"))
    train(cfg, tiny_domains())
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss_cls", "eval/target_acc", "harmonizer/conflict_rate"} <= set(tags)
    accuracy = [e.value for e in events.Scalars("eval/target_acc")]
    assert accuracy == pytest.approx([r["target_acc"] for r in read_metrics(cfg.out)])


# ----------------------------------------------------------------------------- one contract, plain training
def test_the_loop_calls_update_with_a_batch_and_a_context_for_every_method(tmp_path):
    for method, params in (("dann", {"disc_hidden": 16}), ("mcd", {"num_k": 1})):
        cfg = config(tmp_path / method, method=method, method_params=params, steps=2, eval_every=2, scope="bottleneck")
        trainer = Trainer(cfg, tiny_domains())
        assert not trainer.model.backbone._forward_hooks  # the cut comes from the method, not a hook
        seen = []
        original = trainer.model.update

        def spy(batch, context, _original=original, seen=seen):
            seen.append(
                (
                    type(batch).__name__,
                    context.step,
                    context.harmonizer,
                    context.use_cut,
                    context.distributed,
                    len(batch.source),
                )
            )
            return _original(batch, context)

        trainer.model.update = spy
        trainer.run()
        assert seen == [
            ("Batch", 0, trainer.harmonizer, True, "off", 8),
            ("Batch", 1, trainer.harmonizer, True, "off", 8),
        ]


@pytest.mark.parametrize("scope", ["bottleneck", "heads"])
def test_a_scope_above_the_backbone_probes_stop_at_its_output_with_the_same_update(tmp_path, scope):
    updated, features, cuts = {}, [], []
    for strategy in ("recombine", "reweight"):  # one after the other: each seeds the global RNG
        cfg = config(tmp_path / strategy, scope=scope, strategy=strategy, harmonizer="gh++", steps=1, eval_every=1)
        trainer = Trainer(cfg, tiny_domains())
        model = trainer.model
        expected = {"bottleneck": [model.bottleneck], "heads": [model.bottleneck, model.classifier]}[scope]
        assert [id(p) for p in trainer.harmonizer.scope] == [id(p) for m in expected for p in m.parameters()]
        backward = trainer.harmonizer.backward
        trainer.harmonizer.backward = lambda backward=backward, strategy=strategy, **kwargs: (
            features.append((strategy, kwargs["features"])) or backward(**kwargs)
        )
        upper_leaves = trainer.harmonizer._upper_leaves  # where the harmonizer decides to stop at the cut
        trainer.harmonizer._upper_leaves = lambda *args, upper_leaves=upper_leaves: (
            cuts.append(upper_leaves(*args)) or cuts[-1]
        )
        trainer.train_step()
        updated[strategy] = [p.detach().clone() for p in model.parameters()]
    assert [(s, f.shape) for s, f in features] == [
        ("recombine", (16, model.backbone.out_features)),
        ("reweight", (16, 16)),  # no cut: the shared features, the bottleneck output (bottleneck_dim 16)
    ]
    assert cuts and cuts[0] is not None  # the probes really stopped at the backbone output
    # the cut only saves work: reweight (no cut, three full passes) makes the same update
    for a, b in zip(updated["recombine"], updated["reweight"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("measure_every, measured_steps", [(0, []), (5, [0, 5, 10]), (1, list(range(12)))])
def test_harmonizer_none_trains_plainly_and_measures_every_k_steps(tmp_path, measure_every, measured_steps):
    cfg = config(tmp_path, harmonizer="none", measure_every=measure_every)
    trainer = Trainer(cfg, tiny_domains())
    trainer.run()
    assert trainer.harmonizer.calls == len(measured_steps)
    rows = read_steps(cfg.out)
    assert [r["step"] for r in rows if r["measured"]] == measured_steps
    for r in rows:
        if r["step"] in measured_steps:  # step 0: the reversal coefficient is 0, a tiny alignment gradient
            assert "tiny_norm" in r["guards"] if r["step"] == 0 else math.isfinite(r["angle"])
            assert (r["w_align"], r["w_cls"]) == (1.0, 1.0)
        else:  # plain training: weights 1, empty geometry
            assert r["guards"] == "plain" and math.isnan(r["angle"]) and math.isnan(r["cos"])
            assert (r["w_align"], r["w_cls"]) == (1.0, 1.0)
    per_interval = [sum(1 for s in measured_steps if start <= s < start + 4) for start in (0, 4, 8)]
    assert [m["harmonizer"]["steps"] for m in read_metrics(cfg.out)] == per_interval  # measured steps only


def test_plain_training_is_the_update_of_the_weights_one_harmonizer(tmp_path):
    """``none`` without probes trains as ``none`` measured on every step did, up to rounding."""
    plain = config(tmp_path / "plain", harmonizer="none", method="cdan+e")
    measured = config(tmp_path / "measured", harmonizer="none", method="cdan+e", measure_every=1)
    train(plain, tiny_domains())
    train(measured, tiny_domains())
    a = torch.load(tmp_path / "plain" / "run" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "measured" / "run" / "last.pt", weights_only=False)["model"]
    for key, value in a.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(value, b[key], rtol=1e-4, atol=1e-5, msg=key)
    losses = [r[key] for r in read_steps(plain.out) for key in ("loss_cls", "loss_align")]
    assert losses == pytest.approx(
        [r[key] for r in read_steps(measured.out) for key in ("loss_cls", "loss_align")], rel=1e-4
    )


def test_harmonizer_none_resumes_exactly_with_measured_steps(tmp_path):
    straight = config(tmp_path / "a", harmonizer="none", measure_every=3)
    train(straight, tiny_domains())
    resumed = config(tmp_path / "b", harmonizer="none", measure_every=3)
    interrupted_run(resumed, at_step=5)
    train(resumed, tiny_domains())
    assert without_timing(read_metrics(straight.out)) == without_timing(read_metrics(resumed.out))
    assert str(read_steps(straight.out)) == str(read_steps(resumed.out))
    a = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items() if isinstance(v, torch.Tensor))
