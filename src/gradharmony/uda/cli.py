"""Command line: ``gradharmony train | eval | sweep | report | demo``.

Every field of :class:`gradharmony.uda.config.TrainConfig` is a ``train`` flag (``--eval-every``,
``--data-root``, ...), with the help text written next to the field; ``--config recipe.yaml`` loads
a recipe and flags given on the command line override it.  The resolved configuration is saved as
``<out>/config.yaml``.

A mistake (a bad flag, value, recipe, checkpoint, dataset or ``--out``, a run folder that another
process is writing, a run that diverged) ends in one line on stderr, ``gradharmony: error: ...``,
and exit status 2; ``--debug`` (before or after the command) shows the traceback instead.  An
interrupted run ends with status 130; anything else (a bug) keeps its traceback (status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import math
import os
import re
import sys
import textwrap
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from gradharmony.harmonize import check_mode
from gradharmony.uda.config import (
    ConfigError,
    TrainConfig,
    check_domain,
    field_choices,
    field_range,
    field_type,
    unknown_name_message,
    yaml_error_line,
)
from gradharmony.uda.data import DOMAIN_NAMES, SPLITS, DatasetFormatError, DatasetNotFoundError
from gradharmony.uda.runs import CHECKPOINT_FILE, METRICS_FILE, RunFolderBusy

#: Errors of the user's input: reported in one line with exit status 2, never as a traceback
#: (see :func:`user_error_message`, which also takes file-system errors and divergence).
USER_ERRORS = (ConfigError, RunFolderBusy, DatasetNotFoundError, DatasetFormatError)
#: ``OSError`` numbers that are about the file system the user pointed at (a path that is missing,
#: not a folder, not writable, full, ...): one line naming the path and the reason.
FILE_SYSTEM_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EACCES",
        "EPERM",
        "ENOENT",
        "ENOTDIR",
        "EISDIR",
        "EEXIST",
        "EROFS",
        "ENOSPC",
        "EDQUOT",
        "ENAMETOOLONG",
        "ELOOP",
        "EXDEV",
        "ENOTEMPTY",
        "EBUSY",
    )
    if hasattr(errno, name)
)


class HelpFormatter(argparse.HelpFormatter):
    """Help that wraps between words only (``mnistm-synth`` stays whole) and leaves room for long flags."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``gradharmony: error: ...``, without the usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        """Print the error in one line and exit with status 2."""
        self.exit(2, f"gradharmony: error: {message} (see: {self.prog} --help)\n")


def _flag_type(field: dataclasses.Field) -> Any:
    """The flag's argparse ``type``; for a field whose default is ``None``, the word ``none`` gives
    that default back (``--threads none``, ``--select-by none``), as ``none`` does for a list."""
    base = field_type(field.name)
    base = base if base in (int, float, str) else str
    if field.default is not None:
        return base

    def parse(value: str) -> Any:
        return None if value.strip().lower() == "none" else base(value)

    parse.__name__ = base.__name__  # argparse's "invalid int value" names the type
    return parse


def _name_type(kind: str, valid: Sequence[str], normalise: Callable[[str], str] | None = None) -> Callable[[str], str]:
    """An argparse ``type`` refusing names outside ``valid`` with the recipes' "did you mean" message."""

    def parse(value: str) -> str:
        if normalise is not None:
            with contextlib.suppress(ValueError):  # an unknown name is reported below, with suggestions
                value = normalise(value)
        if value not in valid:
            raise argparse.ArgumentTypeError(unknown_name_message(kind, value, valid))
        return value

    parse.__name__ = kind  # argparse names the type in some messages
    return parse


def domain_help() -> str:
    """The domains a run can use: the digit (and feature) domains, and each image benchmark's."""
    from gradharmony.uda.data.benchmarks import BENCHMARKS

    images = ", ".join(f"{name} ({', '.join(b.domains)})" for name, b in BENCHMARKS.items())
    return (
        f"a digit or feature domain: {', '.join(DOMAIN_NAMES)}; or an image-benchmark domain, written "
        f"benchmark:domain (e.g. office31:amazon): {images}"
    )


def _help_text(field: dataclasses.Field, default: Any) -> str:
    text = field.metadata.get("help", "")
    if field.name == "source":
        text += f": {domain_help()}"
    if isinstance(default, list):
        shown = ",".join(default) or "none"
    else:
        shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else default
    allowed = field_range(field)
    detail = f"{allowed}; default: {shown}" if allowed else f"default: {shown}"
    return (text + f" ({detail})").replace("%", "%%")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, in its section, with its help, choices and default."""
    choices = field_choices()
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument(
        "--config",
        type=Path,
        metavar="RECIPE.yaml",
        help="a YAML recipe (field: value per line, as in <out>/config.yaml); flags given on the "
        "command line override it",
    )
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(TrainConfig):
        title = field.metadata.get("group", "other")
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.default_factory is not dataclasses.MISSING and field_type(field.name) is list:
            group.add_argument(
                flag,
                type=str,
                default=argparse.SUPPRESS,
                metavar="NAME,...",
                help=_help_text(field, field.default_factory()),
            )
        elif field.name == "method_params":
            group.add_argument(
                "--method-param",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help=field.metadata["help"] + ", one KEY=VALUE per flag, e.g. --method-param "
                "disc_hidden=512 (a wrong key lists the method's hyper-parameters)",
            )
        elif field.name == "progress":
            group.add_argument(
                "--no-progress",
                dest="progress",
                action="store_false",
                default=argparse.SUPPRESS,
                help="no progress bar",
            )
        elif isinstance(default, bool):
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=_help_text(field, default)
            )
        elif field.name in choices:
            valid = choices[field.name]
            text = _help_text(field, default)
            if not set(valid) <= set(re.findall(r"[\w+-]+", field.metadata.get("help", ""))):  # not all named yet
                text = text.replace(" (default:", "; one of: %(choices)s (default:")
            kind = "harmonizer mode" if field.name == "harmonizer" else field.name
            group.add_argument(
                flag,
                type=_name_type(kind, valid, check_mode if field.name == "harmonizer" else None),
                choices=valid,
                default=argparse.SUPPRESS,
                metavar=field.name.upper(),
                help=text,
            )
        else:
            group.add_argument(
                flag,
                type=_flag_type(field),
                default=argparse.SUPPRESS,
                metavar=field.name.upper(),
                help=_help_text(field, default),
            )


def _method_params(items: list[str]) -> dict[str, Any]:
    params = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--method-param expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return params


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the recipe given by ``--config`` (if any), overridden by the flags given."""
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


def device_line(name: str, threads: int | None = None) -> str:
    """``device: cpu (auto: CUDA not available; 2 CPU threads)``: the device a run will use, and why."""
    import torch

    from gradharmony.uda.engine import resolve_device

    device = resolve_device(name)  # a ConfigError for an unknown or unavailable device
    if name == "auto":
        why = (
            f"auto: CUDA available, {torch.cuda.get_device_name(device)}"
            if device.type == "cuda"
            else "auto: CUDA not available"
        )
    else:
        why = "as requested"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda":  # under torchrun each process takes the GPU of its local rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))))
        why += f"; process {os.environ.get('RANK', '0')} of {world}"
    if device.type == "cpu":
        count = threads or torch.get_num_threads()
        why += f"; {count} CPU thread{'s' if count != 1 else ''}"
    return f"device: {device} ({why})"


def check_run_folder(out: str | os.PathLike) -> None:
    """Refuse, before anything is written, an ``--out`` that cannot become a run folder.

    A :class:`ConfigError` names the path and why: it is a file, or the nearest folder above it
    that exists is a file or is not writable.  Creates nothing.
    """
    path = Path(out)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"--out {out} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {out}: the run folder is not writable (permission denied)")
        return
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:  # the nearest existing folder above
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: cannot create the run folder: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot create the run folder: {parent} is not writable (permission denied)")


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "n/a"


def cmd_train(args: argparse.Namespace) -> int:
    """``gradharmony train``: say which device, then train (or resume) one configuration.

    A run that had already finished is not trained again: its stored result is printed, and
    nothing in its folder changes.
    """
    from gradharmony.uda.engine import train

    cfg = config_from_args(args)
    check_run_folder(cfg.out)
    print(device_line(cfg.device, cfg.threads), flush=True)
    result = train(cfg)
    accuracy = (
        f"target accuracy last {_percent(result.get('last_target_acc'))}, "
        f"best {_percent(result.get('best_target_acc'))} (step {result.get('best_step')}, selected on target "
        f"test labels"
    )
    if result.get("already_finished"):
        print(
            f"already finished: {cfg.method}+{cfg.harmonizer} {cfg.source}->{cfg.target} seed {cfg.seed}, "
            f"{result.get('steps', cfg.steps)} steps: {accuracy}); nothing was changed in {cfg.out}"
        )
        return 0
    print(f"finished {result['steps']} steps: {accuracy} as in the literature); log: {Path(cfg.out) / METRICS_FILE}")
    pick = result.get("pick")
    if pick:
        print(
            f"label-free pick ({pick['validator']}, no target labels): step {pick['step']}, target accuracy "
            f"{_percent(pick['target_acc'])}"
        )
    return 0


def _selected_checkpoint(path: Path, validator: str | None) -> Path:
    """The checkpoint ``gradharmony eval`` reads: ``path`` itself, a run folder's ``last.pt``, or with
    ``validator`` the checkpoint that validator picked in the run folder (its ``select``)."""
    from gradharmony.uda.engine import load_checkpoint
    from gradharmony.uda.runs import selected_path
    from gradharmony.uda.validators import ORACLE, VALIDATORS

    folder = path if path.is_dir() else None
    if validator is not None and validator not in (*VALIDATORS, ORACLE):
        raise ConfigError(unknown_name_message("validator", validator, (*VALIDATORS, ORACLE)))
    if validator is None:
        return folder / CHECKPOINT_FILE if folder is not None else path
    if folder is None:
        raise ConfigError(f"--select {validator} needs the run folder as --checkpoint (got the file {path})")
    state = load_checkpoint(folder / CHECKPOINT_FILE)
    picks = state.get("picks") or {}
    if validator not in picks:
        kept = ", ".join(sorted(picks)) or "none (the run's select was empty)"
        raise ConfigError(
            f"{folder} kept no checkpoint picked by {validator!r}; kept: {kept}. Train with --select {validator} "
            f"to keep it"
        )
    return selected_path(folder, validator, int(picks[validator]["step"]))


def cmd_eval(args: argparse.Namespace) -> int:
    """``gradharmony eval``: a checkpoint's accuracy and per-class accuracy on a domain."""
    import torch

    from gradharmony.uda.engine import evaluate, load_checkpoint, load_eval_domain, load_run, resolve_device
    from gradharmony.uda.engine.builders import run_config

    checkpoint = _selected_checkpoint(args.checkpoint, args.select)
    state = load_checkpoint(checkpoint)  # refuses missing, corrupt and code-carrying files
    cfg = run_config(state, checkpoint)
    target = args.target or cfg.target
    domain = load_eval_domain(cfg, target, args.split, args.data_root or cfg.data_root, cache_dir=args.cache_dir)
    device = resolve_device(args.device)
    input_shape = tuple(domain.images.shape[1:]) if hasattr(domain, "images") else tuple(domain[0][0].shape)
    run = load_run(checkpoint, domain.num_classes, input_shape, device, state=state)
    del state
    with torch.no_grad():
        result = evaluate(run.model, domain, device)
    picked = f", picked by {args.select}" if args.select else ""
    print(
        f"{cfg.method}+{cfg.harmonizer} (trained {cfg.source}->{cfg.target}, step {run.step}{picked}) "
        f"on {target}/{args.split} ({len(domain)} images, {device})"
    )
    print(f"accuracy {100 * result.accuracy:.2f}%   mean per-class accuracy {100 * result.mean_class_accuracy:.2f}%")
    print("per class: " + "  ".join(f"{i}:{100 * a:.1f}" for i, a in enumerate(result.per_class)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``gradharmony demo``: DANN vs DANN+GH vs DANN+GH++, drawn live, then a table and a plot."""
    from gradharmony.uda.demo import run_demo

    run_demo(out=args.out, steps=args.steps, seed=args.seed, workers=args.workers, data_root=args.data_root)
    return 0


#: The ``sweep`` flags that only a cluster launcher uses: their argparse destination -> flag.
CLUSTER_FLAGS = {
    "slurm_partition": "--slurm-partition",
    "slurm_time": "--slurm-time",
    "slurm_gpus_per_job": "--slurm-gpus-per-job",
    "slurm_cpus_per_task": "--slurm-cpus-per-task",
    "slurm_mem_gb": "--slurm-mem-gb",
    "slurm_array_parallelism": "--slurm-array-parallelism",
    "slurm_account": "--slurm-account",
    "slurm_qos": "--slurm-qos",
    "submitit_folder": "--submitit-folder",
    "no_wait": "--no-wait",
}


def _check_launcher_flags(args: argparse.Namespace) -> None:
    """A flag of one launcher given to the other is a :class:`ConfigError` naming it."""
    if args.launcher == "local":
        given = [flag for dest, flag in CLUSTER_FLAGS.items() if getattr(args, dest) not in (None, False)]
        if given:
            raise ConfigError(
                f"{', '.join(given)} applies to --launcher submitit only; the local launcher "
                "(the default) trains on this machine"
            )
    elif args.workers is not None:
        raise ConfigError(
            "--workers applies to --launcher local only; with submitit, limit the jobs running at once "
            "with --slurm-array-parallelism"
        )


def _cluster_options(args: argparse.Namespace) -> Any:
    """The :class:`gradharmony.uda.launchers.ClusterOptions` of the ``sweep`` flags."""
    from gradharmony.uda.launchers import CLUSTERS, DEFAULT_TIME_MIN, ClusterOptions

    return ClusterOptions(
        cluster=CLUSTERS[args.launcher],
        partition=args.slurm_partition,
        time_min=args.slurm_time if args.slurm_time is not None else DEFAULT_TIME_MIN,
        gpus_per_job=args.slurm_gpus_per_job,
        cpus_per_task=args.slurm_cpus_per_task,
        mem_gb=args.slurm_mem_gb,
        array_parallelism=args.slurm_array_parallelism,
        account=args.slurm_account,
        qos=args.slurm_qos,
        folder=args.submitit_folder,
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    """``gradharmony sweep``: run (or list, or submit to SLURM) every run of a grid, then write its report."""
    from gradharmony.uda.report import write_report
    from gradharmony.uda.sweep import expand, load_grid, planned_status, read_archived, run_grid

    _check_launcher_flags(args)
    grid = load_grid(args.grid)
    archived = read_archived(args.skip_archived) if args.skip_archived else frozenset()
    if args.dry_run:
        for run in expand(grid):
            print(
                f"{planned_status(run, archived):8s} {run.task} {run.method} {run.variant} seed {run.seed} -> {run.out}"
            )
        return 0
    if args.launcher == "local":
        counts = run_grid(grid, workers=args.workers, retry_failed=args.retry_failed, archived=archived)
    else:
        from gradharmony.uda.launchers import submit_grid

        counts = submit_grid(
            grid,
            _cluster_options(args),
            wait=not args.no_wait,
            retry_failed=args.retry_failed,
            job_name=f"gradharmony-{args.grid.stem}",
            archived=archived,
        )
        if args.no_wait:
            print(
                f"runs: {counts}; not waiting: run the same command again (without --no-wait) to wait for "
                "the jobs, resubmit the unfinished runs and write the report"
            )
            return 1 if counts.get("failed") or counts.get("busy") else 0
    try:
        md, _ = write_report(grid["out"])
        report = f"report: {md}"
    except ConfigError as error:  # e.g. every run failed before its first evaluation
        report = f"no report: {error}"
    print(f"runs: {counts}; {report}")
    if counts.get("busy"):
        print(
            f"{counts['busy']} run(s) were being written by another process and were left to it; "
            "run the same command again once it has finished"
        )
    if args.launcher != "local" and (counts.get("failed") or counts.get("interrupted")):
        print(
            "run the same command again to resubmit the unfinished runs (add --retry-failed for runs "
            "that recorded an error)"
        )
    return 1 if counts.get("failed") or counts.get("busy") or counts.get("interrupted") else 0


def cmd_report(args: argparse.Namespace) -> int:
    """``gradharmony report``: tables (and optionally plots) from a folder of sweep runs."""
    from gradharmony.uda.report import collect, variant_comparison_markdown, write_report

    if not args.runs.is_dir():
        raise ConfigError(f"runs folder {args.runs} does not exist")
    select = _selectors(args.select)  # an unknown name is refused before any run is read
    cells = collect(args.runs)
    comparison = None
    if args.compare:  # checked before anything is written: a wrong variant name is a clear error
        try:
            comparison = variant_comparison_markdown(cells, *args.compare)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    md, csv_path = write_report(args.runs, args.out, cells, select=select)
    print(md.read_text())
    print(f"written: {md}, {csv_path}")
    if comparison is not None:
        print(comparison)
    if args.plots:
        from gradharmony.uda.plots import plot_sweep

        for path in plot_sweep(args.runs, args.out or args.runs):
            print(f"plot: {path}")
    if args.tsne:
        from gradharmony.uda.plots import plot_tsne
        from gradharmony.uda.runs import labelled_runs

        seen = set()
        for labels, folder in sorted(labelled_runs(args.runs), key=lambda run: run[0]["seed"]):  # lowest seed per cell
            key = (labels["task"], labels["method"], labels["variant"])
            if key in seen or not (folder / CHECKPOINT_FILE).exists():
                continue
            seen.add(key)
            name = "_".join(key).replace("->", "_to_").replace("/", "_").replace("+", "p")
            print(f"t-SNE: {plot_tsne(folder, (args.out or args.runs) / f'tsne_{name}.png', args.tsne_samples)}")
    return 0


def _number_at_least(kind: type, minimum: float) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` (``int`` or ``float``) no smaller than ``minimum``."""

    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {value!r}"
            ) from None
        if not math.isfinite(number) or number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {value}")
        return number

    return parse


def _selectors(values: list[str] | None) -> list[str]:
    """The ``--select`` names (repeatable, or comma-separated), each checked; ``all``: every selector."""
    from gradharmony.uda.selection import check_selectors

    names = [name.strip() for value in values or [] for name in value.split(",") if name.strip()]
    if "all" in names:
        return ["all"]  # every selector the runs can be picked by (report.check_report_selectors)
    return check_selectors(list(dict.fromkeys(names)))


def _domain_name(value: str) -> str:
    try:
        check_domain(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


DEBUG_HELP = "on an error, show the full traceback instead of the one-line message"


def build_parser() -> argparse.ArgumentParser:
    """The ``gradharmony`` parser: one subcommand per job, every flag with its help."""
    parser = Parser(
        prog="gradharmony",
        description="Gradient Harmonization (GH, GH++) for unsupervised domain "
        "adaptation: train, evaluate, sweep, report, demo.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train one configuration (resumes if its --out holds a checkpoint)",
        usage="gradharmony train [-h] [--config RECIPE.yaml] [--FIELD VALUE ...] [--method-param KEY=VALUE ...]",
        description="Train one configuration: a UDA method, optionally with gradient harmonization, from a "
        "source domain to a target domain. Each flag sets one field of the run's config (the same "
        "keys as a YAML recipe, with - for _); the resolved config is saved as <out>/config.yaml. "
        "A run whose --out holds a checkpoint of the same config resumes.",
        epilog="example: gradharmony train --method dann --harmonizer gh++ --source mnist --target mnistm-synth "
        "--steps 3000 --out runs/dann_ghpp",
    )
    _add_config_flags(train)
    train.set_defaults(func=cmd_train, parser=train)

    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on a domain's test split",
        description="Evaluate a run's checkpoint: accuracy, mean per-class accuracy and "
        "per-class accuracy on a domain.",
    )
    ev.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a run's checkpoint (<out>/last.pt, or a kept pick under <out>/selected/), or its run folder; "
        "read safely: tensors and plain values only",
    )
    ev.add_argument(
        "--select",
        metavar="VALIDATOR",
        default=None,
        help="evaluate the checkpoint this validator picked (or oracle), kept by a run trained with "
        "--select VALIDATOR; --checkpoint is then the run folder",
    )
    ev.add_argument(
        "--target",
        type=_domain_name,
        metavar="DOMAIN",
        help=f"domain to evaluate on (default: the run's target): {domain_help()}",
    )
    ev.add_argument(
        "--split", default="test", choices=SPLITS, help="which split of the domain: %(choices)s (default: %(default)s)"
    )
    ev.add_argument("--data-root", type=Path, help="folder holding the datasets (default: the run's data root)")
    ev.add_argument(
        "--cache-dir",
        type=Path,
        help="folder for decoded and generated datasets (default: $GRADHARMONY_CACHE_DIR, else the user cache)",
    )
    ev.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps (default: %(default)s)",
    )
    ev.set_defaults(func=cmd_eval, parser=ev)

    sweep = sub.add_parser(
        "sweep",
        help="run a grid of tasks x methods x variants x seeds (resumable)",
        description="Run every run of a grid (tasks x methods x harmonizer variants x seeds), "
        "each in <out>/<config hash>/, skipping finished runs and resuming "
        "interrupted ones; then write the report. On this machine (default), or on a SLURM cluster "
        "with --launcher submitit: one job array per grid file; the same command again resubmits "
        "what did not finish.",
    )
    sweep.add_argument(
        "grid", type=Path, help="grid YAML: out, base, tasks, methods, variants, seeds (see gradharmony.uda.sweep)"
    )
    sweep.add_argument(
        "--workers",
        type=int,
        default=None,
        help="runs in parallel, one CPU thread each (default: the grid's workers, else 1)",
    )
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and their status only")
    sweep.add_argument(
        "--retry-failed", action="store_true", help="also run again the runs that failed (those with an error.txt)"
    )
    sweep.add_argument(
        "--skip-archived",
        type=Path,
        metavar="JSON",
        help="a JSON object keyed by run folder names (or a list of them) whose runs finished elsewhere and "
        "whose results are kept, e.g. docs/digits_parity/runs.json: those runs are not trained again",
    )
    sweep.add_argument(
        "--launcher",
        choices=("local", "submitit", "submitit-local"),
        default="local",
        help="local: worker processes on this machine (default); submitit: one SLURM job array per grid "
        "file, through submitit (pip install 'gradharmony[slurm]'); submitit-local: the same jobs as "
        "processes on this machine, for testing",
    )
    cluster = sweep.add_argument_group("SLURM (--launcher submitit)")
    cluster.add_argument(
        "--slurm-partition", default=None, metavar="NAME", help="partition to submit to (default: SLURM's)"
    )
    cluster.add_argument(
        "--slurm-time",
        type=_number_at_least(int, 1),
        default=None,
        metavar="MINUTES",
        help="time limit of each run's job, in minutes (default: 60)",
    )
    cluster.add_argument(
        "--slurm-gpus-per-job", type=_number_at_least(int, 0), default=None, metavar="N", help="GPUs per job"
    )
    cluster.add_argument(
        "--slurm-cpus-per-task", type=_number_at_least(int, 1), default=None, metavar="N", help="CPUs per job"
    )
    cluster.add_argument(
        "--slurm-mem-gb", type=_number_at_least(float, 0.001), default=None, metavar="GB", help="memory per job"
    )
    cluster.add_argument(
        "--slurm-array-parallelism",
        type=_number_at_least(int, 1),
        default=None,
        metavar="K",
        help="at most K jobs of the array running at once",
    )
    cluster.add_argument("--slurm-account", default=None, metavar="NAME", help="account to charge")
    cluster.add_argument("--slurm-qos", default=None, metavar="NAME", help="quality of service")
    cluster.add_argument(
        "--submitit-folder",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder for submitit's files and the jobs' logs (default: <grid out>/submitit)",
    )
    cluster.add_argument(
        "--no-wait",
        action="store_true",
        help="submit and return; the same command without it later waits for the jobs (never submitting them twice)",
    )
    sweep.set_defaults(func=cmd_sweep, parser=sweep)

    report = sub.add_parser(
        "report",
        help="tables (mean +- std, paired deltas) from a folder of sweep runs",
        description="Tables from a folder of sweep runs: target accuracy per task, method "
        "and variant (mean +- std over seeds, paired deltas); report.md and "
        "report.csv.",
    )
    report.add_argument("runs", type=Path, help="the sweep's runs folder (its out)")
    report.add_argument("--out", type=Path, default=None, help="folder for report.md/csv (default: RUNS)")
    report.add_argument(
        "--plots", action="store_true", help="also PNGs per task and method: angle, conflict rate, weights, accuracy"
    )
    report.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="also pair variant A with variant B seed by seed (e.g. gh++/align gh++/cls)",
    )
    report.add_argument(
        "--select",
        action="append",
        metavar="VALIDATOR",
        default=None,
        help="also the target accuracy at each of these validators' picks, with the regret to the oracle "
        "(repeatable or comma-separated; validators, mixval_rank, ensv, last, oracle, or all); the first label-free one "
        "is the pick of the main tables and decides GH on or off (default: the runs' select_by)",
    )
    report.add_argument("--tsne", action="store_true", help="also a t-SNE of source/target features per cell")
    report.add_argument(
        "--tsne-samples", type=int, default=500, help="test images per domain in each t-SNE (default: %(default)s)"
    )
    report.set_defaults(func=cmd_report, parser=report)

    demo = sub.add_parser(
        "demo",
        help="DANN vs DANN+GH vs DANN+GH++ on MNIST -> MNIST-M (offline recipe)",
        description="Train DANN, DANN+GH and DANN+GH++ on MNIST -> MNIST-M (built offline "
        "from real photos), side by side on the CPU, showing their progress; "
        "then print their target accuracies and plot the gradient geometry. "
        "About 6 minutes on 2 CPU cores; interrupted, it resumes.",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("runs/demo"),
        help="folder for the three runs and geometry.png (default: %(default)s)",
    )
    demo.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per run (default: the demo's budget, 3000; e.g. 60 for a quick look)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed, shared by the three runs (default: 0)")
    demo.add_argument(
        "--workers", type=int, default=None, help="runs in parallel (default: all three, one CPU thread each)"
    )
    demo.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder for the dataset cache (default: $GRADHARMONY_DATA_ROOT, else ./data)",
    )
    demo.set_defaults(func=cmd_demo, parser=demo)
    for command in (train, ev, sweep, report, demo):  # --debug also after the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _refuse_unknown(parser: argparse.ArgumentParser, unknown: list[str]) -> typing.NoReturn:
    flags = [option for action in parser._actions for option in action.option_strings]
    first = next((arg.split("=", 1)[0] for arg in unknown if arg.startswith("--")), None)
    hint = difflib.get_close_matches(first, flags, n=1) if first else []
    maybe = f" (did you mean {hint[0]}?)" if hint else ""
    parser.error(f"unrecognized arguments: {' '.join(unknown)}{maybe}")


def one_line(message: object) -> str:
    r"""``message`` on one line: its lines joined (``Looked at:`` followed by its paths, ``;`` between items).

    Example:
        >>> one_line("dataset 'usps' not found. Looked at:\n  /data/usps.h5 (missing)\n  /data/usps (missing)")
        "dataset 'usps' not found. Looked at: /data/usps.h5 (missing); /data/usps (missing)"
    """
    text = ""
    for line in str(message).splitlines():
        line = line.strip()
        if not line:
            continue
        if not text:
            text = line
        elif text.endswith((":", ".", ";", ",")):
            text += " " + line
        else:
            text += "; " + line
    return text


def _method_refusal(error: BaseException) -> str | None:
    """The name of the UDA method whose constructor raised ``error`` (its own range checks), if one did."""
    from gradharmony.uda.methods import Method

    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        if isinstance(owner, Method):
            return type(owner).name or type(owner).__name__
        tb = tb.tb_next
    return None


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix, or ``None`` for anything else (a bug).

    User errors: a configuration or checkpoint (:class:`ConfigError`), a run folder that another
    process is writing, a dataset that is missing or unreadable, invalid YAML, a file-system error
    on a path (missing, not a folder, not writable, full, ...), a run that diverged, and a
    method's own refusal of its hyper-parameters.
    """
    from gradharmony.uda.engine import TrainingDiverged

    if isinstance(error, USER_ERRORS):
        return one_line(error)
    if isinstance(error, TrainingDiverged):
        return f"training diverged: {one_line(error)}"
    if isinstance(error, yaml.YAMLError):
        return f"invalid YAML: {yaml_error_line(error)}"
    if isinstance(error, OSError) and error.errno in FILE_SYSTEM_ERRNOS and error.filename is not None:
        where = str(error.filename) + (f" -> {error.filename2}" if error.filename2 is not None else "")
        return f"cannot use {where}: {error.strerror}"
    if isinstance(error, FileNotFoundError) and error.errno is None:  # raised by the toolkit with its own words
        return one_line(error)
    if isinstance(error, ValueError):
        method = _method_refusal(error)
        if method is not None:
            return f"method_params of {method}: {one_line(error)}"
    return None


def _error(message: str) -> int:
    print(f"gradharmony: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits with 2 on a bad flag itself).

    An error the user can fix (:func:`user_error_message`) is one line on stderr and status 2, or
    with ``--debug`` the traceback; any other exception keeps its traceback.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _refuse_unknown(args.parser, unknown)
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        print(f"\ngradharmony: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as e:
        message = None if args.debug else user_error_message(e)
        if message is None:
            raise
        return _error(message)


if __name__ == "__main__":
    sys.exit(main())
