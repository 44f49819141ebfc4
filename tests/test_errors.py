"""Bad input gets a clear message naming the thing at fault, never a bare traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST, compose_config, run_config
from hydra.errors import InstantiationException, MissingConfigException
from hydra.utils import instantiate

from ood.data import DigitsBenchmark
from ood.detectors import build_detector
from ood.errors import CheckpointError, ConfigError, NonFiniteError
from ood.evaluation.scoring import Scorer, evaluate
from ood.methods import CrossEntropy
from ood.models import SmallCNN


@pytest.mark.parametrize("group", ["method", "data", "backbone", "trainer", "logger"])
def test_unknown_group_option_lists_choices(tmp_path: Path, group: str) -> None:
    with pytest.raises(MissingConfigException) as err:
        compose_config(tmp_path, [f"{group}=no_such_option"])
    assert "Available options" in str(err.value)


def test_cli_error_has_no_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ood.train", "method=no_such_method"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: unknown method 'no_such_method': choices: ce, cluster, ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_unknown_detector_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="available: .*msp"):
        run_config(tmp_path, [*FAST, "detectors.names=[msp,no_such_detector]"])
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_detector_hyperparameter_lists_accepted() -> None:
    with pytest.raises(ConfigError, match="accepted: \\['temperature'\\]"):
        build_detector("energy", t=2.0)


def test_missing_checkpoint_names_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match=f"not found: {missing}"):
        run_config(tmp_path / "run", [f"ckpt_path={missing}"], config_name="eval")


def test_corrupt_checkpoint_names_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=f"could not read checkpoint {corrupt}"):
        run_config(tmp_path / "run", [f"ckpt_path={corrupt}"], config_name="eval")


@pytest.mark.parametrize(("content", "said"), [
    (b"hello\n", r": not a file of torch.save \(neither its zip format nor a pickle\): it starts with b'hello\\n'$"),
    (b"\x93NUMPY\x01\x00", r": not a file of torch.save \(neither its zip format nor a pickle\): a NumPy .npy file$"),
    (b"\x1f\x8b\x08\x00", r": not a file of torch.save \(neither its zip format nor a pickle\): a gzip file: unpack it first$"),
    ("pickle", r": a pickle, not one of torch.save: save its tensors with torch.save$"),
    ("zip", r": it is a zip archive, not a file of torch.save: unpack it and give the file inside \(e.g. run/s0/best.ckpt\)$"),
], ids=["text", "npy", "gzip", "pickle", "zip"])
def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path: Path, content: bytes | str, said: str) -> None:
    """torch said "invalid load key, 'h'" for text, and, as `ood-eval` first reads a checkpoint memory-mapped, that the
    file must be saved again with the zip format: of a text file, a NumPy array, or OpenOOD's zip of checkpoints."""
    import pickle
    import zipfile

    path = tmp_path / "given.ckpt"
    if content == "pickle":
        path.write_bytes(pickle.dumps({"fc.weight": [1.0]}, protocol=4))
    elif content == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("run/s0/best.ckpt", b"...")
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"^could not read checkpoint {re.escape(str(path))}{said}"):
        run_config(tmp_path / "run", [f"ckpt_path={path}"], config_name="eval")


def test_a_checkpoint_saved_in_torchs_format_before_1_6_evaluates_as_the_same_one_in_its_zip_format(
    tmp_path: Path, ce_checkpoint: Path
) -> None:
    """Released checkpoints of 2018-2020 papers predate torch.save's zip format; `ood-eval` read every file memory-mapped
    first (its stored config), which torch refuses for them ("mmap can only be used with files saved with
    `_use_new_zipfile_serialization=True`")."""
    legacy = tmp_path / "legacy.ckpt"
    torch.save(torch.load(ce_checkpoint, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    rows = {name: run_config(tmp_path / name, [f"ckpt_path={path}", "detectors.names=[msp,knn]", "logger=none",
                                               "trainer.enable_progress_bar=false"], config_name="eval")
            for name, path in (("zip", ce_checkpoint), ("legacy", legacy))}
    metrics = {name: [(r["detector"], r["ood_dataset"], r["auroc"], r["fpr95"]) for r in rs] for name, rs in rows.items()}
    assert metrics["legacy"] == metrics["zip"] and len(metrics["zip"]) == 2 * 4 and rows["zip"][0]["seed"] == 0


def test_mismatched_checkpoint_names_file(tmp_path: Path) -> None:
    other = CrossEntropy(SmallCNN(6, width=8), optimizer=torch.optim.SGD)
    path = tmp_path / "small.ckpt"
    torch.save({"state_dict": other.state_dict()}, path)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} does not fit"):
        run_config(tmp_path / "run", [f"ckpt_path={path}"], config_name="eval")


@pytest.mark.parametrize(("config", "overrides", "said"), [
    ("eval", ["ckpt_path=2024"], "ckpt_path=2024"),
    ("train", ["data=folder", "data.root=2024"], "data.root=2024"),
    ("train", [*FAST, "++method.init.ckpt=2024.5"], "++method.init.ckpt=2024.5"),  # a float too, typed as given
    ("train", ["seed=5", "evaluation.bank_dir=5"], "seed=5 or evaluation.bank_dir=5"),  # both gave the number refused
    ("train", ["seed=3", "evaluation.bank_dir=5"], "evaluation.bank_dir=5"),
], ids=["ckpt_path", "data.root", "init.ckpt", "two", "bank_dir"])
def test_a_file_or_folder_named_by_digits_says_to_quote_it(
    tmp_path: Path, config: str, overrides: list[str], said: str
) -> None:
    """Hydra reads `data.root=2024` as the number 2024, and the run ended in Python's TypeError (in Hydra's
    five-line instantiation error for the data, the method and the evaluation)."""
    from ood.cli import user_error

    with pytest.raises((TypeError, InstantiationException)) as err:
        run_config(tmp_path, overrides, config_name=config)
    quoted = " or ".join(f"\"{o}'\"".replace("=", "='", 1) for o in said.split(" or "))
    message = str(user_error(err.value))
    assert message.startswith(f"{said}: Hydra reads a bare number as a number, and a file or folder name is expected")
    assert message.endswith(quoted) and "\n" not in message


def test_a_type_error_not_about_a_path_or_with_no_number_given_is_left_alone(tmp_path: Path) -> None:
    """Another TypeError is a bug (its traceback is shown), and a path refused with a number the command line did not
    give (a user's YAML) is not claimed."""
    from ood.cli import number_as_path, user_error

    compose_config(tmp_path, ["seed=3"])
    assert user_error(TypeError("unsupported operand type(s) for +: 'int' and 'str'")) is None
    try:
        Path(7)
    except TypeError as err:
        assert number_as_path(err, ["seed=3", "data.root='7'"]) is None
        assert str(number_as_path(err, ["seed=7"])).startswith("seed=7: Hydra reads a bare number")



def test_a_path_refused_in_a_dataloader_worker_is_not_claimed_for_a_number_given() -> None:
    """A DataLoader worker's TypeError comes back as text, re-raised where no number is held: every number of the
    command line's type was claimed (`trainer.max_epochs=3` "quote it"), and the dataset's own bug (a path made of an
    index) lost its traceback."""
    from torch._utils import ExceptionWrapper

    from ood.cli import NOT_A_PATH, number_as_path

    try:
        Path(7)  # a dataset's `__getitem__` making a path of its index, in a worker
    except TypeError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(TypeError, match=NOT_A_PATH.pattern) as err:  # Python 3.11's words or 3.12's pathlib's
        wrapper.reraise()
    assert number_as_path(err.value, ["trainer.max_epochs=3"]) is None


@pytest.mark.parametrize(("bad_step", "batches", "checked_after"), [(3, 8, 5), (7, 8, 8)])
def test_nan_loss_stops_with_step(bad_step: int, batches: int, checked_after: int) -> None:
    """The check runs every log_every_n_steps (5) batches and at the epoch's last batch, and names the bad step."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from ood.data.batch import Batch, collate_batch

    calls: list[int] = []

    class NanAt(CrossEntropy):
        def training_loss(self, batch: Batch) -> torch.Tensor:
            calls.append(self.global_step)
            loss = super().training_loss(batch)
            return loss * float("nan") if self.global_step == bad_step else loss

    method = NanAt(SmallCNN(6, width=4), optimizer=torch.optim.SGD)
    n = 4 * batches
    data = TensorDataset(torch.randn(n, 1, 16, 16), torch.zeros(n, dtype=torch.long), torch.arange(n))
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, log_every_n_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(NonFiniteError, match=f"ce: training loss is nan at step {bad_step} \\(epoch 0, batch {bad_step}\\)"):
        trainer.fit(method, DataLoader(data, batch_size=4, collate_fn=collate_batch))
    assert len(calls) == checked_after


def test_nan_score_names_detector_and_dataset() -> None:
    from ood.data.benchmark import EvalSplit

    splits = [EvalSplit("test", "id_test"), EvalSplit("svhn", "ood", "far")]
    bad = Scorer("energy", lambda split: torch.tensor([1.0, float("nan")]) if split == "svhn" else torch.ones(2))
    with pytest.raises(NonFiniteError, match="detector energy on svhn"):
        evaluate([bad], splits, id_acc=1.0, info={})


def test_constant_scores_warn(caplog: pytest.LogCaptureFixture) -> None:
    """Every image scored alike (rankfeat on a 1x1 last stage) gives AUROC 50 silently; it is said."""
    from ood.data.benchmark import EvalSplit

    splits = [EvalSplit("test", "id_test"), EvalSplit("svhn", "ood", "far")]
    flat = Scorer("rankfeat", lambda split: torch.full((3,), 0.6998))
    ranked = Scorer("energy", lambda split: torch.arange(3.0) + (split == "test"))
    with caplog.at_level("WARNING"):
        rows, _ = evaluate([flat, ranked], splits, id_acc=1.0, info={})
    assert [r.getMessage() for r in caplog.records] == [
        "detector rankfeat gives every ID test and OOD image the same score (0.6998): its AUROC 50 and FPR95 100 say "
        "nothing about the data"]
    assert rows[0]["auroc"] == 0.5


def test_unknown_layer_lists_choices() -> None:
    with pytest.raises(ConfigError, match="choices: \\['block1', 'block2', 'block3'\\]"):
        SmallCNN(6).forward_from("layer9", torch.zeros(1, 1, 16, 16))


def test_bad_split_fractions() -> None:
    with pytest.raises(ValueError, match="summing to 1"):
        DigitsBenchmark(split=(0.5, 0.2, 0.2))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method=oe method.lam=-1", r"method.lam=-1 is outside its range \[0, inf\]"),
        ("method=logitnorm method.tau=0", r"method.tau=0 is outside its range \(0, inf\]"),
        ("method=energy_oe method.temperature=0", r"method.temperature=0 is outside its range \(0, inf\]"),
        ("method=energy_cfl method.gamma=-1", r"method.gamma=-1 is outside its range \[0, inf\]"),
        ("method=grood method.mix_lambda=2", r"method.mix_lambda=2 is outside its range \[0, 1\]"),
        ("method=grood method.n_proto=0", r"method.n_proto=0 is outside its range whole numbers in \[1, inf\]"),
        ("method=cluster method.k=0", r"method.k=0 is outside its range whole numbers in \[1, inf\]"),
        ("method=cluster method.k=1.5", r"method.k=1.5 is outside its range whole numbers in \[1, inf\]"),
        ("method=grood method.k=2.0", r"method.k=2.0 is a count: write 2 \(Hydra reads 2.0 and 1e4 as floats\)"),
        ("method=cluster method.k=1e4", r"method.k=10000.0 is a count: write 10000 \(Hydra reads 2.0 and 1e4 as floats\)"),
        ("method=oal method.knn_keep=1.5", r"method.knn_keep=1.5 is outside its range whole numbers in \[1, inf\]"),
        ("method=heatmap method.num_ood=2.5", r"method.num_ood=2.5 is outside its range whole numbers in \[1, inf\]"),
        ("method=heatmap method.classifier_epochs=-1",
         r"method.classifier_epochs=-1 is outside its range whole numbers in \[0, inf\]"),
        ("method=heatmap method.num_ood=0", r"method.num_ood=0 is outside its range whole numbers in \[1, inf\]"),
        ("method=oal method.knn_sigma=-1", r"method.knn_sigma=-1 is outside its range \(0, inf\]"),
        ("method=oal method.w_kd_logit=-1", r"method.w_kd_logit=-1 is outside its range \[0, inf\]"),
        ("method=cluster method.head_dim=0", r"method.head_dim=0 is outside its range whole numbers in \[1, inf\]"),
        ("method=energy_cfl method.projection_dim=0",
         r"method.projection_dim=0 is outside its range whole numbers in \[1, inf\]"),
        ("method=energy_cfl method.score.grid=[0,-1]", r"method.score.grid entry=-1 is outside its range \[0, inf\]"),
        ("method.optimizer.lr=-1", r"method.optimizer.lr=-1 is outside its range \[0, inf\]"),  # torch's traceback
        ("method=oal method.optimizer.lr=-0.1", r"method.optimizer.lr=-0.1 is outside its range \[0, inf\]"),
        ("method.optimizer._target_=torch.optim.Adam",  # SGD's keys left over: Adam's TypeError as the fit started
         r"method.optimizer: Adam takes no \['momentum', 'nesterov'\] \(it takes \['lr', .*\]\); add "
         r"~method.optimizer.momentum ~method.optimizer.nesterov"),
    ],
)
def test_method_key_out_of_range_names_its_range(tmp_path: Path, override: str, message: str) -> None:
    """Out-of-range method keys are refused by name: they trained silently (a negative weight, k=0, num_ood=0 or
    projection_dim=0 read as their default, classifier_epochs=-1 froze an untrained classifier) or NaN'd at step 0
    blaming the lr; a fraction for a count (k=1.5) trained a whole epoch, then failed inside faiss with a traceback."""
    cfg = compose_config(tmp_path, override.split())
    with pytest.raises(InstantiationException) as err:
        instantiate(cfg.method, backbone=SmallCNN(6))
    assert isinstance(err.value.__cause__, ConfigError)
    assert re.fullmatch(message, str(err.value.__cause__))


def _method_refusal(tmp_path: Path, override: str) -> str:
    """The one-line `ConfigError` that building the method of `override` raises."""
    cfg = compose_config(tmp_path, override.split())
    with pytest.raises(InstantiationException) as err:
        instantiate(cfg.method, backbone=SmallCNN(6))
    assert isinstance(err.value.__cause__, ConfigError)
    return str(err.value.__cause__)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.optimizer.momentum=-0.5", r"method.optimizer: torch refuses SGD\(lr=0.05, momentum=-0.5, "
         r"weight_decay=0.0005, nesterov=True\): Invalid momentum value: -0.5"),
        ("method.optimizer.momentum=0", r"method.optimizer: torch refuses SGD\(.*\): Nesterov momentum requires a "
         r"momentum and zero dampening"),
        ("method.optimizer.momentum=nan", r"method.optimizer.momentum=nan is not a finite number"),
        ("method=heatmap method.optimizer.betas=[1.5,0.999]",
         r"method.optimizer: torch refuses Adam\(lr=0.0002, betas=\[1.5, 0.999\]\): Invalid beta parameter at index 0: 1.5"),
        ("method=heatmap method.classifier_epochs=2 method.classifier_optimizer.weight_decay=-1",
         r"method.classifier_optimizer: torch refuses SGD\(.*\): Invalid weight_decay value: -1"),
        ("method.scheduler.T_max=0", r"method.scheduler.T_max=0 is outside its range whole numbers in \[1, inf\]"),
        ("method=energy_oe method.scheduler.eta_min=-1", r"method.scheduler.eta_min=-1 is outside its range \[0, inf\]"),
        ("method=heatmap method.classifier_epochs=2 method.classifier_scheduler.T_max=0",
         r"method.classifier_scheduler.T_max=0 is outside its range whole numbers in \[1, inf\]"),
    ],
)
def test_optimizer_and_scheduler_values_torch_takes_or_refuses_late_are_one_line(
    tmp_path: Path, override: str, message: str
) -> None:
    """Optimiser values torch refuses only as the fit starts (a traceback after the data's set-up: a negative momentum
    or weight decay, Adam's betas outside [0, 1), Nesterov without momentum) or takes (momentum=nan: NaN weights), a
    cosine's T_max=0 (ZeroDivisionError at the first epoch's end, after training it) and a negative eta_min (a
    negative learning rate: gradient ascent) are refused as the method is built."""
    assert re.fullmatch(message, _method_refusal(tmp_path, override))


def test_device_bound_optimizer_options_and_other_libraries_optimizers_are_left_to_the_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torch before 2.4 refused `fused=True` for CPU parameters as the optimiser was built (a RuntimeError, which
    escaped the check): the check's CPU stand-in would refuse a GPU run's `+method.optimizer.fused=true`, whose
    parameters are on the GPU. Such options are left to the fit, as are optimisers of other libraries (they may need
    parameters like the model's); torch's own are still tried on the stand-in."""
    from functools import partial

    from ood.methods.base import check_optimizer

    built = torch.optim.SGD.__init__

    def torch_2_3(self, params, *args, fused: bool | None = None, **kwargs) -> None:  # its check, at construction
        params = list(params)
        if fused and any(p.device.type != "cuda" for p in params):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        built(self, params, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "__init__", torch_2_3)
    check_optimizer(partial(torch.optim.SGD, lr=0.1, fused=True))
    with pytest.raises(ConfigError, match=r"^method.optimizer: torch refuses SGD\(lr=0.1, momentum=-1\): "
                                          r"Invalid momentum value: -1$"):
        check_optimizer(partial(torch.optim.SGD, lr=0.1, momentum=-1))

    class Grouped(torch.optim.SGD):  # another library's: it reads the model's parameter shapes as it is built
        def __init__(self, params, **kwargs) -> None:
            params = list(params)
            if not any(p.dim() > 1 for p in params):
                raise RuntimeError("Grouped needs weight matrices")
            super().__init__(params, **kwargs)

    check_optimizer(partial(Grouped, lr=0.1))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method=heatmap method.latent=0", r"method.latent=0 is outside its range whole numbers in \[1, inf\]"),
        ("method=heatmap method.width=2.5", r"method.width=2.5 is outside its range whole numbers in \[1, inf\]"),
        ("method=heatmap method.input_size=0", r"method.input_size=0 is outside its range whole numbers in \[1, inf\]"),
        ("method=cluster method.head_hidden=0", r"method.head_hidden=0 is outside its range whole numbers in \[1, inf\]"),
        ("method=cluster method.probe_epochs=2.5",
         r"method.probe_epochs=2.5 is outside its range whole numbers in \[0, inf\]"),
        ("method=oal method.lr_proj=-1", r"method.lr_proj=-1 is outside its range \[0, inf\]"),
        ("method=oal method.knn_select=1.5", r"method.knn_select=1.5 is outside its range whole numbers in \[1, inf\]"),
        ("method=oal method.outlier_norm=0", r"method.outlier_norm=0 is outside its range \(0, inf\]"),
        ("method=oal method.teacher.epochs=-1",
         r"method.teacher.epochs=-1 is outside its range whole numbers in \[1, inf\]"),
        ("method=oal method.teacher.batch_size=2.5",
         r"method.teacher.batch_size=2.5 is outside its range whole numbers in \[1, inf\]"),
        ("method=energy_oe method.margins=absolute method.m_in=nan", r"method.m_in=nan is outside its range \[-inf, inf\]"),
        ("method=cluster method.kmeans_seed=0.5",
         r"method.kmeans_seed=0.5 is outside its range whole numbers in \[0, inf\]"),
        ("method=oal method.sampling_seed=0.5",
         r"method.sampling_seed=0.5 is outside its range whole numbers in \[0, inf\]"),
        ("method=oe method.lam=inf", r"method.lam=inf is not a finite number; its range is \[0, inf\)"),
        ("method=logitnorm method.tau=inf", r"method.tau=inf is not a finite number; its range is \(0, inf\)"),
    ],
)
def test_method_key_taken_silently_is_refused_by_name(tmp_path: Path, override: str, message: str) -> None:
    """Method keys that were taken: latent=0, width=0, head_hidden=0 read as their defaults; a fraction for a count
    was cut (knn_select=1.5 -> 1, teacher.batch_size=2.5 -> 2) or a traceback (width=2.5; kmeans_seed=0.5 after the
    training, sampling_seed=0.5 after the teacher's, in torch.manual_seed); teacher.epochs=-1 trained
    no epoch (an untrained teacher); outlier_norm=0 put every outlier at the origin; a negative lr_proj ascended;
    m_in=nan and an infinite weight or temperature gave a NaN or infinite loss at step 0, blamed on the lr."""
    assert re.fullmatch(message, _method_refusal(tmp_path, override))


def test_another_optimizer_without_the_keys_it_does_not_take_builds(tmp_path: Path) -> None:
    """Adam in place of SGD, with the SGD-only keys dropped as the refusal says, builds and keeps the lr."""
    cfg = compose_config(tmp_path, ["method.optimizer._target_=torch.optim.Adam", "~method.optimizer.momentum",
                                    "~method.optimizer.nesterov"])
    optimizer = instantiate(cfg.method, backbone=SmallCNN(6)).configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 0.05
