"""What a run was trained on: the one thing besides its configuration that its numbers depend on.

Training is bit-identical when repeated on the same machine and software with the same number of
threads, and differs across machines (other SIMD kernels, other rounding): a paired comparison whose
two runs trained on different machines pairs less than it seems.  Each evaluation record therefore
names the machine (:func:`describe_machine`), so a report can tell which pairs shared one.

>>> import torch
>>> sorted(describe_machine(torch.device("cpu")))
['cpu', 'cpu_capability', 'device', 'threads', 'torch']
"""

from __future__ import annotations

import platform
from functools import cache

import torch


@cache
def _cpu_name() -> str:
    """The CPU's model name with its family and model numbers (Linux), else what ``platform`` knows."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def describe_machine(device: torch.device) -> dict[str, str | int]:
    """The CPU, torch's CPU kernel level, torch's version and threads, and the training device."""
    return {
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
    }
