"""`make bench` (`python -m benchmarks.run [--quick] [--only a,b,c] [--repeats N]`): time our implementations
against straightforward references side by side (alternating, median of repeats) and print Markdown tables.

(a) `ood_metrics` vs scikit-learn as OpenOOD computes AUROC/FPR95/AUPRs, 1M + 1M scores (target <= 0.25x);
(b) knn / mahalanobis / vim fit + score at CIFAR scale vs scikit-learn / NumPy (target <= 0.5x);
(c) every detector vs msp only on a digits checkpoint, with the network passes each needs (target <= 1.5x), and
    ODIN's tuning with its grid sharing passes vs one pass per grid point (target <= 1/1.8x, equal scores);
(d) training time per epoch of every method vs CE on digits (informational);
(e) training / evaluation loaders, in-memory uint8 batches vs per-item PIL on fabricated 32 px PNGs
    (targets <= 0.1x and <= 1/3x);
(f) end-to-end evaluation of one trained model (the small CNN, then OpenOOD's ResNet-18 on fewer images) with every
    detector OpenOOD also has, tuned on validation OOD: ours (one cached pass, shared grids) vs OpenOOD's way (a
    pass per postprocessor and grid point), target >= 10x.
`--quick` shrinks every size; the targets are stated for the full sizes. `make test` runs parts a, b, c, e and f smaller still,
one call per competitor (`--repeats 0`), with each part's own checks (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

from benchmarks.common import Timing, markdown_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", default="a,b,c,d,e,f", help="comma-separated subset of a, b, c, d, e, f")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per competitor (default 5, quick 3; 0: a smoke run, each once)")
    parser.add_argument("--threads", type=int, default=None, help="threads for every library (default: their defaults)")
    args = parser.parse_args(argv)
    if args.threads:
        import faiss
        import scipy.linalg  # noqa: F401 - loads SciPy's own OpenBLAS, which a limit set before its import misses
        import sklearn.mixture  # noqa: F401 - loads scikit-learn's OpenMP library, the same
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        # NumPy's, SciPy's and scikit-learn's BLAS / OpenMP pools, for a fair comparison (gmm's fit ran on two
        # OpenBLAS threads under --threads 1: 6-13 s instead of 0.6 s beside another process on 2 cores)
        threadpool_limits(args.threads)
    parts = set(args.only.split(","))
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401 - its import sets its logger to INFO: quieted after it, not before

    for name in ("lightning.pytorch", "lightning.fabric", "ood"):  # "Seed set", "GPU available", tips per trainer
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats={repeats}{' (quick sizes)' if args.quick else ''}\n")

    timings: list[Timing] = []
    passes = None
    if "a" in parts:
        from benchmarks import bench_metrics

        timings += bench_metrics.run(100_000 if args.quick else 1_000_000, repeats)
    if "b" in parts:
        from benchmarks import bench_detectors

        timings += bench_detectors.run(*((10_000, 2_000) if args.quick else (50_000, 20_000)), repeats)
    if "c" in parts:
        from benchmarks import bench_digits

        digits, passes = bench_digits.run(epochs=2 if args.quick else 4, repeats=repeats)
        timings += digits
    if "d" in parts:
        from benchmarks import bench_training

        timings += bench_training.run(epochs=3 if args.quick else 5, repeats=repeats)
    if "e" in parts:
        from benchmarks import bench_loaders

        timings += bench_loaders.run(500 if args.quick else 2000, repeats)
    e2e = None
    if "f" in parts:
        from benchmarks import bench_e2e

        # the CPU-sized CNN (arithmetic-bound: a pass is cheap) and OpenOOD's CIFAR network (pass-bound), smaller
        cases = [("small_cnn", 64, 1)] if args.quick else [("small_cnn", 256, 2), ("resnet18_32x32", 64, 1)]
        tables = []
        for backbone, size, epochs in cases:
            e2e_timings, table = bench_e2e.run(size=size, epochs=epochs, backbone=backbone)
            timings += e2e_timings
            tables.append(table)
        e2e = "\n\n".join(tables)
    print(markdown_table(timings))
    if e2e is not None:
        print("\nEnd-to-end evaluation, network passes:\n")
        print(e2e)
    if passes is not None:
        print("\nNetwork passes on digits (one pass = every evaluation split once):\n")
        print(passes)


if __name__ == "__main__":
    main()
