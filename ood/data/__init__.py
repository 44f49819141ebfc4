"""Datasets and the benchmark DataModule."""

from ood.data.benchmark import Benchmark, CSIDSet, EvalSplit, Indexed, OODDataModule, OODSet
from ood.data.cifar import CIFAR10Benchmark, CIFAR100Benchmark, CIFARBenchmark
from ood.data.digits import DigitsBenchmark
from ood.data.files import FileBenchmark
from ood.data.imglist import ImageList
from ood.data.npy import NpyImages

__all__ = [
    "Benchmark",
    "CIFAR100Benchmark",
    "CIFAR10Benchmark",
    "CIFARBenchmark",
    "CSIDSet",
    "DigitsBenchmark",
    "FileBenchmark",
    "EvalSplit",
    "ImageList",
    "Indexed",
    "NpyImages",
    "OODDataModule",
    "OODSet",
]
