"""GH in a PyTorch Lightning module (manual optimization).

Lightning's automatic optimization calls ``loss.backward()`` itself; GH replaces that call, so the
module sets ``automatic_optimization = False`` and does the step by hand:

    python docs/examples/lightning_module.py --steps 200 --mode gh++

Single device as written.  With several devices, keep ``Harmonizer(distributed="auto")``: it
averages the gradients itself, exactly, so the model must not also be synchronised by DDP (use
Lightning's ``strategy="ddp"`` only with a no-sync wrapper, or run one process per device and let
the harmonizer average).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from plain_loop import make_domains  # the same synthetic two-domain data
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from gradharmony import GradientReversal, Harmonizer


class HarmonizedDANN(L.LightningModule):
    def __init__(self, mode: str = "gh", max_steps: int = 300, trade_off: float = 1.0):
        super().__init__()
        self.automatic_optimization = False
        self.backbone = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 2)
        self.grl = GradientReversal(max_steps=max_steps)
        self.discriminator = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        self.harmonizer = Harmonizer(mode=mode, scope=[self.backbone, self.head])
        self.trade_off = trade_off

    def training_step(self, batch, batch_idx):
        xs, ys, xt = batch
        self.grl.set_step(self.global_step)
        f = self.backbone(torch.cat([xs, xt]))
        cls_loss = F.cross_entropy(self.head(f[: len(xs)]), ys)
        domain = torch.cat([torch.ones(len(xs)), torch.zeros(len(xt))]).to(f)
        transfer_loss = F.binary_cross_entropy_with_logits(self.discriminator(self.grl(f)).squeeze(1), domain)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        stats = self.harmonizer.backward(cls=cls_loss, align=transfer_loss, trade_off=self.trade_off)
        optimizer.step()
        self.log_dict(
            {
                "cls": cls_loss,
                "transfer": transfer_loss,
                "angle": stats.angle,
                "w_align": stats.w_align,
                "w_cls": stats.w_cls,
            },
            prog_bar=True,
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mode", default="gh", choices=["none", "gh", "gh++", "gh++exact"])
    args = parser.parse_args()
    torch.manual_seed(0)
    xs, ys, xt, yt = make_domains()
    loader = DataLoader(TensorDataset(xs, ys, xt), batch_size=64, shuffle=True)
    model = HarmonizedDANN(args.mode, args.steps)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    with torch.no_grad():
        accuracy = (model.head(model.backbone(xt)).argmax(1) == yt).float().mean().item()
    summary = model.harmonizer.summary()
    print(
        f"target accuracy {100 * accuracy:.1f}%, conflict rate {summary['conflict_rate']:.2f}, "
        f"mean angle {summary['mean_angle']:.1f}, w_align {summary['mean_w_align']:.3f}"
    )


if __name__ == "__main__":
    main()
