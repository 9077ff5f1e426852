"""``torchrun -m gradharmony train``: the engine under torch.distributed (2 gloo processes on CPU)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from gradharmony.uda.engine import Trainer
from gradharmony.uda.runs import read_metrics, read_steps
from test_distributed import exit_without_finalization
from test_engine import config, tiny_domains


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg, queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    trainer = Trainer(cfg, tiny_domains())
    result = trainer.run()
    params = {k: v.detach().numpy().copy() for k, v in trainer.model.named_parameters()}
    queue.put((rank, result, params))
    exit_without_finalization(queue)  # the trainer destroyed its process group


@pytest.mark.parametrize(
    "method, params, harmonizer",
    [
        ("mcc", {}, "gh"),
        ("mcd", {"num_k": 2, "head_hidden": 8}, "gh"),
        ("dann", {"disc_hidden": 16}, "none"),  # plain training (averaged by the method), measured every 2 steps
    ],
)
def test_two_processes_train_one_run_written_by_rank_zero(tmp_path, method, params, harmonizer):
    cfg = config(
        tmp_path,
        method=method,
        method_params=params,
        steps=6,
        eval_every=3,
        harmonizer=harmonizer,
        measure_every=2 if harmonizer == "none" else 0,
    )
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, cfg, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=180) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (_, main, params), (_, other, other_params) = results
    assert main == other  # both report the run that rank 0 wrote
    assert [r["step"] for r in read_metrics(cfg.out)] == [3, 6]
    assert len(list(tmp_path.glob("run/*.pt"))) == 1
    # Averaged gradients and the same harmonizer weights: the replicas never drift apart.
    for name, value in params.items():
        assert (value == other_params[name]).all(), name
    if harmonizer == "none":
        assert [r["measured"] for r in read_steps(cfg.out)] == [True, False] * 3
