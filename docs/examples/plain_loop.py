"""GH in a plain, TLlib-style DANN training script: three lines change.

Runs on CPU in seconds on synthetic two-domain data, so it can be copied and tried as is:

    python docs/examples/plain_loop.py --steps 200 --mode gh++
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

from gradharmony import GradientReversal, Harmonizer


def make_domains(n: int = 512, shift: float = 1.5, seed: int = 0):
    """Two Gaussian blobs per class; the target domain is the source shifted and rotated."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    source = torch.randn(n, 2, generator=g) + torch.stack([labels * 3.0, labels * 0.0], 1)
    rotation = torch.tensor([[0.8, -0.6], [0.6, 0.8]])
    target = (torch.randn(n, 2, generator=g) + torch.stack([labels * 3.0, labels * 0.0], 1)) @ rotation + shift
    return source, labels, target, labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mode", default="gh", choices=["none", "gh", "gh++", "gh++exact"])
    parser.add_argument("--trade-off", type=float, default=1.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    xs, ys, xt, yt = make_domains()

    backbone = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    head = nn.Linear(32, 2)
    grl = GradientReversal(max_steps=args.steps)
    discriminator = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(
        [*backbone.parameters(), *head.parameters(), *discriminator.parameters()], lr=0.05, momentum=0.9
    )
    # (1) the harmonizer: the Gramian is measured over the shared feature extractor and the head.
    harmonizer = Harmonizer(mode=args.mode, scope=[backbone, head])

    for step in range(args.steps):
        index = torch.randint(0, len(xs), (64,))
        grl.set_step(step)  # the reversal schedule moves with the step, never with forward calls
        f = backbone(torch.cat([xs[index], xt[index]]))
        cls_loss = F.cross_entropy(head(f[:64]), ys[index])
        domain = torch.cat([torch.ones(64), torch.zeros(64)])
        transfer_loss = F.binary_cross_entropy_with_logits(discriminator(grl(f)).squeeze(1), domain)
        optimizer.zero_grad()
        # (2) instead of (cls_loss + args.trade_off * transfer_loss).backward():
        stats = harmonizer.backward(cls=cls_loss, align=transfer_loss, trade_off=args.trade_off)
        optimizer.step()  # (3) unchanged
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            with torch.no_grad():
                accuracy = (head(backbone(xt)).argmax(1) == yt).float().mean().item()
            summary = harmonizer.summary()
            print(
                f"step {step + 1}: target accuracy {100 * accuracy:.1f}%, angle {stats.angle:.1f}, "
                f"conflict rate {summary['conflict_rate']:.2f}, w_align {summary['mean_w_align']:.3f}, "
                f"w_cls {summary['mean_w_cls']:.3f}"
            )
            harmonizer.reset_summary()


if __name__ == "__main__":
    main()
