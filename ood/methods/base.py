"""`OODMethod`: the LightningModule every method extends, and the contract with the evaluation callback.

Training: a method declares the `streams` it trains on (`("id",)`, or `("id", "outliers")`: the DataModule then
adds an outlier batch `x_out` to every `Batch`) and implements `training_loss(batch)`; the base logs it and stops
on a NaN/inf loss with the step number (checked every `log_every_n_steps` batches: no device sync per step).
`init` starts from weights: `init.ckpt` (any file `ood.models.checkpoint` reads), `init.modules` (which sub-modules; a list of names or a {target: source} map;
None = every sub-module the file has weights for), `init.freeze` (sub-modules kept frozen: no gradients, eval mode
through every `train()` call, so batch-norm statistics stay as loaded). `ckpt_path=` keeps Lightning's meaning
(resume this run).

Fit-time data: a method that needs data before training (statistics of the starting model, prototypes, a
teacher's features, an outlier pool) implements `prepare(data)`; the framework calls it once at fit start with an
`ood.data.fit.FitData` (the benchmark's datasets by name, seed, batch sizes, device, dtype, ranks), and a test can
call it with `OODDataModule.fit_data()` and no `Trainer`. Its passes go through `ood.features.passes.forward_dataset`.

Evaluation (`trainer.test`): the callback names the splits first (`begin_evaluation(splits)`), then one forward
pass per split; `eval_outputs(x, split)` returns the per-sample tensors
that go into the feature cache (`logits`, `features`, plus any `cache_layers`), then the callback hands the cached
`FeatureBank`s to `setup_ood` (post-hoc fitting, e.g. GROOD's prototypes) and asks `ood_score` for the method's
own score, reported as `detector = <method name>` (the keys `eval_outputs` adds reach it as `bank.extras`). `linear_head()` gives the linear head (W, b) the post-hoc detectors
use; `fitted()` returns the values a method fitted (margins, statistics), which the evaluator writes into every
result row as `method_params.fitted`; `diagnostics()` returns extra statistics for the callback's sinks to log and
write.

Parts beyond the backbone: `trained_parts` (what the score reads that only training gives: an evaluation that trains
nothing refuses the method), `part_files` (the `method.*` file key that fills such a part instead) and
`unstored_parts` (parts no checkpoint holds); docs/adding_a_method.md, "Parts beyond the network".
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

from ood.data.batch import Batch
from ood.data.benchmark import EvalSplit, Stream
from ood.data.fit import FitData
from ood.errors import ConfigError, NonFiniteError, check_range
from ood.features.bank import FeatureBank
from ood.methods.schedules import Interval, OpenOODCosine
from ood.models.base import Backbone
from ood.models.checkpoint import load_modules, read_state_dict
from ood.utils import get_logger, linear_params

log = get_logger(__name__)


class _DropFrozenFilterOnException(Callback):
    """A failed fit's way out, for `OODMethod`'s eval-mode warning filter (`OODMethod.configure_callbacks`)."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(pl_module, OODMethod):
            pl_module._drop_frozen_filter()


OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any] | OpenOODCosine
InitModules = Sequence[str] | Mapping[str, str] | None


#: optimizer keywords whose check depends on the parameters' device (`check_optimizer` leaves them to the fit)
DEVICE_BOUND = frozenset({"fused", "capturable"})


def check_optimizer(optimizer: Any, key: str = "method.optimizer") -> None:
    """Refuse, as the method is built, what torch refuses only as the fit starts (in a traceback): a negative
    `<key>.lr`, a key its optimizer class does not take (SGD's `momentum` left over after
    `method.optimizer._target_=torch.optim.Adam`), a NaN or infinite number (torch takes `momentum=nan`: NaN weights
    after the first step), and any value torch's optimizer itself refuses (a negative momentum or weight decay, Adam's
    betas outside [0, 1), Nesterov without momentum), tried on a stand-in parameter."""
    keywords = getattr(optimizer, "keywords", {})
    check_range(f"{key}.lr", keywords.get("lr"), 0)
    for name, value in keywords.items():
        numbers = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"{key}.{name}={value} is not a finite number")
    func = getattr(optimizer, "func", None)
    if not isinstance(func, type):
        return
    params = inspect.signature(func).parameters
    unknown = sorted(set(keywords) - set(params))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        drop = " ".join(f"~{key}.{k}" for k in unknown)
        raise ConfigError(f"{key}: {func.__name__} takes no {unknown} (it takes "
                          f"{[k for k in params if k != 'params']}); add {drop}")
    # torch's own optimisers only (another library's may need parameters like the model's: its own refusal is its
    # message), and not with device-bound options: torch before 2.4 refused `fused=True` for a CPU parameter such as
    # the stand-in, which the run's parameters on the GPU are not
    ours = issubclass(func, torch.optim.Optimizer) and func.__module__.startswith("torch.optim")
    if ours and not keywords.keys() & DEVICE_BOUND:
        try:
            optimizer([nn.Parameter(torch.zeros(1))])
        except (ValueError, TypeError, IndexError) as err:
            given = ", ".join(f"{k}={v}" for k, v in keywords.items())
            raise ConfigError(f"{key}: torch refuses {func.__name__}({given}): {err}") from None


def check_scheduler(scheduler: Any, key: str = "method.scheduler") -> None:
    """Refuse a scheduler factory's `T_max` below 1 or fractional (torch's cosine divides by zero at the first
    epoch's end, after training it; a negative one runs the cosine backwards) and a negative `eta_min` (the cosine
    then ends at a negative learning rate: gradient ascent, silently), naming `<key>.<keyword>`."""
    keywords = getattr(scheduler, "keywords", {})
    check_range(f"{key}.T_max", keywords.get("T_max"), 1, integer=True)
    check_range(f"{key}.eta_min", keywords.get("eta_min"), 0)


class OODMethod(LightningModule):
    """Base method: a backbone trained with `training_loss`, evaluated through the shared callback.

    Args:
        backbone: any `Backbone` (logits, features, named stages, `forward_from`).
        optimizer: a `_partial_` optimizer factory taking the (trainable) parameters.
        scheduler: an optional `_partial_` LR-scheduler factory taking the optimizer (stepped per epoch), or an
            `ood.methods.schedules.OpenOODCosine` (given the run's length, stepped per its `interval`).
        init: `{ckpt, modules, freeze}`: start from weights, pick sub-modules, freeze sub-modules (module doc).
    """

    #: the name results are reported under (`method` field; `detector` for the method's own score)
    name: ClassVar[str]
    #: the training streams the DataModule must serve (`id`, and `outliers` for outlier-exposure methods)
    streams: ClassVar[tuple[Stream, ...]] = ("id",)
    #: backbone stages whose outputs are cached during evaluation (as `FeatureBank.extras`)
    cache_layers: tuple[str, ...] = ()
    #: the parts besides the backbone that the method's own score reads and only its training gives (a decoder,
    #: class centres): `ood.evaluate(model, method=<name>)` and `ood-eval backbone.weights=`, which train nothing,
    #: refuse such a method; an instance whose part came from a file (`part_files`) sets it to () in `__init__`
    trained_parts: ClassVar[tuple[str, ...]] = ()
    #: trained part -> the `method.*` key of a file that fills it (heatmap: {"decoder": "decoder_ckpt"}): with that key
    #: set, an evaluation without the training's checkpoint is accepted (`ood.runs.checks.untrained_parts`)
    part_files: ClassVar[dict[str, str]] = {}
    #: parts no checkpoint of the method holds (OAL's teacher, read from its own file at every fit start; kept out of
    #: the module tree): `ood.models.checkpoint.load_modules` skips an older checkpoint's entries for them
    unstored_parts: ClassVar[tuple[str, ...]] = ()
    #: the first epoch whose weights are the whole trained method (heatmap's decoder trains after a CE phase):
    #: `evaluation.weights=best_val_acc` keeps none before it
    first_complete_epoch: int = 0

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        init: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(getattr(type(self), "name", None), str):  # else an AttributeError deep in the run's set-up
            raise ConfigError(f"{type(self).__name__} sets no `name`, the class attribute its results are reported "
                              "under (the name of its conf/method/<name>.yaml)")
        check_optimizer(optimizer)
        check_scheduler(scheduler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._unchecked_losses: list[tuple[int, int, int, torch.Tensor]] = []
        init = dict(init or {})
        unknown = set(init) - {"ckpt", "modules", "freeze"}
        if unknown:
            raise ConfigError(f"method.init has unknown keys {sorted(unknown)}; choices: ['ckpt', 'modules', 'freeze']")
        self.init_ckpt: str | None = init.get("ckpt")
        self.init_modules: InitModules = init.get("modules")
        self.frozen: tuple[str, ...] = tuple(init.get("freeze") or ())
        #: the evaluation splits in test-loader order (from `begin_evaluation`, before the pass)
        self.eval_splits: list[EvalSplit] = []
        #: the warning filter `on_fit_start` adds for the frozen parts, until `on_train_start`
        self._frozen_filter: tuple | None = None

    # ----- fit-time data --------------------------------------------------------------------------------------
    def prepare(self, data: FitData) -> None:
        """Fit-time passes before training (module doc); called once by the framework at fit start, after the
        weights are loaded and on their device. Default: nothing."""

    # ----- start from weights, freeze --------------------------------------------------------------------------
    def apply_init(self, load: bool = True) -> None:
        """Load `init.ckpt` into `init.modules` (when `load`: not when resuming or evaluating a checkpoint), then
        freeze `init.freeze`. Called once after construction, before training."""
        if load and self.init_ckpt:
            state = read_state_dict(self.init_ckpt)
            modules = self.init_modules
            if modules is None:
                have = {k.split(".")[0] for k in state}
                modules = [name for name, _ in self.named_children() if name in have]
                if not modules:
                    raise ConfigError(
                        f"{self.init_ckpt} has weights for {sorted(have)}, none of which {self.name} has "
                        f"({[n for n, _ in self.named_children()]}); set method.init.modules"
                    )
            if not isinstance(modules, Mapping):
                modules = {name: name for name in modules}
            loaded = load_modules(self, state, modules, self.init_ckpt)
            log.info("%s: initialised %s from %s", self.name, loaded, self.init_ckpt)
        for name in self.frozen:
            try:
                module = self.get_submodule(name)
            except AttributeError:
                names = [n for n, _ in self.named_modules() if n and n.count(".") < 2]
                raise ConfigError(f"method.init.freeze: {self.name} has no sub-module {name!r}; choices: {names}") from None
            module.requires_grad_(False)
            module.eval()

    def on_fit_start(self) -> None:
        """Lightning warns of every module in eval mode as training starts ('This may lead to unexpected behavior');
        the frozen parts are in eval mode on purpose (`train`), so the warning is silenced for exactly their count,
        until `on_train_start` (just after Lightning's check): a module left in eval mode otherwise still makes it."""
        frozen = {id(m) for name in self.frozen for m in self.get_submodule(name).modules()}
        if frozen:
            before = list(warnings.filters)
            warnings.filterwarnings("ignore", rf"Found {len(frozen)} module\(s\) in eval mode at the start of training",
                                    PossibleUserWarning)
            if warnings.filters[0] in before:  # an equal one was there (moved to the front): back in its place, ours none
                warnings.filters[:] = before
            else:
                self._frozen_filter = warnings.filters[0]

    def on_train_start(self) -> None:
        """The filter of `on_fit_start` removed: left in place, it silenced that warning for every later fit in the
        process (a Hydra multirun's next job, a notebook's next model) with as many modules left in eval mode."""
        self._drop_frozen_filter()

    def teardown(self, stage: str) -> None:
        """The filter of `on_fit_start` removed after a fit that never started training (`limit_train_batches=0`, a
        resumed run already at `max_epochs`: Lightning skips `on_train_start` then)."""
        self._drop_frozen_filter()

    def configure_callbacks(self) -> list[Callback]:
        """`_DropFrozenFilterOnException`: a fit that fails before training starts (sanity check, data loaders,
        another `on_fit_start`) reaches neither `on_train_start` nor `teardown`, only callbacks' `on_exception`. Once
        per trainer: handed again at its next stage, Lightning logged that it overrides the trainer's."""
        if any(isinstance(c, _DropFrozenFilterOnException) for c in self.trainer.callbacks):
            return []
        return [_DropFrozenFilterOnException()]

    def _drop_frozen_filter(self) -> None:
        """Remove the filter `on_fit_start` added (that very one: an equal one added by others stays), if still there."""
        for index, item in enumerate(warnings.filters):
            if item is self._frozen_filter:
                del warnings.filters[index]  # an "ignore" filter: nothing cached to invalidate
                break
        self._frozen_filter = None

    def train(self, mode: bool = True) -> OODMethod:
        """As `nn.Module.train`, but frozen sub-modules stay in eval mode (Lightning calls this every epoch)."""
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self

    # ----- training -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_loss(self, batch: Batch) -> torch.Tensor:
        """The loss of one training `Batch` (`x, y, index`, and `x_out` for outlier methods); subclasses log any
        extra terms themselves."""
        raise ConfigError(f"method {self.name!r} ({type(self).__module__}.{type(self).__qualname__}) implements no "
                          "training_loss(batch): return the loss of one Batch, or subclass ood.methods.CrossEntropy "
                          "for a method that trains with cross-entropy")

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        # reading the loss on the host syncs with the device: check the losses kept since the last check every
        # `log_every_n_steps` batches and at the end of the epoch, naming the first non-finite one
        self._unchecked_losses.append((self.global_step, self.current_epoch, batch_idx, loss.detach()))
        if (batch_idx + 1) % self.trainer.log_every_n_steps == 0 or self.trainer.is_last_batch:
            unchecked, self._unchecked_losses = self._unchecked_losses, []
            finite = torch.isfinite(torch.stack([item[-1] for item in unchecked])).tolist()
            if not all(finite):
                step, epoch, index, value = unchecked[finite.index(False)]
                raise NonFiniteError(
                    f"{self.name}: training loss is {value.item()} at step {step} (epoch {epoch}, batch {index}); "
                    "lower the learning rate or check the inputs"
                )
        self.log_metrics({"train/loss": loss}, len(batch), prog_bar=True)
        return loss

    def log_metrics(self, values: Mapping[str, torch.Tensor], batch_size: int, prog_bar: bool = False) -> None:
        """Log per-batch values averaged over DDP ranks (`sync_dist`: each rank holds a shard of the global batch,
        so a rank-0 value would describe a fraction of it; a no-op on one device)."""
        self.log_dict(dict(values), batch_size=batch_size, prog_bar=prog_bar, sync_dist=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        logits = self(batch.x)
        n = len(batch)
        self.log_metrics({"val/loss": F.cross_entropy(logits, batch.y)}, n)
        self.log_metrics({"val/acc": (logits.argmax(1) == batch.y).float().mean()}, n, prog_bar=True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser gets: everything not frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_config(optimizer)}

    def lr_scheduler_config(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Lightning's scheduler config for `optimizer`: an `OpenOODCosine` gets the run's scheduler step count and
        is stepped per its `interval`; any other factory gets the optimizer and is stepped per epoch."""
        factory = self.scheduler_factory
        if isinstance(factory, OpenOODCosine):
            return {"scheduler": factory(optimizer, self.scheduler_steps(factory.interval)), "interval": factory.interval}
        return {"scheduler": factory(optimizer)}

    def epoch_scheduler(self, factory: SchedulerFactory, optimizer: torch.optim.Optimizer, key: str, fix: str) -> Any:
        """`factory`'s scheduler of `optimizer` for a method that steps it itself once an epoch (manual
        optimisation); an `OpenOODCosine` (Lightning steps it over the whole run) is refused in one line naming `key`
        and the `fix` (it died in a TypeError for its missing step count)."""
        if isinstance(factory, OpenOODCosine):
            raise ConfigError(f"{key}: {type(self).__name__} steps this scheduler itself once an epoch here, and "
                              f"OpenOOD's per-iteration cosine (OpenOODCosine) is stepped by Lightning over the whole "
                              f"run: {fix}")
        return factory(optimizer)

    def scheduler_steps(self, interval: Interval) -> int:
        """How often Lightning steps a scheduler of `interval` in this fit: its optimiser steps
        (`trainer.estimated_stepping_batches`, which counts `max_steps`, gradient accumulation and DDP's sharding) or
        `trainer.max_epochs`; 1 without a Trainer (a bare `configure_optimizers()` call)."""
        if self._trainer is None:
            return 1
        total = self.trainer.estimated_stepping_batches if interval == "step" else self.trainer.max_epochs
        if total is None or not math.isfinite(total) or total < 0:
            raise ConfigError(f"method.scheduler anneals over the run's {interval}s, which this fit does not bound "
                              f"({total}); set trainer.max_epochs or trainer.max_steps")
        return max(1, int(total))

    # ----- evaluation contract --------------------------------------------------------------------------------
    def linear_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear head (W [C, D], b [C]) whose logits the post-hoc detectors see; default `backbone.fc`."""
        return linear_params(self.backbone.fc)

    def eval_outputs(self, x: torch.Tensor, split: EvalSplit) -> dict[str, torch.Tensor]:
        """Per-sample tensors to cache for one evaluation batch of `split`: `logits`, `features`, `cache_layers`
        (and whatever else a method scores from). A method that reduces instead of storing (class sums, the first
        n samples) updates its `ood.features.reduce` reducers here when `split.role` is the one it needs."""
        out = self.backbone.run(x, self.cache_layers)
        return {"logits": out.logits, "features": out.features, **out.layers}

    def begin_evaluation(self, splits: Sequence[EvalSplit]) -> None:
        """The evaluation splits in test-loader order, given before the pass; subclasses that reset per-evaluation
        state extend it (calling this)."""
        self.eval_splits = list(splits)

    def eval_split(self, dataloader_idx: int) -> EvalSplit:
        """The evaluation split (name, role, group) of test loader `dataloader_idx`."""
        return self.eval_splits[dataloader_idx]

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        outputs = self.eval_outputs(batch.x, self.eval_split(dataloader_idx))
        return {"index": batch.index, "labels": batch.y, **outputs}

    def setup_ood(self, banks: Mapping[str, FeatureBank]) -> None:
        """Post-hoc fitting on cached banks keyed by split name (`train`, `val`, `val_ood`); default: nothing."""

    def ood_score(self, bank: FeatureBank) -> torch.Tensor | None:
        """The method's own ID score for `bank` (higher = more ID), or None when it only uses detectors."""
        return None

    def ood_scores(self, bank: FeatureBank) -> dict[str, torch.Tensor]:
        """Every score the method reports, by detector name: `{name: ood_score(bank)}` by default; a method whose
        score has parts (an energy and a distance term) adds them under their own names."""
        score = self.ood_score(bank)
        return {} if score is None else {self.name: score}

    def tuned(self) -> dict[str, dict[str, Any]]:
        """The hyper-parameters of its own scores that `setup_ood` chose on ID val vs validation OOD, by score name
        (`{name: {param: value}}`): they go into those rows' `detector_params` / `tuned_params`; default: none."""
        return {}

    def predict(self, bank: FeatureBank) -> torch.Tensor:
        """Class predictions used for ID accuracy; argmax of the logits unless a method says otherwise."""
        return bank.predictions

    def fitted(self) -> dict[str, Any]:
        """Values the method fitted (e.g. energy margins), written by the evaluator into every result row as
        `method_params.fitted` (after `setup_ood`); default: none."""
        return {}

    def diagnostics(self) -> dict[str, Any]:
        """Extra statistics of the last evaluation (e.g. cluster separation), logged as `test/<name>/<key>` (the
        floats) and written to `<name>_stats.json` by the callback's sinks; default: none."""
        return {}
