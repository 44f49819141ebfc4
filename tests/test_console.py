"""What `ood-train` prints: one-line errors for config mistakes, Lightning's chatter off, one bar for the evaluation
pass, the tuned hyper-parameters as one block, the way on after Ctrl-C."""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import compose_config
from omegaconf import OmegaConf

from ood import CONFIG_DIR
from ood.cli import user_error
from ood.data.hygiene import BadImageError
from ood.errors import ConfigError
from ood.evaluation.sinks import tuned_summary
from ood.runs.checks import check_overrides
from ood.runs.console import ProgressBar, quiet_lightning
from ood.utils import warnings_in_log_files


@pytest.mark.parametrize(
    ("override", "expected"),
    [("seed=abc", "an integer"), ("train=maybe", "true or false"), ("method.optimizer.lr=fast", "a number"),
     ("-m seed=0,1,x", "an integer"), ("evaluation.fsood=2", "true or false"),
     ("-m detectors.tune=true,0", "true or false")],
)
def test_word_where_a_number_belongs_is_refused(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=rf"=\w+: expected {expected} \(the default is"):
        check_overrides(CONFIG_DIR, "train", override.split())


def test_word_in_place_of_a_config_node_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"method.optimizer=sgd: method.optimizer is a config node \(.*lr.*\); set one of its keys, e.g. method.optimizer.lr=\.\.\."):
        check_overrides(CONFIG_DIR, "train", ["method.optimizer=sgd"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [("method=cel", r"unknown method 'cel': did you mean method=ce\? choices: ce, cluster, energy_cfl, .*, oe"),
     ("-m method=ce,oee", r"unknown method 'oee': did you mean method=oe\? choices: ce, "),
     ("+experiment=cifar10_c", r"unknown experiment 'cifar10_c': did you mean experiment=cifar10_ce\? choices: "),
     ("trainer=xyz", r"unknown trainer 'xyz': choices: cpu, ddp, ddp_cpu, gpu, gpu_fast"),
     # ood.evaluate takes detectors="msp"; the command line's group holds configs: the names key is said
     ("detectors=msp", r"^unknown detectors 'msp': choices: all, fast, full, none; detectors by name: detectors.names=\[msp\]$")],
)
def test_unknown_group_option_is_one_line_with_the_choices(override: str, expected: str) -> None:
    """Hydra's own error for `method=cel` is 20 lines ending in its config search path."""
    with pytest.raises(ConfigError, match=expected):
        check_overrides(CONFIG_DIR, "train", override.split())


def test_group_options_from_elsewhere_are_hydras_to_check() -> None:
    """A plugin's launcher and a user's own search path add options our folders do not hold."""
    check_overrides(CONFIG_DIR, "train", ["-m", "hydra/launcher=joblib", "method=ce,oe", "~callbacks"])
    check_overrides(CONFIG_DIR, "train", ["hydra.searchpath=[file:///tmp/mine]", "method=mine"])
    check_overrides(CONFIG_DIR, "train", ["-m", "method=glob(c*)"])  # Hydra expands it (it raised a traceback here)


def test_values_of_the_right_type_pass() -> None:
    check_overrides(CONFIG_DIR, "train", ["seed=3", "method.optimizer.lr=1", "train=false", "trainer.devices=auto",
                                          "ckpt_path=null", "seed=${oc.env:SEED,0}", "++seed=abc", "-m",
                                          "method.optimizer.lr=interval(0.01,0.1)", "seed=range(3)",
                                          "method.scheduler=null", "~method.scheduler", "trainer.deterministic=warn"])


def test_omegaconf_errors_become_one_line() -> None:
    cfg = OmegaConf.create({"a": "${nope}", "b": "???"})
    for key in ("a", "b"):
        try:
            getattr(cfg, key)
        except Exception as err:  # noqa: BLE001 - the error under test
            user = user_error(err)
            assert isinstance(user, ConfigError) and "\n" not in str(user) and f"config {key}:" in str(user)
    assert user_error(ValueError("a bug")) is None, "other errors keep their traceback"


#: torch's text (ATen's `alertNotDeterministic`, in libtorch) for an operation without a deterministic kernel
NONDETERMINISTIC = ("adaptive_avg_pool2d_backward_cuda does not have a deterministic implementation, but you set "
                    "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation, or "
                    "you can use the 'warn_only=True' option, if that's acceptable for your application.")


def test_no_deterministic_kernel_is_one_line_naming_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    """`trainer.deterministic=true` on a GPU (or `trainer=cpu`'s, with `trainer.accelerator=gpu`) stops a ResNet at its
    first backward pass (adaptive average pooling has no deterministic CUDA gradient; no CPU op raises, so torch's text
    stands in): a traceback before, now the op and the setting to change, also from a spawned DDP rank."""
    from torch.multiprocessing import ProcessRaisedException

    from ood.cli import friendly_errors

    def task(cfg: object) -> None:
        raise RuntimeError(NONDETERMINISTIC)

    with pytest.raises(SystemExit) as stop:
        friendly_errors(task)(OmegaConf.create({}))
    assert stop.value.code == 1
    assert capsys.readouterr().err == (
        "error: adaptive_avg_pool2d_backward_cuda has no deterministic implementation and trainer.deterministic=true "
        "asks for one (trainer=cpu sets it; on a GPU, every ResNet's average pooling gradient): use "
        "trainer.deterministic=warn (deterministic where torch can be) or trainer.deterministic=false\n")
    rank = ProcessRaisedException(f"Traceback (most recent call last):\n  ...\nRuntimeError: {NONDETERMINISTIC}\n", 1, 7)
    assert str(user_error(rank)) == str(user_error(RuntimeError(NONDETERMINISTIC)))
    assert user_error(RuntimeError("CUDA out of memory")) is None


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        raise BadImageError(f"unreadable image /data/{i}.png: OSError: image file is truncated")


def test_a_data_error_in_a_loader_worker_is_one_line() -> None:
    """torch re-raises a worker's error with the worker's whole traceback as its message; the user sees its line."""
    loader = torch.utils.data.DataLoader(_Unreadable(), num_workers=1)
    with pytest.raises(BadImageError) as caught:
        next(iter(loader))
    assert "Original Traceback" in str(caught.value)
    user = user_error(caught.value)
    assert isinstance(user, BadImageError)
    assert str(user) == "unreadable image /data/0.png: OSError: image file is truncated"
    assert user_error(BadImageError("already one line")).args == ("already one line",)


def test_typo_in_a_value_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`ood-train seed=abc` stops before Hydra starts, with one line (not Python's ValueError from `int(seed)`)."""
    from ood.train import main

    monkeypatch.setattr("sys.argv", ["ood-train", "seed=abc"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 1
    assert capsys.readouterr().err == "error: seed=abc: expected an integer (the default is 0); ++seed=abc forces it\n"


@pytest.mark.parametrize(("argv", "said"), [
    (["detectors.names"], "override 'detectors.names' is not key=value: give its value, 'detectors.names=<value>' "
                          "(or '~detectors.names' to delete the key)"),
    (["seed", "3"], "override 'seed' is not key=value: give its value, 'seed=<value>' (or '~seed' to delete the key)"),
    (["detectors.names=[msp"], "override 'detectors.names=[msp' is not key=value as Hydra reads it (no viable "
                               "alternative at input '[msp'): quote a value with spaces or brackets, key='...'"),
])
def test_an_override_that_is_not_key_value_is_one_line(argv: list[str], said: str, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`ood-eval detectors.names` printed Hydra's three lines ("missing EQUAL at '<EOF>'", its grammar page, the
    HYDRA_FULL_ERROR hint); now the one line `ood.evaluate(overrides=...)` gives, before Hydra starts."""
    from ood.train import main

    monkeypatch.setattr("sys.argv", ["ood-train", *argv])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 1
    assert capsys.readouterr().err == f"error: {said}\n"


def test_lightning_chatter_is_quiet() -> None:
    before = {n: logging.getLogger(n).level for n in ("lightning.pytorch", "lightning.fabric")}
    try:
        with warnings.catch_warnings():
            quiet_lightning()
            assert not logging.getLogger("lightning.pytorch.utilities.rank_zero").isEnabledFor(logging.INFO)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                quiet_lightning()
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
                # Lightning's advice to test on one device under DDP (the sampler repeats samples): ood's evaluation
                # keeps each dataset index once, so it printed a false alarm on every trainer=ddp_cpu evaluation
                warnings.warn("Using `DistributedSampler` with the dataloaders. During `trainer.test()`, it is "
                              "recommended to use `Trainer(devices=1, num_nodes=1)` ...", UserWarning, stacklevel=1)
                warnings.warn("Using `DistributedSampler` with the dataloaders. During `trainer.validate()`, it is "
                              "recommended ...", UserWarning, stacklevel=1)  # not ood's evaluation: still said
            assert [str(w.message).split(",")[0] for w in caught] == [
                "Using `DistributedSampler` with the dataloaders. During `trainer.validate()`"]
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def test_one_bar_for_the_whole_evaluation_pass() -> None:
    bar = ProgressBar()
    trainer = SimpleNamespace(num_test_batches=[3, 2], progress_bar_callback=bar, state=SimpleNamespace(fn="test"))
    bar._init_progress(trainer)  # type: ignore[arg-type]
    try:
        for split, batches in enumerate(trainer.num_test_batches):
            for i in range(batches):
                bar.on_test_batch_start(trainer, None, None, i, split)  # type: ignore[arg-type]
                bar.on_test_batch_end(trainer, None, None, None, i, split)  # type: ignore[arg-type]
        (task,) = bar.progress.tasks
        assert (task.description, task.total, task.completed) == ("evaluation pass", 5, 5)
        bar.on_test_epoch_end(trainer, None)  # type: ignore[arg-type]
        assert bar._progress_stopped, "the live display stops before the evaluation prints"
    finally:
        bar._stop_progress()


def test_tuned_hyperparameters_in_one_block() -> None:
    rows = [
        {"detector": "knn", "ood_dataset": s, "detector_params": {"k": 50, "normalize": True}, "tuned_params": ["k"]}
        for s in ("a", "b")
    ] + [{"detector": "msp", "ood_dataset": "a", "detector_params": {}, "tuned_params": []},
         {"detector": "ash", "ood_dataset": "a", "detector_params": {"percentile": 85}, "tuned_params": ["percentile"]}]
    assert tuned_summary(rows, {"knn": 0.98765, "msp": 0.5}) == (
        "chosen on ID val vs validation OOD (val AUROC %): knn k=50 (98.77), ash percentile=85"
    )
    assert tuned_summary(rows[2:3], {}) == ""


def test_evaluating_into_a_training_run_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ood-eval hydra.run.dir=<training run>` stops before Hydra writes its `.hydra/` copies there, and before the
    evaluation replaces the run's config.yaml and results."""
    from ood.eval import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("trained: true\n")
    monkeypatch.setattr("sys.argv", ["ood-eval", f"ckpt_path={run}", f"hydra.run.dir={run}"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith(f"error: hydra.run.dir={run} is a training run's folder: evaluating there")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]
    assert (run / "config.yaml").read_text() == "trained: true\n"


TRAINED = ["method=oe", "data=cifar10", "data.benchmark.protocol=classic", "paths.data_dir=/d", "trainer.max_epochs=3",
           "seed=2", "method.lam=0.3", "method.init.ckpt=/x.ckpt", "data.batch_size=64", "+backbone.weights=/w.pth",
           "data.benchmark.outliers=tin597", "hydra.job.chdir=true"]


def _trained_run(tmp_path: Path, trained: Sequence[str] = TRAINED) -> Path:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in trained))
    choices = {"experiment": "cifar10_oal", "method": "oal", "method/teacher": "vit_b16", "data": "cifar10",
               "backbone": "resnet18", "trainer": "gpu", "paths": "default", "hydra/launcher": "basic"}
    OmegaConf.save({"hydra": {"runtime": {"choices": choices}}}, run / ".hydra" / "hydra.yaml")
    return run


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(["ckpt_path={run}/checkpoints/last.ckpt", "detectors.names=[msp]"],
      ["method=oe", "data=cifar10", "data.benchmark.protocol=classic", "paths.data_dir=/d", "method.lam=0.3"]),
     (["method=grood", "ckpt_path={run}"], ["data=cifar10", "data.benchmark.protocol=classic", "paths.data_dir=/d"]),
     (["ckpt_path={run}", "data=cifar100", "paths.data_dir=/e"], ["method=oe", "method.lam=0.3"]),
     (["ckpt_path={run}", "data.benchmark.protocol=oodformer"], ["method=oe", "data=cifar10", "paths.data_dir=/d",
                                                                  "method.lam=0.3"]),
     (["ckpt_path={run}", "~data.benchmark.protocol"], ["method=oe", "data=cifar10", "paths.data_dir=/d",
                                                        "method.lam=0.3"]),
     (["experiment=cifar10_oe", "ckpt_path={run}"], []),
     (["ckpt_path={run}", "~experiment"], []),
     (["ckpt_path={run},{run}"], []),
     (["ckpt_path=last"], [])],
)
def test_evaluation_takes_what_the_run_trained_from_its_command_line(tmp_path: Path, argv: list[str],
                                                                     expected: list[str]) -> None:
    """`ood-eval ckpt_path=<run>` evaluates what the run trained (its method, data, backbone overrides; not its
    epochs, seed, batches, outliers or starting weights); what the command line names is its own (a post-hoc
    `method=grood`, other data); nothing for an `experiment=`, a sweep of checkpoints without `-m` or `last`."""
    from ood.runs.trained import training_overrides

    run = _trained_run(tmp_path)
    found, adopted = training_overrides([a.format(run=run) for a in argv])
    assert adopted == expected and found == ([run] if expected else [])
    assert training_overrides([f"ckpt_path={tmp_path / 'elsewhere.ckpt'}"]) == ([], [])


def test_a_sweep_of_checkpoints_takes_what_its_runs_trained_alike(tmp_path: Path) -> None:
    """`ood-eval -m ckpt_path=<seed 0 run>,<seed 1 run>` (a training sweep's seeds) takes their method and data, as
    one run's evaluation does (it took nothing before: every job composed ce on digits and was refused); runs trained
    differently, or one folder without a command line, give nothing (the overrides apply to every job)."""
    from ood.runs.trained import training_overrides

    runs = [_trained_run(tmp_path / f"seed{s}", [*TRAINED[:5], f"seed={s}"]) for s in (0, 1)]
    other = _trained_run(tmp_path / "lam", [*TRAINED[:5], "method.lam=0.9"])
    sweep = ",".join(map(str, runs))
    assert training_overrides(["-m", f"ckpt_path={sweep}", "detectors.names=[msp]"]) == (
        runs, ["method=oe", "data=cifar10", "data.benchmark.protocol=classic", "paths.data_dir=/d"])
    assert training_overrides(["-m", f"ckpt_path=choice({sweep})", "data=digits"]) == (runs, ["method=oe", "paths.data_dir=/d"])
    assert training_overrides(["-m", f"ckpt_path={sweep},{other}"]) == ([], [])
    assert training_overrides(["-m", f"ckpt_path={sweep},{tmp_path / 'elsewhere.ckpt'}"]) == ([], [])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(["ckpt_path={run}"], ["experiment=cifar10_oal"]),
     (["ckpt_path={run}", "method=grood"], ["data=cifar10", "backbone=resnet18"]),
     (["-m", "ckpt_path={run}", "detectors.names=[msp],[knn]"],
      ["method=oal", "method/teacher=vit_b16", "data=cifar10", "backbone=resnet18"])],
)
def test_a_presets_run_is_evaluated_with_its_preset_or_the_groups_it_chose(tmp_path: Path, argv: list[str],
                                                                             expected: list[str]) -> None:
    """A run of `experiment=cifar10_oal` is evaluated with the preset; with a post-hoc `method=grood` the preset's
    method keys (OAL's teacher, `lam` of OE) would not fit GROOD, and in a multirun a preset's `hydra.sweep.dir` would
    put the evaluation jobs into the training runs' folders: then the groups the run chose are taken instead."""
    from ood.runs.trained import training_overrides

    run = _trained_run(tmp_path, ["experiment=cifar10_oal", "seed=1"])
    assert training_overrides([a.format(run=run) for a in argv]) == ([run], expected)


def test_ood_eval_of_a_run_folder_composes_its_method_and_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, `ood-eval ckpt_path=<an ood-train method=oe data=cifar10 run>` composed the defaults (ce on digits)
    and was refused with the command to type; the flags stay ahead of the added overrides."""
    from ood.eval import main

    run = _trained_run(tmp_path)
    monkeypatch.setattr("sys.argv", ["ood-eval", "--cfg", "job", f"ckpt_path={run}", "detectors.names=[msp]"])
    main()
    assert "OOD_EVAL_ADOPTED" not in os.environ, "the run's own variable, gone with it"
    out = capsys.readouterr()
    cfg = OmegaConf.create(out.out)
    assert (cfg.method._target_, cfg.method.lam, cfg.data.benchmark._target_) == ("ood.methods.oe.OutlierExposure", 0.3,
                                                                                  "ood.data.CIFAR10Benchmark")
    assert (cfg.data.benchmark.protocol, cfg.paths.data_dir, cfg.seed) == ("classic", "/d", 0)
    assert out.err == (f"ood-eval: as trained in {run}: method=oe data=cifar10 data.benchmark.protocol=classic "
                       "paths.data_dir=/d method.lam=0.3\n")


def test_run_folder_is_one_unwrapped_line_under_a_narrow_table(capsys: pytest.CaptureFixture[str]) -> None:
    """One OOD set makes a narrow table; the run folder's path is still printed whole on one line (it was wrapped
    inside the table's caption, cut mid-name)."""
    from ood.evaluation.evaluator import EvaluationResult
    from ood.evaluation.sinks import RunTable

    folder = "/tmp/some/long/place/logs/train/runs/2026-12-05_10-11-35-256455"
    row = {"method": "ce", "detector": "msp", "id_dataset": "my_id", "ood_dataset": "dtd", "ood_group": "far",
           "auroc": 0.9, "aupr_in": 0.9, "aupr_out": 0.9, "fpr95": 0.2, "fpr95_oodpos": 0.2}
    RunTable(folder).write(EvaluationResult([row], {}, 1.0, "ce"), SimpleNamespace(is_global_zero=True))
    assert f"run folder: {folder}\n" in capsys.readouterr().out


def test_a_user_error_in_a_sweep_job_ends_the_sweep_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a multirun the job's user error goes back to Hydra (the job is marked failed, the others run) as a
    `CompactHydraException`, which Hydra reports as its one line at the end of the sweep, not as a traceback."""
    from hydra._internal.utils import run_and_report

    from ood.cli import friendly_errors

    def task(cfg: object) -> None:
        raise ConfigError("method oe trains on outliers")

    monkeypatch.setattr("ood.cli.in_multirun", lambda: True)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit):
        run_and_report(lambda: friendly_errors(task)(OmegaConf.create({})))
    err = capsys.readouterr().err
    assert "error: method oe trains on outliers\nmethod oe trains on outliers\n" in err and "Traceback" not in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("enabled", [True, False])
def test_ood_bars_follow_trainer_enable_progress_bar(enabled: bool) -> None:
    """`trainer.enable_progress_bar=false` hides ood's own bars (passes, fitting, scoring, decoding) as it hides
    Lightning's; with it on they show on a terminal only."""
    from ood.cli import friendly_errors
    from ood.utils import progress

    shown = []

    def task(cfg: object) -> None:
        with progress(range(3), file=_Terminal()) as bar:
            shown.append(not bar.disable)

    friendly_errors(task)(OmegaConf.create({"trainer": {"enable_progress_bar": enabled}}))
    with progress(range(3), file=_Terminal()) as bar:  # outside an entry point (the Python API): shown
        shown.append(not bar.disable)
    assert shown == [enabled, True]


def test_off_a_terminal_a_long_loop_is_logged(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Not on a terminal (a batch job's log), a loop that runs past `LOG_EVERY_S` is logged every `LOG_EVERY_S`, as
    one INFO line per refresh (here 0 s: every step); a short loop writes nothing; none of it reaches the file."""
    import time

    from ood import utils

    file = io.StringIO()
    with caplog.at_level(logging.INFO, logger="ood.progress"):
        for _ in utils.progress(range(3), desc="short", file=file):
            pass
        assert caplog.messages == []
        monkeypatch.setattr(utils, "LOG_EVERY_S", 0.0)
        for _ in utils.progress(range(3), desc="network-pass detectors", file=file):
            time.sleep(0.01)
    assert file.getvalue() == ""
    assert [m.split(" [")[0] for m in caplog.messages][-3:] == [f"network-pass detectors: {n}/3" for n in (1, 2, 3)]
    assert all(r.name == "ood.progress" and r.levelno == logging.INFO for r in caplog.records)


def test_python_warnings_reach_the_log_file_and_are_still_shown(tmp_path: Path) -> None:
    """`warnings_in_log_files` (every entry point's task): a Python warning (Lightning's are) also lands in the root
    logger's log file (Hydra's train.log) as one `py.warnings` line; `pytest.warns`, i.e. `catch_warnings(record=True)`,
    still records it; after the block warnings no longer go to the file."""
    handler = logging.FileHandler(tmp_path / "train.log")
    handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with pytest.warns(UserWarning, match="a data warning"), warnings_in_log_files():
            warnings.warn("a data warning", UserWarning, stacklevel=1)
        with pytest.warns(UserWarning, match="after the block"):
            warnings.warn("after the block", UserWarning, stacklevel=1)
    finally:
        root.removeHandler(handler)
        handler.close()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[py.warnings][WARNING] - ")
    assert "tests/test_console.py:" in lines[0] and lines[0].endswith(": UserWarning: a data warning")


@pytest.mark.parametrize("columns", [60, 200])
def test_run_table_reads_at_60_to_200_columns(
    columns: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The title was wrapped at the table's width ("... AUROC / FPR95" then "in %"), centred over it, and a table
    wider than the terminal ran past it. The title and caption now wrap at the terminal's width (left-aligned), and a
    table too wide is printed in parts of whole columns (a set and its FS twin together), never cut."""
    from ood.evaluation.evaluator import EvaluationResult
    from ood.evaluation.sinks import RunTable

    monkeypatch.setenv("COLUMNS", str(columns))
    sets = {"dtd": "far", "svhn": "far", "cifar100": "near", "places365": "far"}
    rows = [{"method": "ce", "detector": d, "id_dataset": "cifar10", "ood_dataset": s, "ood_group": g, "mode": mode,
             "auroc": 0.9, "fpr95": 0.2 + i / 100, "aupr_in": 0.9, "aupr_out": 0.9, "fpr95_oodpos": 0.2,
             "csid_set_acc": {"cifar10c": 0.8}, "csid_acc": 0.85}
            for mode in ("standard", "fsood") for d in ("msp", "energy") for i, (s, g) in enumerate(sets.items())]
    RunTable().write(EvaluationResult(rows, {}, 0.95, "ce"), SimpleNamespace(is_global_zero=True))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ce on cifar10 (ID acc 95.00%): AUROC / FPR95 in %"  # rows without the run's info
    # a run's rows name its backbone (the title did not: a small_cnn and a resnet18 run read the same)
    RunTable().write(EvaluationResult([{**r, "backbone": "resnet18"} for r in rows], {}, 0.95, "ce"),
                     SimpleNamespace(is_global_zero=True))
    assert capsys.readouterr().out.splitlines()[0].startswith("ce with resnet18 on cifar10 (ID acc 95.00%): AUROC")
    assert max(map(len, lines)) <= columns and not [line for line in lines if "…" in line]
    headers = [line.strip("┃").split("┃")[1:] for line in lines if line.startswith("┃ detector")]
    names = [[h.strip() for h in part] for part in headers]
    expected = ["dtd", "dtd FS", "svhn", "svhn FS", "cifar100", "cifar100 FS", "places365", "places365 FS", "far",
                "far FS", "near", "near FS"]
    assert [n for part in names for n in part] == expected
    assert [len(part) for part in names] == ([2] * 6 if columns == 60 else [10, 2])
    assert [line.split("│")[2].strip() for line in lines if line.startswith("│ energy")][0] == "90.00 / 20.00"
    caption = " ".join(line.strip() for line in lines[lines.index(next(x for x in lines if x.startswith("FPR95"))):])
    assert caption.endswith("accuracy cifar10c 80.00%; ID test and csid pooled 85.00%")


@pytest.mark.parametrize(("train", "line"), [
    (True, "stopped by Ctrl-C: {out} has no checkpoint yet (stopped in its first epoch); start it again there with the "
           "same command plus ckpt_path=last hydra.run.dir={out}"),
    (False, "stopped by Ctrl-C: {out}: rerun the evaluation"),
])
def test_ctrl_c_says_how_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                   train: bool, line: str) -> None:
    """Ctrl-C ended `ood-train` with a traceback and nothing else on the console (the resume hint was in FAILED.txt
    only, unlike SIGTERM's line); it now prints the line SIGTERM prints, naming the folder and the overrides that
    resume it there, before Python's KeyboardInterrupt."""
    import ood.train

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ood.train, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ood.train.run(compose_config(tmp_path, [f"train={train}", "ckpt_path=some.ckpt"]))
    assert capsys.readouterr().err.splitlines()[-1] == line.format(out=tmp_path)
