"""Command line: ``gradharmony train | eval | sweep | report | demo``.

Every field of :class:`gradharmony.config.TrainConfig` is a ``train`` flag (``--eval-every``,
``--data-root``, ...); ``--config recipe.yaml`` loads a recipe and flags given on the command line
override it.  The resolved configuration is saved as ``<out>/config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from gradharmony.config import ConfigError, TrainConfig

# Fields with their own flag spelling or parsing.
SPECIAL_FIELDS = ("method_params", "progress")


def _flag_type(field: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    return base if base in (int, float, str) else str


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(TrainConfig):
        if field.name in SPECIAL_FIELDS:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"(default: {default})")
        else:
            parser.add_argument(flag, type=_flag_type(field), default=argparse.SUPPRESS, metavar=field.name.upper(),
                                help=f"(default: {default})")
    parser.add_argument("--method-param", action="append", default=[], metavar="KEY=VALUE",
                        help="a method hyper-parameter, e.g. --method-param randomized=true (repeatable)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                        help="no progress bar")
    parser.add_argument("--config", type=Path, help="YAML recipe; command-line flags override it")


def _method_params(items: list[str]) -> dict[str, Any]:
    params = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--method-param expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return params


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = set(TrainConfig.field_names())
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    extra = _method_params(args.method_param)
    if args.config is not None:
        base = TrainConfig.from_yaml(args.config)
        if extra:
            overrides["method_params"] = {**base.method_params, **extra}
        return base.with_overrides(overrides)
    if extra:
        overrides["method_params"] = extra
    return TrainConfig.from_dict(overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from gradharmony.engine import train

    cfg = config_from_args(args)
    result = train(cfg)
    print(f"finished {result['steps']} steps: target accuracy last {100 * result['last_target_acc']:.2f}%, "
          f"best {100 * result['best_target_acc']:.2f}% (step {result['best_step']}, selected on target "
          f"test labels as in the literature); log: {Path(cfg.out) / 'metrics.jsonl'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from gradharmony.engine import build_model, evaluate, load_eval_domain, resolve_device
    from gradharmony.runlog import load_checkpoint

    if not args.checkpoint.is_file():
        raise ConfigError(f"checkpoint {args.checkpoint} does not exist")
    state = load_checkpoint(args.checkpoint)
    cfg = TrainConfig.from_dict(state["config"])
    target = args.target or cfg.target
    domain = load_eval_domain(cfg, target, args.split, args.data_root or cfg.data_root)
    device = resolve_device(args.device)
    input_shape = tuple(domain.images.shape[1:]) if hasattr(domain, "images") else tuple(domain[0][0].shape)
    num_classes = domain.num_classes
    model = build_model(cfg, num_classes, input_shape).to(device)
    model.load_state_dict(state["model"])
    with torch.no_grad():
        result = evaluate(model, domain, device)
    print(f"{cfg.method}+{cfg.harmonizer} (trained {cfg.source}->{cfg.target}, step {state['step']}) "
          f"on {target}/{args.split} ({len(domain)} images)")
    print(f"accuracy {100 * result.accuracy:.2f}%   mean per-class accuracy {100 * result.mean_class_accuracy:.2f}%")
    print("per class: " + "  ".join(f"{i}:{100 * a:.1f}" for i, a in enumerate(result.per_class)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gradharmony.demo import run_demo

    run_demo(out=args.out, steps=args.steps, seed=args.seed, workers=args.workers, data_root=args.data_root)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from gradharmony.report import write_report
    from gradharmony.sweep import expand, load_grid, run_grid, run_status

    grid = load_grid(args.grid)
    if args.dry_run:
        for run in expand(grid):
            print(f"{run_status(run):8s} {run.task} {run.method} {run.variant} seed {run.seed} -> {run.out}")
        return 0
    counts = run_grid(grid, workers=args.workers, retry_failed=args.retry_failed)
    md, _ = write_report(grid["out"])
    print(f"runs: {counts}; report: {md}")
    return 1 if counts.get("failed") else 0


def cmd_report(args: argparse.Namespace) -> int:
    from gradharmony.report import collect, variant_comparison_markdown, write_report

    if not args.runs.is_dir():
        raise ConfigError(f"runs folder {args.runs} does not exist")
    cells = collect(args.runs)
    comparison = None
    if args.compare:  # checked before anything is written: a wrong variant name is a clear error
        try:
            comparison = variant_comparison_markdown(cells, *args.compare)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    md, csv_path = write_report(args.runs, args.out, cells)
    print(md.read_text())
    print(f"written: {md}, {csv_path}")
    if comparison is not None:
        print(comparison)
    if args.plots:
        from gradharmony.plots import plot_sweep

        for path in plot_sweep(args.runs, args.out or args.runs):
            print(f"plot: {path}")
    if args.tsne:
        from gradharmony.plots import plot_tsne
        from gradharmony.sweep import labelled_runs

        seen = set()
        for labels, folder in sorted(labelled_runs(args.runs), key=lambda run: run[0]["seed"]):  # lowest seed per cell
            key = (labels["task"], labels["method"], labels["variant"])
            if key in seen or not (folder / "last.pt").exists():
                continue
            seen.add(key)
            name = "_".join(key).replace("->", "_to_").replace("/", "_").replace("+", "p")
            print(f"t-SNE: {plot_tsne(folder, (args.out or args.runs) / f'tsne_{name}.png', args.tsne_samples)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradharmony", description="Gradient Harmonization for UDA")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one configuration (resumes if its --out holds a checkpoint)")
    _add_config_flags(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a domain's test split")
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--target", help="domain to evaluate on (default: the run's target)")
    ev.add_argument("--split", default="test", choices=["train", "test"])
    ev.add_argument("--data-root", type=Path)
    ev.add_argument("--device", default="cpu")
    ev.set_defaults(func=cmd_eval)

    sweep = sub.add_parser("sweep", help="run a grid of tasks x methods x variants x seeds (resumable)")
    sweep.add_argument("grid", type=Path, help="grid YAML (see gradharmony.sweep)")
    sweep.add_argument("--workers", type=int, default=None, help="runs in parallel, one CPU thread each")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and their status only")
    sweep.add_argument("--retry-failed", action="store_true")
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="tables (mean +- std, paired deltas) from a folder of sweep runs")
    report.add_argument("runs", type=Path)
    report.add_argument("--out", type=Path, default=None, help="folder for report.md/csv (default: RUNS)")
    report.add_argument("--plots", action="store_true",
                        help="also PNGs per task and method: angle, conflict rate, weights, accuracy")
    report.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                        help="also pair variant A with variant B seed by seed (e.g. gh++/align gh++/cls)")
    report.add_argument("--tsne", action="store_true", help="also a t-SNE of source/target features per cell")
    report.add_argument("--tsne-samples", type=int, default=500, help="test images per domain in each t-SNE")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="DANN vs DANN+GH vs DANN+GH++ on MNIST -> MNIST-M (offline recipe)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--steps", type=int, default=None, help="training steps per run (default: the demo's budget)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workers", type=int, default=None, help="runs in parallel (default: all three, one CPU thread each)")
    demo.add_argument("--data-root", type=Path, default=None)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        parser.exit(2, f"gradharmony: error: {e}\n")
    except FileNotFoundError as e:  # missing datasets say where to put them
        parser.exit(2, f"gradharmony: error: {e}\n")
    except KeyboardInterrupt as e:
        parser.exit(130, f"\ngradharmony: {e or 'interrupted'}\n")


if __name__ == "__main__":
    sys.exit(main())
