"""`make parity-openood`: OpenOOD v1.5's released networks evaluated by ood, beside the OpenOOD leaderboard.

`python -m benchmarks.parity_openood --data-dir DATA --ckpt-dir RESULTS --weights RESNET50_FILE
[--benchmarks cifar10,cifar100,imagenet200,imagenet1k] [--seeds 0,1,2] [--out DIR] [hydra overrides ...]`

Evaluation only, through the ordinary entry points: per benchmark one `ood-eval -m experiment=parity_<benchmark>
seed=...` sweep (conf/experiment/parity_*.yaml: the released CE network, `detectors=full` tuned on validation OOD
with OpenOOD's grids, fp32; `gram_v15`, OpenOOD's gram as released, on the leaderboard's Gram row; `gram`, OpenOOD's
gram since its fix (commit bdf6a55), cached on CIFAR and streamed (`gram_stream`) on ImageNet, without one), then
`ood-report --reference conf/reference/openood_v1.5/<benchmark>.yaml` (the leaderboard's near / far AUROC, from
results/*.csv of github.com/zjysteven/OpenOOD, branch leaderboard). This script
only checks the files first and prints the parity table from the report: per detector ours (mean ± std over the
seeds), the leaderboard's, the difference in points and `!` where |difference| > 1.0.

Files (nothing is downloaded):
- DATA: OpenOOD's benchmark tree (`benchmark_imglist/`, `images_classic/`, `images_largescale/`);
- RESULTS: the unzipped v1.5 checkpoints, `<RESULTS>/<run>/s<seed>/best.ckpt` (`RUNS` below);
- RESNET50_FILE: torchvision's ResNet-50 IMAGENET1K_V1 state dict (ImageNet-1K's network).
A missing list or checkpoint is named with where OpenOOD publishes it, a failing ood-eval after its error (the
seeds that finished still make the table, its title counting them); the other benchmarks still run.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ood import CONFIG_DIR
from ood.detectors import reference_name
from ood.detectors.base import OTHER_NAMES

REFERENCE_DIR = CONFIG_DIR / "reference" / "openood_v1.5"
BENCHMARKS = ("cifar10", "cifar100", "imagenet200", "imagenet1k")
#: OpenOOD v1.5's checkpoint folder per benchmark (scripts/download/download.py --checkpoints ood_v1.5)
RUNS = {
    "cifar10": "cifar10_resnet18_32x32_base_e100_lr0.1_default",
    "cifar100": "cifar100_resnet18_32x32_base_e100_lr0.1_default",
    "imagenet200": "imagenet200_resnet18_224x224_base_e90_lr0.1_default",
}
#: the zip each folder comes in (Google Drive ids in OpenOOD's scripts/download/download.py and README)
RELEASES = {"cifar10": "cifar10_res18_v1.5.zip", "cifar100": "cifar100_res18_v1.5.zip",
            "imagenet200": "imagenet200_res18_v1.5.zip"}
CKPT_HOW = ("OpenOOD's v1.5 checkpoints: git clone https://github.com/Jingkang50/OpenOOD && python "
            "scripts/download/download.py --contents checkpoints --checkpoints ood_v1.5 --save_dir {data} {ckpt} "
            "(README 'Pre-trained checkpoints': {zip})")
WEIGHTS_HOW = ("torchvision's ResNet-50 IMAGENET1K_V1 (resnet50-0676ba61.pth from "
               "https://download.pytorch.org/models/resnet50-0676ba61.pth, the file torchvision.models.resnet50("
               "weights='IMAGENET1K_V1') caches in <torch hub dir>/checkpoints/)")
LIST_HOW = ("OpenOOD's benchmark lists and images: python scripts/download/download.py --contents datasets "
            "--datasets {dataset} --dataset_mode benchmark --save_dir {data} (github.com/Jingkang50/OpenOOD; "
            "ImageNet's own images from image-net.org)")
DOWNLOAD_NAMES = {"cifar10": "cifar-10", "cifar100": "cifar-100", "imagenet200": "imagenet-200", "imagenet1k": "imagenet-1k"}
#: OpenOOD's postprocessor key beside our name where they differ (`energy (ebo)`), for readers of OpenOOD's configs;
#: `gram_v15` is their `gram` as the leaderboard ran it (GRAM below)
OPENOOD_KEYS = {**{OTHER_NAMES[key]: key for key in ("mls", "ebo", "temp_scaling", "mds", "dropout")},
                "gram_v15": "gram, v1.5 release"}
#: a difference (points of AUROC, or of ID accuracy) beyond this is marked
MARK = 1.0
#: the two ± columns are not the same statistic: OpenOOD's scripts/eval_ood.py takes np.std over its runs
STDS = ("±: ours the sample std over the seeds (n - 1), OpenOOD's the population std (n, np.std in its "
        "scripts/eval_ood.py; of the same 3 values 0.82 x the sample std); a value alone is one run.")
#: which of our two Gram detectors the leaderboard's Gram row is
GRAM = ("gram_v15 is OpenOOD's gram as released, which made the leaderboard's Gram row; gram (gram_stream: its streamed "
        "form) is OpenOOD's gram since its fix (commit bdf6a55, 2024-02-19), which the leaderboard never ran: no value.")


def required_lists(benchmark: str) -> list[str]:
    """The image-list files `data=<benchmark>` reads under OpenOOD's protocol (from its data config)."""
    data = OmegaConf.load(CONFIG_DIR / "data" / f"{benchmark}.yaml").benchmark
    if benchmark.startswith("cifar"):
        lists = [f"benchmark_imglist/{benchmark}/{split}_{benchmark}.txt" for split in ("train", "val", "test")]
    else:
        lists = [data[split].imglist for split in ("train", "val", "test")]
    protocol = data.protocols[data.protocol]
    lists += [spec.imglist for group in ("near", "far") for spec in protocol[group].values()]
    return lists + [protocol.val_ood.imglist]


def missing_files(benchmark: str, data_dir: Path, ckpt_dir: Path, weights: Path | None, seeds: Sequence[int]) -> list[str]:
    """One line per missing file: its path and where OpenOOD (or torchvision) publishes it."""
    how = LIST_HOW.format(dataset=DOWNLOAD_NAMES[benchmark], data=data_dir)
    lines = [f"missing {data_dir / f}: {how}" for f in required_lists(benchmark) if not (data_dir / f).is_file()]
    if benchmark == "imagenet1k":
        if weights is None or not weights.is_file():
            what = "no ResNet-50 weights given" if weights is None else f"missing ResNet-50 weights {weights}"
            lines.append(f"{what} (--weights / WEIGHTS=): {WEIGHTS_HOW}")
    else:
        how = CKPT_HOW.format(data=data_dir, ckpt=ckpt_dir, zip=RELEASES[benchmark])
        lines += [f"missing {p}: {how}" for p in checkpoints(benchmark, ckpt_dir, seeds) if not p.is_file()]
    return lines


def checkpoints(benchmark: str, ckpt_dir: Path, seeds: Sequence[int]) -> list[Path]:
    return [ckpt_dir / RUNS[benchmark] / f"s{s}" / "best.ckpt" for s in seeds]


def sweep_seeds(benchmark: str, seeds: Sequence[int]) -> list[int]:
    """The seeds a benchmark's sweep runs: ImageNet-1K has one network (torchvision's)."""
    return [0] if benchmark == "imagenet1k" else list(seeds)


def evaluate(benchmark: str, args: argparse.Namespace, seeds: Sequence[int], out: Path) -> None:
    """`ood-eval -m experiment=parity_<benchmark>` over the seeds (one job per released network)."""
    seeds = sweep_seeds(benchmark, seeds)
    if benchmark == "imagenet1k":
        network = [f"backbone.weights={args.weights.resolve()}"]  # one torchvision network
    else:
        network = [f"ckpt_path={args.ckpt_dir.resolve() / RUNS[benchmark]}/s${{seed}}/best.ckpt"]
    cmd = [sys.executable, "-m", "ood.eval", "-m", f"experiment=parity_{benchmark}", f"paths.data_dir={args.data_dir.resolve()}",
           f"seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={out}", "hydra.sweep.subdir=s${seed}", *network,
           *args.overrides]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def finished(out: Path, seeds: Sequence[int], start: float) -> list[Path]:
    """The seed folders of a sweep into `out` with results written since `start` (not an earlier run's)."""
    runs = [out / f"s{s}" for s in seeds]
    return [r for r in runs if (r / "results.jsonl").is_file() and (r / "results.jsonl").stat().st_mtime >= start - 1]


def report(benchmark: str, runs: Sequence[Path], out: Path) -> list[dict[str, str]]:
    """`ood-report` of the sweep's seed folders `runs` beside the leaderboard, written to `out`; returns report.csv's
    rows."""
    cmd = [sys.executable, "-m", "ood.report", *map(str, runs), "--reference", str(REFERENCE_DIR / f"{benchmark}.yaml"),
           "--no-figures", "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with (out / "report.csv").open() as f:
        return list(csv.DictReader(f))


def reference_row(detector: str, groups: dict[str, list[float]]) -> dict[str, str]:
    """A report.csv-like row holding only the leaderboard's near / far AUROC (% in the reference, fractions here)."""
    row = {"detector": detector}
    for group, values in groups.items():
        row.update({f"ref:{group}/auroc_{stat}": str(value / 100) for stat, value in zip(("mean", "std"), values)})
    return row


def _percent(mean: str, std: str) -> str:
    """A report.csv mean ± std in %; an empty std (one seed, a one-run leaderboard row) leaves the mean alone, as the
    report does (`± 0.00` read as runs that agree); an empty mean is `-`."""
    if not mean:
        return "-"
    return f"{100 * float(mean):.2f}" + (f" ± {100 * float(std):.2f}" if std else "")


def id_accuracy(rows: Sequence[dict[str, str]], reference: Mapping[str, Any]) -> str:
    """The line under a table with the networks' ID test accuracy beside the leaderboard's: the first check that the
    checkpoints and the preprocessing are the published ones (the same for every detector, read from the first row
    that has it)."""
    ours = next((r for r in rows if r.get("id_acc_mean")), {})
    cells = [_percent(ours.get("id_acc_mean", ""), ours.get("id_acc_std", ""))]
    theirs = reference.get("id_acc")
    theirs = [theirs] if isinstance(theirs, (int, float)) else theirs  # a bare number is the mean, as load_reference reads it
    cells.append(f"{theirs[0]:.2f}" + (f" ± {theirs[1]:.2f}" if len(theirs) > 1 else "") if theirs else "-")
    diff = "-"
    if ours and theirs:
        points = 100 * float(ours["id_acc_mean"]) - theirs[0]
        diff = f"{points:+.2f}{' !' if abs(points) > MARK else ''}"
    return f"\nID accuracy (%): ours {cells[0]} | OpenOOD {cells[1]} | diff {diff}"


def parity_table(benchmark: str, rows: Sequence[dict[str, str]]) -> tuple[str, int]:
    """The Markdown parity table of one benchmark and the number of marked differences."""
    reference = OmegaConf.to_container(OmegaConf.load(REFERENCE_DIR / f"{benchmark}.yaml"))
    lines = [f"### {benchmark} (seeds: {rows[0]['seeds'] if rows else 0}; leaderboard: {reference['source'].strip()})", "",
             "| detector | near ours | near OpenOOD | near diff | far ours | far OpenOOD | far diff |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    # a leaderboard detector that did not run here (excluded, skipped, failed) keeps its row, ours `-`; one that ran
    # under another name (another form of a detector: `reference_name`) has its row there
    ran = {reference_name(row["detector"]) for row in rows}
    rows = [*rows, *(reference_row(name, groups) for name, groups in reference["auroc"]["ce"].items() if name not in ran)]
    marked = 0
    for row in sorted(rows, key=lambda r: r["detector"]):
        cells = []
        for group in ("near", "far"):
            ours, std = row.get(f"{group}/auroc_mean", ""), row.get(f"{group}/auroc_std", "")
            ref, ref_std = row.get(f"ref:{group}/auroc_mean", ""), row.get(f"ref:{group}/auroc_std", "")
            cells += [_percent(ours, std), _percent(ref, ref_std)]
            if ours and ref:
                diff = 100 * (float(ours) - float(ref))
                marked += abs(diff) > MARK
                cells.append(f"{diff:+.2f}{' !' if abs(diff) > MARK else ''}")
            else:
                cells.append("-")
        name = row["detector"]
        label = f"{name} ({OPENOOD_KEYS[name]})" if name in OPENOOD_KEYS else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(id_accuracy(rows, reference))
    lines.append(f"\nnot in ood (leaderboard only): {', '.join(reference.get('not_in_ood', [])) or '-'}")
    lines.append(f"\n{STDS}")
    lines.append(f"\n{GRAM}")
    return "\n".join(lines), marked


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="OpenOOD's benchmark tree")
    parser.add_argument("--ckpt-dir", type=Path, required=True, help="folder holding OpenOOD's v1.5 checkpoint folders")
    parser.add_argument("--weights", type=Path, default=None, help="torchvision's ResNet-50 IMAGENET1K_V1 file")
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated subset of " + ",".join(BENCHMARKS))
    parser.add_argument("--seeds", default="0,1,2", help="released training runs (s0, s1, s2)")
    parser.add_argument("--out", type=Path, default=Path("logs/reproduce/parity"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every ood-eval (e.g. data.num_workers=16)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after an option (ARGS in the Makefile)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark(s) {unknown}; choices: {list(BENCHMARKS)}", file=sys.stderr)
        return 1
    failed, tables = [], []
    for benchmark in chosen:
        missing = missing_files(benchmark, args.data_dir, args.ckpt_dir, args.weights, seeds)
        if missing:
            print("\n".join(f"{benchmark}: {line}" for line in missing), file=sys.stderr)
            failed.append(benchmark)
            continue
        out = args.out / benchmark
        start = time.time()
        try:
            evaluate(benchmark, args, seeds, out)
        except subprocess.CalledProcessError as err:
            # a failed job of the sweep (one seed out of memory, say): the seeds that finished still make a table
            done = [r.name for r in finished(out, sweep_seeds(benchmark, seeds), start)]
            print(f"{benchmark}: ood-eval exited with status {err.returncode} (its error is above); "
                  + (f"the table has the seeds that finished: {', '.join(done)}" if done else "no table"), file=sys.stderr)
            failed.append(benchmark)
        runs = finished(out, sweep_seeds(benchmark, seeds), start)
        if not runs:
            if benchmark not in failed:
                print(f"{benchmark}: ood-eval wrote no results.jsonl under {out}; no table", file=sys.stderr)
                failed.append(benchmark)
            continue
        table, marked = parity_table(benchmark, report(benchmark, runs, out))
        tables.append(table)
        print(f"\n{table}\n({marked} differences beyond {MARK} point marked '!')\n", flush=True)
    if tables:
        text = "\n\n".join(tables) + "\n"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "parity.md").write_text(text)
        print(f"wrote {args.out / 'parity.md'}")
    if failed:
        print(f"not run or failed (listed above): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
