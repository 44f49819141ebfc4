"""`ood.data.samples`: each evaluated item named by its image file (or array row) through the dataset wrappers, as
`samples.csv` of a run lists them beside the scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import ConcatDataset, Subset

from ood.data import OODDataModule
from ood.data.cifar import Transformed
from ood.data.datasets import TensorImages
from ood.data.digits import DigitsBenchmark
from ood.data.npy import NpyImages
from ood.data.samples import item_name, item_names


def test_items_are_named_through_the_wrappers(tmp_path: Path) -> None:
    for k, name in enumerate(["b/2.png", "b/1.png", "a/0.png"]):
        (tmp_path / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(tmp_path / "tree" / name)
    folder = torchvision.datasets.ImageFolder(str(tmp_path / "tree"))  # sorted: a/0, b/1, b/2
    np.save(tmp_path / "x.npy", np.zeros((3, 4, 4, 3), np.uint8))
    array = NpyImages(tmp_path / "x.npy", transform=lambda image: image)
    both = ConcatDataset([Transformed(folder, lambda image: image), array])
    picked = Subset(Subset(both, [4, 0, 3, 2]), [3, 0, 1])  # items 2, 4, 0 of `both`
    tree = tmp_path / "tree"
    assert [item_name(picked, i) for i in range(3)] == [str(tree / "b/2.png"), f"{tmp_path / 'x.npy'}[1]", str(tree / "a/0.png")]
    # tensors held in memory have no file: known by the row of the evaluated set
    memory = Subset(TensorImages(torch.zeros(5, 1, 2, 2)), [3, 4])
    assert item_name(memory, 1) is None and item_names(memory, [1, 0], "mnist") == ["mnist[1]", "mnist[0]"]


def test_a_cut_ood_set_is_named_by_its_rows() -> None:
    """Digits sets live in memory: their items are `<set>[row]`, the rows of the (cut) evaluated set."""
    datamodule = OODDataModule(DigitsBenchmark(n_far=40, n_val_ood=20, n_outliers=10), ood_subset="first_fifth")
    far = next(split.name for split in datamodule.eval_splits if split.role == "ood")
    assert datamodule.sample_names(far, [0, 7]) == [f"{far}[0]", f"{far}[7]"]
    assert datamodule.sample_names("test", [2]) == ["test[2]"]
