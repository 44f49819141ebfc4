"""`ood-heatmap`'s command line (`ood.heatmap_cli`): what it answers before it loads a checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ood import heatmap_cli
from ood.errors import ConfigError


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_exits_cleanly(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`ood-heatmap --help` was refused as an unexpected argument (exit 1), where ood-train and ood-eval open
    their help with what to type: it prints the usage, the keys, the overrides and the default `out`."""
    heatmap_cli.main([flag])
    printed = capsys.readouterr().out
    assert printed.startswith("`ood-heatmap ckpt_path=<run folder or checkpoint> image=PATH [out=DIR] [ood-eval "
                              "overrides]`")
    assert "`out` defaults to `heatmaps/` in the current folder" in " ".join(printed.split())


def test_an_unknown_argument_is_still_refused_naming_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        heatmap_cli.main(["--verbose"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (
        "error: ood-heatmap: unexpected argument '--verbose'; use key=value with keys ['ckpt_path', 'image', 'out'] "
        "(or ood-eval's overrides)\n"
    )


@pytest.mark.parametrize(("arg", "key"), [("imgae=a.png", "image"), ("outdir=maps", "out"), ("ckpt=x.ckpt", "ckpt_path")])
def test_a_misspelt_key_of_its_own_is_named_not_taken_for_an_override(arg: str, key: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Since `ood-heatmap` takes ood-eval's overrides, a misspelt key of its own was one of them: `imgae=` answered
    "missing ['image']", `outdir=` "unknown config key 'outdir': see `ood-train --cfg job` for the keys" (or drew
    into `heatmaps/` beside a run folder's refusal). It names the key it is close to, before any checkpoint is read."""
    given = {"ckpt_path": f"ckpt_path={tmp_path / 'x.ckpt'}", "image": "image=a.png", "out": "out=maps"}
    with pytest.raises(SystemExit):
        heatmap_cli.main([*(v for k, v in given.items() if k != key), arg])
    assert capsys.readouterr().err == (
        f"error: ood-heatmap: unknown key {arg.partition('=')[0]!r} (did you mean {key!r}?); use key=value with keys "
        "['ckpt_path', 'image', 'out'] (or ood-eval's overrides)\n")


def test_its_own_paths_start_at_home_as_the_overrides_do(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A shell that leaves `key=~/path` alone (zsh) gave ood-eval's overrides the home folder (`method.decoder_ckpt=
    ~/...`) but `ckpt_path=~/...` went in as a folder named `~`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit):
        heatmap_cli.main(["ckpt_path=~/x.ckpt", "image=a.png"])
    assert capsys.readouterr().err == (f"error: checkpoint {tmp_path / 'x.ckpt'} not found; pass "
                                       "ckpt_path=<run folder or checkpoint>\n")


def test_the_usage_names_a_run_folder_or_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The usage of a call without `image=`, and the answer to a missing checkpoint, named
    `ckpt_path=RUN/checkpoints/last.ckpt`, though a run folder opens the checkpoint its evaluation read (`best.ckpt`
    of a `best_val_acc` run)."""
    with pytest.raises(SystemExit):
        heatmap_cli.main([f"ckpt_path={tmp_path}"])
    assert capsys.readouterr().err == ("error: ood-heatmap: missing ['image']; usage: ood-heatmap "
                                       "ckpt_path=<run folder or checkpoint> image=PATH [out=DIR]\n")
    with pytest.raises(SystemExit):
        heatmap_cli.main([f"ckpt_path={tmp_path / 'x.ckpt'}", "image=a.png"])
    assert capsys.readouterr().err == (f"error: checkpoint {tmp_path / 'x.ckpt'} not found; pass "
                                       "ckpt_path=<run folder or checkpoint>\n")


def test_a_config_mistake_in_the_overrides_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The overrides' config errors stopped `ood-heatmap` with OmegaConf's traceback where `ood-eval` answers one line:
    `experiment=heatmap_released` (its `method.decoder_ckpt: ???`) with a checkpoint that holds the decoder."""
    import torch

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6"}, ckpt)
    with pytest.raises(SystemExit) as exit_:
        heatmap_cli.main([f"ckpt_path={ckpt}", "experiment=heatmap_released", "data=cifar10", "image=a.png"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == ("error: config method.decoder_ckpt: Missing mandatory value: "
                                       "method.decoder_ckpt\n")


def test_a_run_folder_opens_the_checkpoint_its_evaluation_read(tmp_path: Path) -> None:
    """A run folder always opened `checkpoints/last.ckpt`: the heatmaps of a run trained with
    `evaluation.weights=best_val_acc` were of its last epoch, not of the `best.ckpt` its results are of; now the file
    its evaluation read (a plain run's `last.ckpt`, a file passed as itself)."""
    for name, weights in (("best", "best_val_acc"), ("plain", "last")):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text(f"method:\n  _target_: ood.methods.ce.CE\nevaluation:\n  weights: {weights}\n")
        for file in ("last.ckpt", "best.ckpt"):
            (tmp_path / name / "checkpoints" / file).write_bytes(b"")
    best, plain = tmp_path / "best", tmp_path / "plain"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(best / 'checkpoints' / 'best.ckpt'))} is a "
                       r"ood.methods.ce.CE run; ood-heatmap needs a method=heatmap checkpoint$"):
        heatmap_cli.load_method(best)
    assert heatmap_cli.run_checkpoint(best) == best / "checkpoints" / "best.ckpt"
    assert heatmap_cli.run_checkpoint(plain) == plain / "checkpoints" / "last.ckpt"
    assert heatmap_cli.run_checkpoint(best / "checkpoints" / "last.ckpt") == best / "checkpoints" / "last.ckpt"


def test_the_class_is_printed_by_name_where_the_data_config_gives_it(tmp_path: Path) -> None:
    """It printed `class 2` (an index): now the name by label of data=folder's `data.classes`, else of its train
    class folders (sorted, hidden ones left out), and of CIFAR-10; the index where none is known (digits, a folder
    gone since training, a train image list beside a root's train/ folder, an index past the names)."""
    from omegaconf import OmegaConf

    for name in ("dog", "cat", ".ipynb_checkpoints"):
        (tmp_path / "train" / name).mkdir(parents=True)
    folder = {"_target_": "ood.data.folder.folder_datamodule", "root": str(tmp_path), "train": None, "classes": None}
    cases = [
        (folder, ["cat", "dog"]),
        ({**folder, "classes": ["dog", "cat"]}, ["dog", "cat"]),
        ({**folder, "root": None, "train": {"folder": str(tmp_path / "train")}}, ["cat", "dog"]),
        ({**folder, "root": str(tmp_path / "gone")}, None),
        # an image list's labels are class indices, whatever class folders its root beside it holds
        ({**folder, "train": {"imglist": str(tmp_path / "train.txt")}}, None),
        ({"benchmark": {"_target_": "ood.data.CIFAR10Benchmark"}}, list(heatmap_cli.CIFAR10_CLASSES)),
        ({"benchmark": {"_target_": "ood.data.DigitsBenchmark"}}, None),
    ]
    for data, names in cases:
        assert heatmap_cli.class_names(OmegaConf.create(data)) == names, data
    assert heatmap_cli.CIFAR10_CLASSES[3] == "cat"
    assert [heatmap_cli.class_label(k, ["cat", "dog"]) for k in (1, 2)] == ["dog", "2"]
    assert heatmap_cli.class_label(2, None) == "2"


def test_cifar100_classes_are_printed_by_name_the_data_s_meta_file_first(tmp_path: Path) -> None:
    """CIFAR-100's predictions printed as indices (only CIFAR-10's names were built in): now by its fine label names
    (torchvision's `CIFAR100.classes`, sorted), or those of the torchvision copy's `meta` file when it is there."""
    import pickle

    from omegaconf import OmegaConf

    names = heatmap_cli.CIFAR100_CLASSES
    assert len(set(names)) == 100 and list(names) == sorted(names)
    assert (names[0], names[1], names[4], names[30], names[55], names[99]) == (
        "apple", "aquarium_fish", "beaver", "dolphin", "otter", "worm")
    cifar100 = {"benchmark": {"_target_": "ood.data.CIFAR100Benchmark", "data_dir": str(tmp_path)}}
    assert heatmap_cli.class_names(OmegaConf.create(cifar100)) == list(names)
    meta = tmp_path / "torchvision" / "cifar100" / "cifar-100-python" / "meta"
    meta.parent.mkdir(parents=True)
    meta.write_bytes(pickle.dumps({"fine_label_names": [f"mine{k}" for k in range(100)], "coarse_label_names": []}))
    assert heatmap_cli.class_names(OmegaConf.create(cifar100))[:2] == ["mine0", "mine1"]
    # the whole run config: `data_dir` an interpolation of `paths.data_dir`
    run = OmegaConf.create({"paths": {"data_dir": str(tmp_path)},
                            "data": {"benchmark": {**cifar100["benchmark"], "data_dir": "${paths.data_dir}"}}})
    assert heatmap_cli.class_names(run.data)[99] == "mine99"
    meta.write_bytes(pickle.dumps({"fine_label_names": ["a", "b"]}))  # not CIFAR-100's count: the built-in names
    assert heatmap_cli.class_names(OmegaConf.create(cifar100)) == list(names)


def test_classes_printed_as_indices_are_said_to_be(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A train image list names no classes: its predictions printed `class 3` with nothing saying 3 is a label index,
    not a class called "3"; one note on stderr says so, and none is added where the classes have names."""
    results = [(Path("maps/a_heatmap.png"), -0.25, 3)]
    monkeypatch.setattr(heatmap_cli, "write_heatmaps", lambda *args: results)
    monkeypatch.setattr(heatmap_cli, "image_files", lambda path: [Path(path)])
    for classes, line, err in ((None, "class 3", f"note: {heatmap_cli.INDEX_NOTE}\n"),
                               (["a", "b", "c", "d"], "class d", "")):
        monkeypatch.setattr(heatmap_cli, "load_method", lambda *args, names=classes: (None, 64, names))
        heatmap_cli.main(["ckpt_path=run", "image=a.png"])
        out = capsys.readouterr()
        assert (out.out, out.err) == (f"{Path('maps/a_heatmap.png')}  score -0.2500  {line}\n", err)
    assert heatmap_cli.INDEX_NOTE.startswith("classes are printed as label indices: the run's data config names none")
