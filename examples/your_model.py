"""Your model, your data: evaluate a classifier trained outside ood on your own image folders.

This script makes a tiny image-folder dataset (three coloured classes, a grey-noise and a checkerboard OOD set, 32 px
PNGs), trains a torchvision ResNet-18 on it with a plain PyTorch loop, saves its state dict, and evaluates it with
`ood.evaluate`: every detector from one cached pass, a pandas table, the run folder (results.jsonl, scores.npz,
figures/, overlap.json, preprocessing.json). The same evaluation from the command line:

    ood-eval backbone=torchvision backbone.name=resnet18 backbone.weights=<out>/resnet18.pth data=folder \
        data.root=<out>/data/id '+data.ood.near={noise: <out>/data/noise}' \
        '+data.ood.far={checkers: <out>/data/checkers}' data.image_size=32 data.resize=32

Run: python examples/your_model.py [--out DIR] [--detectors msp,energy,knn] [--steps 30]
(`--detectors msp,my_detectors.FeatureNorm` adds a detector of your own, with its folder on PYTHONPATH:
`PYTHONPATH=. python examples/your_model.py ...`; docs/adding_a_detector.md)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

import ood


def make_folders(root: Path, per_class: int = 8, size: int = 32) -> None:
    """root/id/{train,test}/<class>/*.png and two OOD folders, root/noise and root/checkers."""
    rng = np.random.default_rng(0)

    def save(path: Path, pixels: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)

    for split, n in (("train", per_class), ("test", per_class // 2)):
        for k, name in enumerate(("red", "green", "blue")):
            for i in range(n):
                image = rng.normal(60, 30, (size, size, 3))
                image[..., k] += 150
                save(root / "id" / split / name / f"{i}.png", image)
    for i in range(6):
        save(root / "noise" / f"{i}.png", rng.normal(128, 40, (size, size, 3)))
        tiles = (np.indices((size, size)).sum(0) // (2 + i % 4)) % 2
        save(root / "checkers" / f"{i}.png", np.repeat(tiles[..., None] * 255.0, 3, axis=2))


def train_outside(train_dir: Path, steps: int = 30) -> torch.nn.Module:
    """A plain PyTorch training loop: nothing from ood."""
    transform = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    data = torchvision.datasets.ImageFolder(str(train_dir), transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=len(data.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    return model.eval()


def main(out: Path, detectors: str | list[str] = "all", steps: int = 30) -> ood.Results:
    make_folders(out / "data")
    model = train_outside(out / "data" / "id" / "train", steps)
    torch.save(model.state_dict(), out / "resnet18.pth")
    results = ood.evaluate(
        model,
        id_data=out / "data" / "id",
        ood_data={"near": {"noise": out / "data" / "noise"}, "far": {"checkers": out / "data" / "checkers"}},
        detectors=detectors,
        image_size=32,
        resize=32,
        num_workers=0,
        output_dir=out / "run",
    )
    print(results.table.round(4).to_string())
    print(f"run folder: {results.run_dir}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--detectors", default="all",
                        help="all, fast, cached, or a comma-separated list of names (a detector of your own by its import "
                             "path, my_detectors.FeatureNorm, its folder on PYTHONPATH: docs/adding_a_detector.md)")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    args = parser.parse_args()
    chosen = args.detectors if args.detectors in ("all", "cached", "fast") else args.detectors.split(",")
    main(args.out or Path(tempfile.mkdtemp(prefix="ood-example-")), chosen, args.steps)
