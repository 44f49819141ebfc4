"""`ood-heatmap ckpt_path=<run folder or checkpoint> image=PATH [out=DIR] [ood-eval overrides]`: heatmaps of your
own images.

Rebuilds the `method=heatmap` run from its `config.yaml` (next to `checkpoints/`), loads the checkpoint (frozen
classifier + decoder + the saved input normalisation and feature range; of a run folder, the one its
evaluation read: `best.ckpt` when trained with `evaluation.weights=best_val_acc`). With `ood-eval`'s overrides
instead, the method is built and loaded as that evaluation builds it, a checkpoint file without its run's config:
the heatmap paper's released pair is `ckpt_path=<Models/cifar10_resnet18.pt> experiment=heatmap_released
data=cifar10 method.decoder_ckpt=<checkpoints/<run>/model.pt>` (docs/methods/heatmap.md). For every image (`image=` a file or a
folder of .png/.jpg/.jpeg/.bmp) writes `<out>/<stem>_heatmap.png` (input | heatmap max_c |M| | overlay, the layout of
the run's `heatmaps/<split>.png`; `<name>_heatmap.png` when images share a stem, `a.png` and `a.jpg`) and prints its ID score (-mean max_c |M|, in [-1, 0]; near 0 = in-distribution)
and predicted class (its name where the run's data config gives it: data=folder's `data.classes` or train class
folders, CIFAR-10 and CIFAR-100; else its index, with a note saying so). Images are converted to the classifier's channels and resized to its input size, and go
through in batches of 64, or of the evaluation's `data.eval_batch_size` under `method.feature_norm=as_released`
(which scales only row 0 of a batch: 200, the released test batch, under `experiment=heatmap_released`), so the
scores are the evaluation's. `out` defaults to `heatmaps/` in the current folder; `-h` / `--help` prints this text.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ood import CONFIG_DIR
from ood.cli import expand_home, load_weights, user_error
from ood.data.hygiene import load_image as load_rgb
from ood.data.sets import class_folders
from ood.errors import CheckpointError, ConfigError, DataNotFoundError
from ood.files import atomic_write
from ood.methods.heatmap import HeatmapOOD, heatmap_grid, heatmap_score
from ood.models.checkpoint import NETWORK_FORMATS, read_checkpoint, read_state_dict
from ood.runs.checks import check_overrides, untrained_parts
from ood.runs.identity import WEIGHTS_FILES
from ood.runs.trained import trained_weights
from ood.utils import instantiate, progress

KEYS = ("ckpt_path", "image", "out")
#: what `ckpt_path=` takes: a run folder opens the checkpoint its evaluation read (`run_checkpoint`)
CKPT_PATH = "ckpt_path=<run folder or checkpoint>"
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: CIFAR-10's class names by label (torchvision's and OpenOOD's order)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: CIFAR-100's fine class names by label (the dataset's `meta` file, torchvision's `CIFAR100.classes`: sorted)
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
)
#: the built-in benchmarks whose class names are known: benchmark class -> (names, torchvision's dataset class,
#: whose `meta` file under `<data_dir>/torchvision/<set>/` names them when the data is there)
BENCHMARK_CLASSES = {"CIFAR10Benchmark": (CIFAR10_CLASSES, "CIFAR10"), "CIFAR100Benchmark": (CIFAR100_CLASSES, "CIFAR100")}
#: what `main` adds when it prints classes as label indices
INDEX_NOTE = ("classes are printed as label indices: the run's data config names none (digits, Tiny ImageNet and "
              "ImageNet's label lists, a train image list, class folders gone since training)")


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(`KEYS` arguments, the other `key=value` ones: `ood-eval` overrides), a path's `~` the home folder as in
    `ood-eval`; an argument without `=`, a key close to one of `KEYS` (`imgae=`: no config key is) or a missing key
    fails naming the choices."""
    import difflib

    args, overrides = {}, []
    for arg in expand_home(argv):
        key, sep, value = arg.partition("=")
        close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6) if sep and key not in KEYS else []
        if not sep or close:
            what = f"unknown key {key!r} (did you mean {close[0]!r}?)" if close else f"unexpected argument {arg!r}"
            raise ConfigError(f"ood-heatmap: {what}; use key=value with keys {list(KEYS)} (or ood-eval's overrides)")
        if key in KEYS:
            args[key] = value
        else:
            overrides.append(arg)
    missing = [k for k in ("ckpt_path", "image") if k not in args]
    if missing:
        raise ConfigError(
            f"ood-heatmap: missing {missing}; usage: ood-heatmap {CKPT_PATH} image=PATH [out=DIR]"
        )
    return args, overrides


def run_checkpoint(ckpt_path: str | Path) -> Path:
    """The checkpoint file `ckpt_path` names: itself, or of a run folder the one its evaluation read
    (`checkpoints/best.ckpt` when trained with `evaluation.weights=best_val_acc`, else `last.ckpt`), so the heatmaps
    are of the network its results are."""
    path = Path(ckpt_path)
    return path / "checkpoints" / WEIGHTS_FILES[trained_weights(path)] if path.is_dir() else path


def load_method(ckpt_path: str | Path,
                overrides: list[str] | None = None) -> tuple[HeatmapOOD, int, list[str] | None]:
    """The trained heatmap method of a run (checkpoint file or run folder), or with `overrides` the one `ood-eval
    ckpt_path=<file> <overrides>` builds (`load_configured`), in eval mode on the CPU; the images per forward
    pass: `BATCH`, or with `method.feature_norm=as_released` (row 0 of a batch scaled) the configuration's
    `data.eval_batch_size`, the batches the evaluation scored; and the class names (`class_names`)."""
    method, cfg = load_configured(ckpt_path, overrides) if overrides else load_run(ckpt_path)
    batch = int(cfg.data.eval_batch_size) if method.feature_norm == "as_released" else BATCH
    return method, batch, class_names(cfg.data)


def class_names(data: DictConfig) -> list[str] | None:
    """The class names by label that the data config `data` gives without reading its images: data=folder's
    `data.classes`, else its train class folders when still there; CIFAR-10's and CIFAR-100's (`benchmark_classes`);
    else None (classes print as indices: `INDEX_NOTE`)."""
    if str(data.get("_target_", "")).endswith("folder_datamodule"):
        if data.get("classes"):
            return [str(c) for c in data.classes]
        train = data.get("train")
        if isinstance(train, DictConfig):  # `{folder: ...}`, or an image list: its labels are indices, unnamed
            train = train.get("folder")
            if train is None:
                return None
        if train is None and data.get("root"):
            train = Path(data.root) / "train"
        return (class_folders(Path(train)) or None) if train is not None and Path(train).is_dir() else None
    benchmark = data.get("benchmark")
    return benchmark_classes(benchmark) if isinstance(benchmark, DictConfig) else None


def benchmark_classes(benchmark: DictConfig) -> list[str] | None:
    """The class names by label of a built-in benchmark (`BENCHMARK_CLASSES`, CIFAR-10's and CIFAR-100's): those of
    the torchvision copy's `meta` file under its `data_dir` when there, else the built-in ones; None for the others."""
    import pickle

    from torchvision import datasets

    known = BENCHMARK_CLASSES.get(str(benchmark.get("_target_", "")).rpartition(".")[2])
    if known is None:
        return None
    names, dataset = known
    data_dir = OmegaConf.select(benchmark, "data_dir", default=None, throw_on_resolution_failure=False)
    tv = getattr(datasets, dataset)
    if data_dir is not None and (meta := Path(str(data_dir)) / "torchvision" / dataset.lower() / tv.base_folder
                                 / tv.meta["filename"]).is_file():
        with meta.open("rb") as file:  # as torchvision reads it
            found = pickle.load(file, encoding="latin1").get(tv.meta["key"])
        if isinstance(found, list) and len(found) == len(names):
            return [str(n) for n in found]
    return list(names)


def class_label(pred: int, classes: list[str] | None) -> str:
    """Class `pred` by its name in `classes`, or its index without one."""
    return classes[pred] if classes and pred < len(classes) else str(pred)


def load_run(ckpt_path: str | Path) -> tuple[HeatmapOOD, DictConfig]:
    """The heatmap method of a run (checkpoint file or run folder) and the run's config."""
    ckpt = run_checkpoint(ckpt_path)
    if not ckpt.is_file():
        raise CheckpointError(
            f"checkpoint {ckpt} not found; pass {CKPT_PATH}"
        )
    config = ckpt.parent.parent / "config.yaml"
    if not config.is_file():
        raise CheckpointError(
            f"{ckpt}: the run's config {config} is missing (ood-heatmap rebuilds the run from it)"
        )
    cfg = OmegaConf.load(config)
    if not str(cfg.method._target_).endswith("HeatmapOOD"):
        raise ConfigError(
            f"{ckpt} is a {cfg.method._target_} run; ood-heatmap needs a method=heatmap checkpoint"
        )
    # the image channels and class count from the weights themselves, so any data config (a built-in benchmark or
    # data=folder) rebuilds without its data: the channels of the input normalisation, and the decoder's input
    # (features + one-hot class) minus the backbone's feature dim
    state = read_state_dict(ckpt)
    channels = int(state["pixel_mean"].shape[0])
    feature_dim = instantiate(cfg.backbone, num_classes=1, in_channels=channels).feature_dim
    num_classes = int(state["decoder.fc.weight"].shape[1]) - feature_dim
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone, num_classes=num_classes, in_channels=channels))
    load_weights(method, ckpt)
    return method.eval(), cfg


def load_configured(ckpt_path: str | Path, overrides: list[str]) -> tuple[HeatmapOOD, DictConfig]:
    """The heatmap method `ood-eval ckpt_path=<file> <overrides>` builds (eval.yaml composed with `overrides`, the
    data's class count and channels) and loads: the released pair's classifier file with `method.decoder_ckpt`, or a
    checkpoint without its run's config. A run folder rebuilds from its own config (`load_run`), so it is refused."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    path = Path(ckpt_path)
    if path.is_dir():
        raise ConfigError(f"ood-heatmap: {path} is a run folder, rebuilt from its config.yaml: drop {overrides}, or "
                          "pass a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass {CKPT_PATH}")
    overrides = check_overrides(CONFIG_DIR, "eval", overrides)  # a misspelt key names the closest
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides, return_hydra_config=True)
    if not str(cfg.method._target_).endswith("HeatmapOOD"):
        raise ConfigError(f"ood-heatmap draws method=heatmap's heatmaps, not {cfg.method._target_}'s: add "
                          "experiment=heatmap_released (the released pair) or the run's method=heatmap preset")
    if untrained_parts(cfg.method) and read_checkpoint(path)[1] in NETWORK_FORMATS:
        raise ConfigError(f"{path} holds the classifier alone: add its decoder file, "
                          "method.decoder_ckpt=<checkpoints/<run>/model.pt> (experiment=heatmap_released)")
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)  # the decoder plan's `method.latent` reads Hydra's data and backbone choices
    try:
        benchmark = instantiate(cfg.data, seed=cfg.seed).benchmark  # no images read: the class count and channels
        backbone = instantiate(cfg.backbone, num_classes=benchmark.num_classes, in_channels=benchmark.in_channels)
        benchmark.check_model_input(backbone)
        method = instantiate(cfg.method, backbone=backbone)
    finally:
        HydraConfig.instance().cfg = previous  # type: ignore[assignment]
    load_weights(method, path)
    return method.eval(), cfg


def image_files(path: str | Path) -> list[Path]:
    """`path` itself, or the images directly inside the folder `path` (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataNotFoundError(f"no {'/'.join(SUFFIXES)} images in folder {path}")
        return files
    if not path.is_file():
        raise DataNotFoundError(f"image {path} not found")
    return [path]


def load_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """Pixels [C, size, size] in [0, 1]: grey or RGB as the classifier expects, bilinearly resized."""
    from PIL import Image

    img = load_rgb(path, hint="")  # one line naming an unreadable file
    img = (img.convert("L") if channels == 1 else img).resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels.reshape(size, size, channels)).permute(2, 0, 1)


#: images per forward pass of `write_heatmaps` (memory stays flat however many images a folder holds)
BATCH = 64


@torch.no_grad()
def write_heatmaps(method: HeatmapOOD, files: list[Path], out: Path, batch: int | None = None,
                   classes: list[str] | None = None) -> list[tuple[Path, float, int]]:
    """Writes one grid PNG per image into `out` (titled with the predicted class's name in `classes`, else its index),
    `batch` (default `BATCH`) images a forward pass; returns (png, ID score, predicted class index) per image."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    channels, size = method.plan.out_channels, method.hparams.input_size
    stems = [f.stem for f in files]
    results, batch = [], batch or BATCH
    with progress(total=len(files), desc="heatmaps", unit="img") as bar:
        for start in range(0, len(files), batch):
            chunk = files[start : start + batch]
            pixels = torch.stack([load_image(f, channels, size) for f in chunk])
            heat, logits, _ = method.heatmap((pixels - method.pixel_mean) / method.pixel_std)
            scores, preds = heatmap_score(heat), logits.argmax(1)
            for i, f in enumerate(chunk):
                title = f"{f.name}: score {scores[i]:.3f}, class {class_label(int(preds[i]), classes)}"
                grid = heatmap_grid(pixels[i : i + 1], heat[i : i + 1].abs().amax(1), title)
                png = out / f"{f.stem if stems.count(f.stem) == 1 else f.name}_heatmap.png"  # a.png and a.jpg: one each
                # atomically: a run killed mid-file leaves no half PNG under its name, a rerun replaces the whole
                atomic_write(png, functools.partial(Image.fromarray(grid).save, format="PNG"))
                results.append((png, float(scores[i]), int(preds[i])))
                bar.update()
    return results


def main(argv: list[str] | None = None) -> None:
    """`ood-heatmap` entry point."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):  # what ood-train and ood-eval answer too
        print(__doc__.strip())
        return
    try:
        args, overrides = parse_args(argv)
        method, batch, classes = load_method(args["ckpt_path"], overrides)
        results = write_heatmaps(method, image_files(args["image"]), Path(args.get("out", "heatmaps")), batch, classes)
    except Exception as err:  # a user's mistake (a config error of the overrides too) is one line, as ood-eval's
        user = user_error(err)
        if user is None:
            raise
        print(f"error: {user}", file=sys.stderr)
        sys.exit(1)
    for png, score, pred in results:
        print(f"{png}  score {score:.4f}  class {class_label(pred, classes)}")
    if classes is None:
        print(f"note: {INDEX_NOTE}", file=sys.stderr)


if __name__ == "__main__":
    main()
