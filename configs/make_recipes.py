"""Write one sweep recipe per method x benchmark (configs/<benchmark>/<method>.yaml).

    python configs/make_recipes.py            # rewrites the YAML files from the tables below
    gradharmony sweep configs/office31/dann.yaml --workers 1      # all six Office-31 tasks x {none, gh, gh++} x 3 seeds
    gradharmony report runs/office31/dann

Settings follow TLlib's published training scripts for these benchmarks (ResNet-50 for Office,
ResNet-101 for VisDA-2017 and DomainNet, ImageNet weights, SGD with nesterov momentum 0.9, weight
decay 1e-3, lr * (1 + 0.001 i)^-0.75, backbone at 0.1x the head learning rate, batch 32, 1000
steps per "epoch"); the trade-off is 1.  SSRT (ViT-B/16) follows the GH authors' SSRT scripts instead
(METHODS and METHOD_BENCHMARK below).  They are a starting point to check against each paper
before claiming a reproduction.  GH++ uses each method's own lead (DESIGN section 2).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

BENCHMARKS = {
    "office31": {
        "domains": ["amazon", "dslr", "webcam"],
        "base": {"backbone": "resnet50", "steps": 20000, "eval_every": 1000, "lr": 0.01},
    },
    "officehome": {
        "domains": ["Art", "Clipart", "Product", "Real_World"],
        "base": {"backbone": "resnet50", "steps": 30000, "eval_every": 1000, "lr": 0.01},
    },
    "visda2017": {
        "tasks": [("synthetic", "real")],
        "base": {"backbone": "resnet101", "steps": 15000, "eval_every": 500, "lr": 0.002},
    },
    "domainnet": {
        "domains": ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"],
        "base": {"backbone": "resnet101", "steps": 200000, "eval_every": 5000, "lr": 0.01},
    },
}
COMMON = {
    "pretrained": "imagenet",
    "batch_size": 32,
    "bottleneck_dim": 256,
    "resize": 256,
    "crop": 224,
    "loader_workers": 4,
    "device": "auto",
    "method_params": {"backbone_lr_mult": 0.1},
}
# Per-method departures from COMMON (TLlib's scripts: MDD and MCD use wider bottlenecks).
METHODS = {
    "source_only": {},
    "dann": {},
    "cdan": {},
    "cdan+e": {},
    "mdd": {"bottleneck_dim": 1024},
    "mcc": {},
    "mcd": {"bottleneck_dim": 1024},
    "gvb": {},
    "dwl": {},
    # SSRT on ViT-B/16: the GH authors' ssrt/main_SSRT_GH{,++}.*.py and their trainer defaults (SGD nesterov
    # 0.9, weight decay 5e-4, lr * (1 + 0.001 i)^-0.75, ViT at 0.1x, batch 32, bottleneck 1024).
    "ssrt": {
        "backbone": "vit_base_patch16_224",
        "bottleneck_dim": 1024,
        "weight_decay": 5e-4,
        "method_params": {
            "sr_loss_weight": 0.2,
            "sr_alpha": 0.3,
            "sr_layers": [0, 4, 8],
            "sr_epsilon": 0.4,
            "safe_training": True,
            "safe_period": 1000,
            "safe_levels": 4,
        },
    },
}
# Per-method, per-benchmark departures (applied last; method_params are merged key by key).  SSRT: each
# script's --lr, --train_epoch x 1000 iterations, --eval_epoch x 1000, and its dataset's bottleneck
# (2048 for Office-Home) and --sr_alpha (0.2 for Office-31).
METHOD_BENCHMARK = {
    "ssrt": {
        "office31": {"lr": 0.001, "steps": 10000, "eval_every": 2000, "method_params": {"sr_alpha": 0.2}},
        "officehome": {"lr": 0.004, "steps": 20000, "eval_every": 5000, "bottleneck_dim": 2048},
        "visda2017": {"lr": 0.002, "steps": 20000, "eval_every": 5000},
        "domainnet": {"lr": 0.004, "steps": 40000, "eval_every": 5000},
    },
}
VARIANTS = {"none": {"harmonizer": "none"}, "gh": {"harmonizer": "gh"}, "gh++": {"harmonizer": "gh++"}}


def tasks(benchmark: str, spec: dict) -> dict[str, dict]:
    pairs = spec.get("tasks") or list(itertools.permutations(spec["domains"], 2))
    return {f"{s}->{t}": {"source": f"{benchmark}:{s}", "target": f"{benchmark}:{t}"} for s, t in pairs}


def merged(*layers: dict) -> dict:
    """Later layers win; ``method_params`` are merged key by key."""
    out: dict = {}
    for layer in layers:
        params = {**out.get("method_params", {}), **layer.get("method_params", {})}
        out.update(layer)
        if params:
            out["method_params"] = params
    return out


def recipe(benchmark: str, method: str) -> dict:
    spec = BENCHMARKS[benchmark]
    base = merged(COMMON, spec["base"], METHODS[method], METHOD_BENCHMARK.get(method, {}).get(benchmark, {}))
    if method == "source_only":
        variants = {"none": {"harmonizer": "none"}}  # nothing to harmonize
    else:
        variants = VARIANTS
    return {
        "out": f"runs/{benchmark}/{method}",
        "base": base,
        "tasks": tasks(benchmark, spec),
        "methods": [method],
        "variants": variants,
        "seeds": [0, 1, 2],
    }


def main() -> None:
    for benchmark, method in itertools.product(BENCHMARKS, METHODS):
        path = HERE / benchmark / f"{method}.yaml"
        path.parent.mkdir(exist_ok=True)
        header = f"# {benchmark} x {method}: generated by configs/make_recipes.py (edit the tables there)\n"
        path.write_text(header + yaml.safe_dump(recipe(benchmark, method), sort_keys=False))
        print(path.relative_to(HERE.parent))


if __name__ == "__main__":
    main()
