"""What a first-time user types on the command line, rewritten or refused before Hydra starts (`~` paths, an override
the shell split at a space, a sweep without -m, a new key under an empty mapping, `ood-eval ckpt_path=<run>` started
from another folder than the training run), and what `ood-eval --help` opens with."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from helpers import compose_config
from omegaconf import OmegaConf

import ood.eval
from ood.cli import check_argv, user_error
from ood.runs.checks import check_evaluated


def _checked(monkeypatch: pytest.MonkeyPatch, config_name: str, *argv: str) -> list[str]:
    """`sys.argv[1:]` after `check_argv(config_name)` on `argv`."""
    monkeypatch.setattr(sys, "argv", ["ood", *argv])
    check_argv(config_name)
    return sys.argv[1:]


def _refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], config_name: str, *argv: str) -> str:
    """What `check_argv(config_name)` printed on stderr refusing `argv`, after checking it exited with code 1 and
    printed nothing on stdout."""
    with pytest.raises(SystemExit) as exited:
        _checked(monkeypatch, config_name, *argv)
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    return err


def test_tilde_paths_are_expanded(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The shell leaves `key=~/path` alone: unquoted, Hydra stopped with "LexerNoViableAltException"; quoted, the
    weights file was looked up in a folder named `~` ("checkpoint not found: ~/w.pth")."""
    monkeypatch.setenv("HOME", "/home/me")
    argv = _checked(monkeypatch, "eval", "backbone=timm", "backbone.weights=~/w.pth", "data=folder",
                    "data.root='~/my id'", "+data.ood.far={a: ~/x, b: '~/y'}", "~callbacks", "ckpt_path='a~/b'")
    assert argv == ["backbone=timm", "backbone.weights=/home/me/w.pth", "data=folder", "data.root='/home/me/my id'",
                    "+data.ood.far={a: /home/me/x, b: '/home/me/y'}", "~callbacks", "ckpt_path='a~/b'"]
    # unquoted, `a~/b` is no value Hydra reads: one line before Hydra starts (it printed three)
    assert _refused(monkeypatch, capsys, "eval", "ckpt_path=a~/b") == (
        "error: override 'ckpt_path=a~/b' is not key=value as Hydra reads it (token recognition error at: '~'): quote "
        "a value with spaces or brackets, key='...'\n")


def test_override_split_by_the_shell_names_the_quoted_one(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`+data.ood.near={ssb: data/ssb}` unquoted: Hydra said "no viable alternative at input '{ssb:'"."""
    assert _refused(monkeypatch, capsys, "eval", "data=folder", "+data.ood.near={ssb:", "data/ssb,", "dtd:",
                    "data/dtd}", "seed=1") == (
        "error: override '+data.ood.near={ssb:' ends inside its {...} or [...]: the shell split it at a space; quote "
        "the whole override: '+data.ood.near={ssb: data/ssb, dtd: data/dtd}'\n")


@pytest.mark.parametrize(("argv", "advice"), [
    (["detectors.names=msp,energy"], "; a list is detectors.names=[msp,energy], a string with commas "
                                     "detectors.names='msp,energy'"),
    (["seed=1", "method=ce,oe"], ""),
    (["seed=range(3)"], ""),
])
def test_sweep_without_multirun_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], advice: str) -> None:
    """Hydra's "Ambiguous value for argument" took five lines; with -m the sweep runs."""
    assert _refused(monkeypatch, capsys, "eval", *argv) == f"error: {argv[-1]} is a sweep, which runs only with -m{advice}\n"
    assert _checked(monkeypatch, "eval", "-m", *argv) == ["-m", *argv]


def test_new_key_under_an_empty_mapping_needs_no_plus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The knn warning says "set detectors.params.knn.k below 11": typed so, Hydra refused it ("Key 'knn' is not in
    struct"); `data.ood.near.ssb=<folder>` likewise. A key the config has keeps its form."""
    argv = _checked(monkeypatch, "eval", "detectors.params.knn.k=5", "data=folder", "data.ood.near.ssb=/x",
                    "detectors.tune=false")
    assert argv == ["+detectors.params.knn.k=5", "data=folder", "+data.ood.near.ssb=/x", "detectors.tune=false"]
    cfg = compose_config(tmp_path, argv, "eval")
    assert (cfg.detectors.params.knn.k, cfg.data.ood.near.ssb) == (5, "/x")


def test_eval_of_a_run_reads_its_relative_paths_from_where_it_trained(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """`ood-train data.root=data/id ...` in one folder, `ood-eval ckpt_path=<run>` in another: the adopted
    `data.root=data/id` was read from the new folder ("folder not found", or silently another data set there), and
    a `backbone.target` module beside the training was not importable; the run's `hydra.searchpath` (its own
    `conf/method/<name>.yaml`), which Hydra keeps out of `overrides.yaml`, was not taken: "unknown method"."""
    started, elsewhere, run = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "run"
    for folder in (started, elsewhere):
        for sub in ("data/id", "data/dtd"):
            (folder / sub).mkdir(parents=True)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(["data=folder", "data.root=data/id", "+data.ood.far={dtd: data/dtd, gone: data/gone}",
                    "data.name=data", "backbone=torchvision", "seed=3"],
                   run / ".hydra" / "overrides.yaml")
    OmegaConf.save({"hydra": {"runtime": {"cwd": str(started)}, "searchpath": ["file://my_conf", "pkg://my_pkg.conf"]}},
                   run / ".hydra" / "hydra.yaml")
    seen = []
    monkeypatch.setattr(ood.eval, "_main", lambda: seen.append(sys.argv[1:]))
    monkeypatch.setattr(sys, "argv", ["ood-eval", f"ckpt_path={run}"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(elsewhere)
    ood.eval.main()
    assert sys.path[-1] == str(started)  # `backbone=module backbone.target=my_nets.Net` imports from there
    assert seen == [[
        f"hydra.searchpath=['file://{started}/my_conf', 'pkg://my_pkg.conf']", "data=folder", f"data.root='{started}/data/id'", f"+data.ood.far={{dtd: '{started}/data/dtd', gone: 'data/gone'}}",
        "data.name=data", "backbone=torchvision", f"ckpt_path={run}",
    ]]


def test_eval_help_opens_with_what_to_type(tmp_path: Path) -> None:
    """`ood-eval --help` (and `ood-train --help`) opened with Hydra's "eval is powered by Hydra." and the whole config."""
    header = compose_config(tmp_path, [], "eval").hydra.help.header.splitlines()
    assert header[0].startswith("ood-eval: evaluate a trained network")
    assert header[1].split()[:2] == ["ood-eval", "ckpt_path=<run"]
    header = compose_config(tmp_path, [], "train").hydra.help.header.splitlines()  # and "train is powered by Hydra."
    assert header[0].startswith("ood-train: train a method, then evaluate it")
    assert header[1].split()[:2] == ["ood-train", "method=grood"]



def test_train_help_shows_an_own_folder_run_that_composes_as_written(tmp_path: Path) -> None:
    """`ood-train --help` had no example of one's own images: its data=folder line, placeholders filled, composes as
    written (the run itself was checked by hand on fabricated folders: building folder data here costs seconds)."""
    import shlex

    header = compose_config(tmp_path, [], "train").hydra.help.header
    start = header.index("ood-train data=folder")
    example = header[start : header.index("(", start)].replace("\\\n", " ")
    filled = example.replace("<root with train/ test/>", "data/my_id").replace("<folder>", "data/dtd")
    args = shlex.split(filled)
    assert args[0] == "ood-train"
    data = compose_config(tmp_path, args[1:]).data
    assert data._target_ == "ood.data.folder.folder_datamodule"
    assert (data.root, dict(data.ood.far), data.image_size, data.resize) == ("data/my_id", {"name": "data/dtd"}, 32, 32)


def test_a_run_path_made_absolute_is_no_difference(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The anchored `data.ood.far.dtd` was logged as "evaluating ... with data.ood.far.dtd=data/dtd (now /.../data/dtd),
    as asked" though nobody asked; another folder still is a difference."""
    cfg = compose_config(tmp_path, ["data=folder", f"+data.ood.far={{dtd: {tmp_path}/data/dtd, ssb: /x/ssb}}"], "eval")
    with caplog.at_level(logging.INFO, logger="ood.runs.checks"):
        check_evaluated(cfg, {"data.ood.far.dtd": "data/dtd", "data.ood.far.ssb": "data/ssb"}, "last.ckpt",
                        ["+data.ood.far={...}"])
    assert [r.getMessage() for r in caplog.records] == [
        "evaluating last.ckpt with data.ood.far.ssb=data/ssb (now /x/ssb), as asked"]


def test_a_target_in_the_working_directory_says_pythonpath(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`ood-train hydra.searchpath=[file://my_conf] method=norm_gap` with `_target_: my_methods.NormGap` beside it:
    the `ood-train` script (its sys.path starts at bin/) ended in Hydra's four lines "Error locating target"."""
    from hydra.utils import instantiate

    (tmp_path / "my_methods_here.py").write_text("class NormGap: ...\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with pytest.raises(Exception) as raised:  # noqa: PT011 - Hydra's InstantiationException, whatever it wraps
        instantiate(OmegaConf.create({"method": {"_target_": "my_methods_here.NormGap"}}).method)
    assert str(user_error(raised.value)) == (
        "method._target_='my_methods_here.NormGap' cannot be imported: No module named 'my_methods_here' "
        "(my_methods_here is in the working directory, which is not on sys.path: run with PYTHONPATH=.)")


@pytest.mark.parametrize("argv", [["-sc", "query=bash"], ["--shell-completion", "install=bash"],
                                  ["--experimental-rerun", "/runs/x/.hydra/config.pickle"],
                                  ["--experimental-rerun=/runs/x/.hydra/config.pickle"]])
@pytest.mark.parametrize("config_name", ["train", "eval"])
def test_hydra_commands_are_not_taken_for_overrides(monkeypatch: pytest.MonkeyPatch, config_name: str,
                                                    argv: list[str]) -> None:
    """Hydra's shell completion (`-sc query=bash`, what its installed completion runs at each Tab) was refused as
    "unknown config key 'query'", and a rerun's pickle path (`--experimental-rerun <file>`) as "not key=value":
    neither is an override; the words pass to Hydra unchanged."""
    assert _checked(monkeypatch, config_name, *argv) == argv


@pytest.mark.parametrize("empty", ["", " "])
def test_an_empty_override_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                   empty: str) -> None:
    """`ood-train "$EXTRA" seed=1` with `EXTRA` unset: Hydra refuses the empty word, and the one line said "give its
    value, '=<value>' (or '~' to delete the key)"; it now says what the word is."""
    assert _refused(monkeypatch, capsys, "train", empty, "seed=1") == (f"error: an empty override ({empty!r}): remove it (a quoted shell variable "
                                       "that is unset gives one)\n")
