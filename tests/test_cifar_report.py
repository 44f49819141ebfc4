"""`make reproduce-cifar*` and the OpenOOD leaderboard reference columns of `ood-report`."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from ood import PROJECT_ROOT
from ood.errors import OODError
from ood.report import main
from ood.report.aggregation import aggregate
from ood.report.references import (
    REFERENCE_COLS,
    REFERENCE_DIR,
    STD_CONVENTIONS,
    add_reference,
    load_reference,
    reference_files,
)
from ood.report.rendering import NOTE, latex_text, to_markdown

#: OpenOOD v1.5's CIFAR-10 OOD sets (the leaderboard files' `ood_sets`; CIFAR-100's near has cifar10 instead)
OPENOOD_SETS = {"near": ["cifar100", "tin"], "far": ["mnist", "svhn", "texture", "places365"]}


def _rows(id_dataset: str, detector: str, seed: int, near: float, far: float, backbone: str = "resnet18_32x32",
          sets: dict[str, list[str]] = OPENOOD_SETS, mode: str = "standard") -> list[dict]:
    """One run's rows, the same AUROC on every OOD set of a group."""
    base = {"method": "ce", "detector": detector, "backbone": backbone, "id_dataset": id_dataset, "seed": seed,
            "fpr95": 0.5, "mode": mode, "_run": f"run{seed}{mode}"}
    return [{**base, "ood_dataset": "cifar10" if s == id_dataset else s, "ood_group": g, "auroc": {"near": near, "far": far}[g]}
            for g, names in sets.items() for s in names]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_reference_files_hold_the_leaderboard(name: str) -> None:
    ref = load_reference(REFERENCE_DIR / f"{name}.yaml")
    assert ref["id_dataset"] == name and ref["backbone"] == "resnet18_32x32"
    assert "zjysteven/OpenOOD" in ref["source"]
    expected = {"cifar10": ([88.03, 0.25], [90.73, 0.43], [94.82, 0.21]), "cifar100": ([80.27, 0.11], [77.76, 0.44], [88.30, 0.10])}
    assert (ref["auroc"]["ce"]["msp"]["near"], ref["auroc"]["ce"]["msp"]["far"], ref["auroc"]["oe"]["msp"]["near"]) == expected[name]
    assert len(ref["auroc"]["ce"]) == 19 and ref["auroc"]["ce"]["fdbd"]["near"] == [{"cifar10": 90.42, "cifar100": 81.26}[name]]


def test_reference_columns_only_for_matching_rows() -> None:
    rows = _rows("cifar10", "knn", 0, 0.9, 0.92) + _rows("cifar10", "knn", 1, 0.8, 0.94) + _rows("cifar10", "new_det", 0, 0.7, 0.7)
    rows += _rows("cifar10", "msp", 0, 0.6, 0.6, backbone="wrn40_2")
    config_cols, metric_cols, table = aggregate(rows)
    cols = add_reference(metric_cols, table, [load_reference(REFERENCE_DIR / "cifar10.yaml")])
    assert cols == [*metric_cols, *REFERENCE_COLS]
    by = {(e["detector"], e["backbone"]): e for e in table}
    knn = by[("knn", "resnet18_32x32")]
    assert knn["ref:near/auroc"] == pytest.approx((0.9064, 0.0020, 3)) and knn["ref:far/auroc"] == pytest.approx((0.9296, 0.0014, 3))
    assert knn["near/auroc"][:2] == pytest.approx((0.85, 0.0707107), rel=1e-5)
    assert "ref:near/auroc" not in by[("new_det", "resnet18_32x32")] and "ref:near/auroc" not in by[("msp", "wrn40_2")]
    line = next(x for x in to_markdown(config_cols, cols, table).splitlines() if "| knn | resnet18_32x32" in x)
    assert line.endswith("| 90.64 ± 0.20 | 92.96 ± 0.14 |")


def test_reference_columns_only_beside_the_same_ood_sets_and_mode(capsys: pytest.CaptureFixture[str]) -> None:
    """The leaderboard's near (CIFAR-100 + TIN) stood beside a near mean over CIFAR-100 alone (a torchvision tree has
    no TIN), its far beside another protocol's far sets, its standard numbers beside full-spectrum rows: a group over
    other sets, or another mode, gets no ref: column, and one warning line per kind says why."""
    no_tin = {"near": ["cifar100"], "far": OPENOOD_SETS["far"]}
    classic = {"far": ["texture", "svhn", "places365", "lsun_crop", "lsun_resize", "isun"]}
    rows = [*_rows("cifar10", "msp", 0, 0.8, 0.9, sets=no_tin), *_rows("cifar10", "msp", 0, 0.8, 0.9, mode="fsood"),
            *_rows("cifar10", "energy", 0, 0.8, 0.9, sets=classic)]
    _, metric_cols, table = aggregate(rows)
    cols = add_reference(metric_cols, table, [load_reference(REFERENCE_DIR / "cifar10.yaml")])
    by = {(e["detector"], e["mode"]): e for e in table}
    assert [c for c in by[("msp", "standard")] if c.startswith("ref:")] == ["ref:far/auroc"] and cols[-1] == "ref:far/auroc"
    assert not [c for e in (by[("msp", "fsood")], by[("energy", "standard")]) for c in e if c.startswith("ref:")]
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in err] == [  # classic has no near sets: nothing to warn of
        "warning: no ref:far columns for the cifar10 resnet18_32x32 rows: their far-OOD sets ['isun', 'lsun_crop', "
        "'lsun_resize', 'places365', 'svhn', 'texture'] are not the reference's ['mnist', 'places365', 'svhn', 'texture']",
        "warning: no ref: columns for the cifar10 resnet18_32x32 rows of mode=fsood: the reference's numbers are standard",
        "warning: no ref:near columns for the cifar10 resnet18_32x32 rows: their near-OOD sets ['cifar100'] are not "
        "the reference's ['cifar100', 'tin']",
    ]


def test_the_references_id_accuracy_stands_beside_the_runs() -> None:
    """The leaderboard network's ID accuracy (the file's `id_acc`, 95.06 ± 0.30 %) is a `ref:id_acc` column beside the
    rows' `id_acc`, for the methods the file lists (and those trained as one: grood as ce), not for another method."""
    rows = []
    for method, seed, acc in (("ce", 0, 0.95), ("ce", 1, 0.94), ("grood", 0, 0.9), ("energy_oe", 0, 0.93)):
        rows += [{**r, "method": method, "id_acc": acc, "_run": f"{method}{seed}"} for r in _rows("cifar10", "msp", seed, 0.9, 0.9)]
    config_cols, metric_cols, table = aggregate(rows)
    cols = add_reference(metric_cols, table, [load_reference(REFERENCE_DIR / "cifar10.yaml")])
    assert cols == [*metric_cols, *REFERENCE_COLS, "ref:id_acc"] and "id_acc" in metric_cols
    by = {e["method"]: e for e in table}
    assert by["ce"]["ref:id_acc"] == pytest.approx((0.9506, 0.0030, 3)) and by["grood"]["ref:id_acc"] == by["ce"]["ref:id_acc"]
    assert "ref:id_acc" not in by["energy_oe"]  # the leaderboard's file has no energy_oe rows: another network
    line = next(x for x in to_markdown(config_cols, cols, table).splitlines() if x.startswith("| ce |"))
    assert line.endswith("| 94.50 ± 0.71 | 88.03 ± 0.25 | 90.73 ± 0.43 | 95.06 ± 0.30 |")


def test_no_reference_keeps_the_table_unchanged() -> None:
    rows = _rows("digits", "msp", 0, 0.9, 0.8)
    _, metric_cols, table = aggregate(rows)
    assert add_reference(metric_cols, table, [load_reference(REFERENCE_DIR / "cifar10.yaml")]) == metric_cols


def test_a_reference_number_may_be_bare_and_is_checked(tmp_path: Path) -> None:
    """`near: 50.5` is the mean alone (it was a TypeError in the report); three numbers are a one-line error."""
    path = tmp_path / "ref.yaml"
    path.write_text("source: s\nid_dataset: digits\nbackbone: small_cnn\nauroc: {ce: {msp: {near: 50.5, far: [70, 2]}}}\n")
    entry = {"id_dataset": "digits", "backbone": "small_cnn", "method": "ce", "detector": "msp"}
    assert add_reference([], [entry], [load_reference(path)]) == list(REFERENCE_COLS)
    assert entry["ref:near/auroc"] == (0.505, 0.0, 1) and entry["ref:far/auroc"] == pytest.approx((0.7, 0.02, 3))
    path.write_text("source: s\nid_dataset: digits\nbackbone: small_cnn\nauroc: {ce: {msp: {near: [1, 2, 3]}}}\n")
    with pytest.raises(OODError, match=r"^reference file .*ref.yaml: auroc.ce.msp.near is \[1, 2, 3\]: give a number or "
                                       r"\[mean, std\] in %$"):
        load_reference(path)
    path.write_text("- source: s\n- id_dataset: digits\n")  # a list: an AssertionError (under -O, a TypeError)
    with pytest.raises(OODError, match=r"^reference file .*ref.yaml holds a list, not a mapping of source, id_dataset"):
        load_reference(path)
    path.write_text("source: s\nid_dataset: digits\nbackbone: small_cnn\nid_acc: 95%\nauroc: {ce: {msp: {near: 50}}}\n")
    with pytest.raises(OODError, match=r"^reference file .*ref.yaml: id_acc is '95%': give a number or \[mean, std\] in %$"):
        load_reference(path)
    path.write_text("source: s\nid_dataset: digits\nbackbone: small_cnn\nauroc: {}\nood_sets: {far: svhn}\n")
    with pytest.raises(OODError, match=r"ref.yaml: ood_sets is \{'far': 'svhn'\}: give \{near\|far: \[set, ...\]\}$"):
        load_reference(path)
    path.write_text("source: s\nid_dataset: digits\nbackbone: small_cnn\nauroc: {}\nstd: ddof0\n")
    with pytest.raises(OODError, match=r"ref.yaml: std is 'ddof0': one of \['population', 'sample'\]$"):
        load_reference(path)
    path.write_text("source: s\nid_dataset: digits\nbackbone: small_cnn\nauroc: {}\nsame_network: [grood]\n")
    with pytest.raises(OODError, match=r"ref.yaml: same_network is \['grood'\]: give \{method: the method it trains as\}$"):
        load_reference(path)
    # each level of the auroc nesting given a list or a number: an AttributeError in the report
    for auroc, where, shape in [("[ce]", "auroc", "method: {detector: ...}"), ("{ce: 5}", "auroc.ce", "detector: {near|far: ...}"),
                                ("{ce: {msp: [50, 1]}}", "auroc.ce.msp", "near|far: [mean, std]")]:
        path.write_text(f"source: s\nid_dataset: digits\nbackbone: small_cnn\nauroc: {auroc}\n")
        with pytest.raises(OODError, match=rf"^reference file .*ref.yaml: {re.escape(where)} is .*: give "
                                           rf"\{{{re.escape(shape)}\}}$"):
            load_reference(path)
    # a malformed file, or one that is no text: YAML's or the decoder's traceback from `ood-report --reference`
    path.write_text("source: s\nauroc: {ce: [1, 2}\n")
    with pytest.raises(OODError, match=r"^reference file .*ref.yaml is not valid YAML: expected ',' or ']', but got '}' "
                                       r"\(line 2, column 18\)$"):
        load_reference(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(OODError, match=r"^reference file .*ref.yaml cannot be read as YAML: .*codec can't decode"):
        load_reference(path)


def test_a_reference_may_give_fpr95_alone(tmp_path: Path) -> None:
    """load_reference accepts a file without auroc: matching it was a KeyError."""
    path = tmp_path / "ref.yaml"
    path.write_text("source: s\nid_dataset: digits\nbackbone: small_cnn\nfpr95_convention: id_positive\n"
                    "fpr95: {ce: {msp: {far: [20, 1]}}}\n")
    entry = {"id_dataset": "digits", "backbone": "small_cnn", "method": "ce", "detector": "msp"}
    assert add_reference(["far/fpr95"], [entry], [load_reference(path)]) == ["far/fpr95", "ref:far/fpr95"]
    assert entry["ref:far/fpr95"] == pytest.approx((0.2, 0.01, 3))


def test_a_reference_in_openoods_fpr95_convention_gets_ours_beside_it(tmp_path: Path) -> None:
    """`fpr95_convention: ood_positive` gave ref:near/fpr95_oodpos with no fpr95_oodpos of ours to compare with (the
    table's fpr95 is ID-positive): our near/fpr95_oodpos, mean over seeds, now stands beside it."""
    path = tmp_path / "ref.yaml"
    path.write_text("source: s\nid_dataset: digits\nbackbone: small_cnn\nfpr95_convention: ood_positive\n"
                    "fpr95: {ce: {msp: {near: [40, 1]}}}\n")
    rows = [{"method": "ce", "detector": "msp", "backbone": "small_cnn", "id_dataset": "digits", "ood_dataset": "a",
             "ood_group": "near", "seed": seed, "auroc": 0.8, "fpr95": 0.5, "fpr95_oodpos": oodpos, "_run": str(seed)}
            for seed, oodpos in ((0, 0.3), (1, 0.5))]
    _, cols, table = aggregate(rows)
    cols = add_reference(cols, table, [load_reference(path)])
    assert cols[-2:] == ["near/fpr95_oodpos", "ref:near/fpr95_oodpos"]
    assert table[0]["near/fpr95_oodpos"] == pytest.approx((0.4, 0.1414213, 2)) and table[0]["ref:near/fpr95_oodpos"][:2] == (0.4, 0.01)


def test_report_cli_prints_the_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "sweep" / "0"
    run.mkdir(parents=True)
    rows = [{k: v for k, v in r.items() if k != "_run"} for r in _rows("cifar100", "energy", 0, 0.8, 0.78)]
    run.joinpath("results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main([str(tmp_path / "sweep")])
    out = capsys.readouterr()
    assert "| ref:near/auroc | ref:far/auroc |" in out.out and "| 80.91 ± 0.08 | 79.77 ± 0.61 |" in out.out
    assert "results/cifar100.csv" in out.err
    assert "reference numbers (cifar100, resnet18)" not in out.err  # the 224 px file, loaded by default: no row of it
    # where the ref: columns come from is in report.md too, beside them (it was on stderr only, lost with the console)
    source = next(line[len("reference numbers "):] for line in out.err.splitlines() if line.startswith("reference numbers"))
    assert source.startswith("(cifar100, resnet18_32x32") and "results/cifar100.csv" in source
    assert f"\nReference numbers from:\n- {source}\n" in (tmp_path / "sweep" / "report.md").read_text()
    # the leaderboard's ± is np.std (n), ours n - 1: the note under the table (and report.tex's caption) says so
    assert f"{NOTE} {STD_CONVENTIONS['population']}\n" in out.out
    caption = (tmp_path / "sweep" / "report.tex").read_text().splitlines()[3]
    assert caption.endswith(f"{latex_text(STD_CONVENTIONS['population'])}}}")
    assert "warning" not in out.err
    main([str(tmp_path / "sweep"), "--no-reference", "--out", str(tmp_path / "plain")])
    assert "ref:" not in (tmp_path / "plain" / "report.md").read_text()  # nor the std line
    # a named reference for another backbone adds nothing: one warning says so (it was silent)
    main([str(tmp_path / "sweep"), "--reference", "conf/reference/cifar100_resnet18.yaml", "--out", str(tmp_path / "other")])
    out = capsys.readouterr()
    assert "ref:" not in out.out
    assert "warning: no --reference file matches a run's (ID dataset, backbone); the runs are [('cifar100', " \
           "'resnet18_32x32')]" in out.err


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_make_reproduce_runs_the_seed_sweep_then_the_report(name: str) -> None:
    # under `make test` the parent make's variables would turn this into a sub-make with directory banners
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", f"reproduce-{name}", "VENV=.venv", "ARGS=paths.data_dir=/data"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, env=env,
    ).stdout.splitlines()
    # an empty REPORT_ARGS= leaves a trailing space; `# i/N` lines say what each stage is (tests/test_reproduce.py)
    out = [line.rstrip() for line in out if not line.startswith("#")]
    sweep = f"logs/reproduce/{name}"
    train = f".venv/bin/ood-train -m experiment={name}_ce seed=0,1,2 hydra.sweep.dir={sweep} paths.data_dir=/data"
    assert out[-2:] == [train, f".venv/bin/ood-report {sweep}"]


def test_shipped_references_are_found_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--reference conf/reference/...` (README, Makefile) names ood's own configs when the working directory has no
    `conf/` (an installed ood, a checkout's sub-folder); a local file of that path still comes first."""
    monkeypatch.chdir(tmp_path)
    assert reference_files([Path("conf/reference/energy")]) == sorted((REFERENCE_DIR / "energy").glob("*.yaml"))
    assert reference_files([Path("conf/reference/cifar10.yaml")]) == [REFERENCE_DIR / "cifar10.yaml"]
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text("source: me\n")
    assert reference_files([Path("conf/mine.yaml"), Path("other.yaml")]) == [Path("conf/mine.yaml"), Path("other.yaml")]
