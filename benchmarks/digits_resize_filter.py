"""Does the resize filter matter?  USPS test resized 16 -> 28 two ways, each trained model evaluated on both.

Ours is bilinear with antialiasing (gradharmony.uda.data.transforms.resize); TLlib's ResizeImage
calls PIL's Image.resize, whose default filter is bicubic.  Pass run folders of USPS-target runs
(their last.pt is evaluated); the USPS test set is read from ../shared/data:

    python benchmarks/digits_resize_filter.py runs/digits_parity/<run> [...]
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gradharmony.uda.batches import to_input
from gradharmony.uda.data import usps
from gradharmony.uda.data.transforms import resize
from gradharmony.uda.engine.builders import load_run

torch.set_num_threads(1)
found = usps.locate("test", Path("../shared/data"))
images, labels = usps.read(found, "test", 0, None)
labels = torch.as_tensor(labels).long()
ours = resize(torch.as_tensor(images), 28)
pil = torch.as_tensor(np.stack([np.asarray(Image.fromarray(im[0]).resize((28, 28)))[None] for im in images]))
print("mean |ours - PIL| (0..255):", (ours.float() - pil.float()).abs().mean().item())
for run in sys.argv[1:]:
    model = load_run(Path(run) / "last.pt", 10, (1, 28, 28)).model
    with torch.no_grad():
        acc = {
            name: (model(to_input(x)).argmax(1) == labels).float().mean().item() * 100
            for name, x in (("ours", ours), ("pil_bicubic", pil))
        }
    print(run, acc)
