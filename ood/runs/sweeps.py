"""The number a Hydra sweeper maximises: a run's validation-OOD AUROC (ID val vs validation OOD; never test OOD),
read back from the `validation.json` its evaluation wrote; the line that ends an Optuna sweep, naming its best job
(`BestTrial`); the lines that end a failed sweep, naming every failed job (`SweepStart`, `failed_jobs_listed`); and
the check of every job's config before a sweep's first job starts (`check_sweep_jobs`)."""

from __future__ import annotations

import copy
import difflib
import importlib
import json
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from ood.errors import ConfigError, OODError
from ood.runs.failures import FAILED_FILE, failure
from ood.utils import get_logger

log = get_logger(__name__)


def sweep_objective(output_dir: str | Path, detector: str | None) -> float | None:
    """The validation-OOD AUROC a sweeper maximises: of `detector`, or the method's own score when it has one,
    else the first detector. None when the run wrote no validation numbers."""
    from ood.evaluation.sinks import VALIDATION_FILE  # here: `BestTrial`'s module is imported as Hydra starts

    path = Path(output_dir) / VALIDATION_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    aurocs: dict[str, float] = data["auroc"]
    if not aurocs:
        return None
    name = objective_name(data, detector)
    if name not in aurocs:
        raise ConfigError(f"objective={name}: not scored in this run; choose one of {sorted(aurocs)}")
    return float(aurocs[name])


def objective_name(validation: dict[str, Any], detector: str | None) -> str:
    """The scorer whose AUROC is the objective, of a run's `validation.json` (`validation`): `detector`, else the
    method's own score when it has one, else the first detector."""
    aurocs = validation["auroc"]
    return detector or (validation["method"] if validation["method"] in aurocs else next(iter(aurocs)))


#: the file the Optuna sweeper writes into its sweep folder: `best_params` and `best_value`
OPTIMIZATION_FILE = "optimization_results.yaml"


class BestTrial(HydraCallback):
    """`hydra.callbacks` of every run: an Optuna sweep (`hydra/sweeper=optuna_val`) ends with the job folder of its
    best trial, which AUROC its value is, in %, and where the test numbers are. Optuna's own last line,
    `Best value: 0.3075925925925926`, named no score and no folder, and was a fraction beside tables in %."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        file = sweep / OPTIMIZATION_FILE
        if not file.is_file():
            return
        import yaml

        from ood.evaluation.sinks import VALIDATION_FILE  # imports torch: not as Hydra starts

        best = yaml.safe_load(file.read_text())
        value, objective = best["best_value"], config.get("objective")
        # in job order: Optuna's best is the first trial to reach the best value (a later tie does not replace it)
        found = sorted(sweep.glob(f"*/{VALIDATION_FILE}"), key=lambda p: _job_order(p.parent.name))
        jobs = [p.parent for p in found if sweep_objective(p.parent, objective) == value]
        params = " ".join(f"{key}={val}" for key, val in best["best_params"].items())
        name = objective_name(json.loads((jobs[0] / VALIDATION_FILE).read_text()), objective) if jobs else (
            objective or "the objective")
        print(f"best trial: {jobs[0] if jobs else 'a job of ' + str(sweep)} ({params}): validation AUROC of {name} "
              f"(ID val vs validation OOD) {100 * value:.2f} %, Optuna's best_value {value} in {file}; test numbers of "
              f"every trial: ood-report {sweep}")


def _job_order(name: str) -> tuple[int, int, str]:
    """A job folder's place in its sweep: by job number (`10` after `2`), as Hydra's default `hydra.sweep.subdir`
    names them; other names after, by name."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


#: the sweep this process launched, (its folder, when), noted by `SweepStart` for `failed_jobs_listed`
_launched: tuple[Path, float] | None = None


class SweepStart(HydraCallback):
    """`hydra.callbacks` of every run: notes the folder and start of the sweep a multirun launches, so that a failed
    sweep can end listing every job that failed (`failed_jobs_listed`); Hydra's own last lines name the first alone,
    and it calls `on_multirun_end` only after a sweep whose jobs all succeeded."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        global _launched
        _launched = (Path(config.hydra.sweep.dir), time.time())


@contextmanager
def failed_jobs_listed() -> Iterator[None]:
    """An entry point's failed sweep ends with a line per job that failed in it (each job folder's `FAILED.txt`
    written since the sweep started: not an earlier attempt's) and the `ood-report` command that shows the others."""
    global _launched
    try:
        yield
    except SystemExit as exit_:
        if exit_.code not in (0, None) and _launched is not None:
            sweep, since = _launched
            jobs = sorted(p.parent for p in sweep.rglob(FAILED_FILE) if p.stat().st_mtime >= since - 1)
            if jobs:
                print(f"{len(jobs)} job{'s' if len(jobs) > 1 else ''} of the sweep failed:", file=sys.stderr)
                for job in jobs:
                    print(f"  {job}: {failure(job)}", file=sys.stderr)
                print(f"the sweep's report (its failed jobs listed under the table): ood-report {sweep}", file=sys.stderr)
        raise
    finally:
        _launched = None  # a later command of this process (a script calling main() again) is not this sweep


def check_objective(objective: str | None, method: str, detectors: Iterable[str]) -> None:
    """Refuse, before training, an `objective=` that is neither a detector of the run nor a score of `method` (its
    name, or a part's name it starts: `energy_cfl_recon_dist`): `sweep_objective` refused it only after the run."""
    names = set(detectors)
    if objective is None or objective in names or objective.startswith(method):
        return
    raise ConfigError(f"objective={objective}: not scored in this run; choose one of the detectors {sorted(names)} "
                      f"or the method's own score ({method}, where it has one)")


#: flags whose command runs no job (help, the config printed, shell completion, a pickled rerun), and those naming
#: another primary config (whose keys Hydra checks as it composes)
_NO_JOB_FLAGS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion",
                 "--experimental-rerun", "-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")


class _NotBuilt(Exception):
    """What a pre-sweep check reaches when a constructor first uses the network it was not given (`_Unbuilt`)."""


class _Unbuilt:
    """The backbone a method is built with before a sweep: its constructor checks its own values, and its first use
    of the network ends the check there (`_NotBuilt`), the rest left to the job, which builds the network."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # what Hydra and OmegaConf ask of any object (`__attrs_attrs__`): not the network
            raise AttributeError(name)
        raise _NotBuilt(name)


def check_sweep_jobs(config_dir: str | Path, config_name: str, argv: Sequence[str]) -> None:
    """Refuse a multirun (`-m`) of Hydra's basic sweeper before its first job starts when one job's composed config
    fails a check that needs no data, network or GPU (`check_job`): each job checked its ranges only as it started,
    so `method.optimizer.lr=0.1,-1` failed its second job after the first had trained. Raises `ConfigError` naming
    the job's number (its folder under the sweep's) and overrides (as shell words: `'key='"'"'a,b'"'"''`). A sweeper
    that draws its values as it goes (`hydra/sweeper=optuna_val`) is not checked: they are not known before.

    Each job's config is the composition of its config-group options (once per combination, ~50 ms) with its other
    overrides applied, as Hydra's `compose` applies them (a millisecond)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from ood.runs.checks import override_words

    if not any(a in ("-m", "--multirun") for a in argv) or any(a.split("=")[0] in _NO_JOB_FLAGS for a in argv):
        return
    args, parser = override_words(argv), OverridesParser.create()
    parsed = parser.parse_overrides(args)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            try:
                base = compose(config_name, [a for a, o in zip(args, parsed, strict=True) if not o.is_sweep_override()],
                               return_hydra_config=True)
                if base.hydra.sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
                    return
                params = [f"{k}={v}" for k, v in (base.hydra.sweeper.get("params") or {}).items()]
                jobs = BasicSweeper.split_arguments(parser.parse_overrides([*params, *args]), None)[0]
            except HydraException:
                return  # Hydra reports what it cannot compose or expand
            groups = set(base.hydra.runtime.choices)
            elsewhere: dict[str, str] = {}  # modules the jobs name that do not import here -> why
            composed: dict[tuple[str, ...], tuple[DictConfig, DictConfig]] = {}  # options -> (config, its hydra node)
            for number, job in enumerate(jobs):
                overrides = parser.parse_overrides(job)
                # composed with the options: Hydra's own keys too (`hydra.searchpath` finds a preset of the user's)
                grouped = [o.key_or_group in groups or "/" in o.key_or_group or o.key_or_group.startswith("hydra.")
                           for o in overrides]
                chosen = tuple(o.input_line for o, g in zip(overrides, grouped, strict=True) if g)
                try:
                    if chosen not in composed:
                        whole = compose(config_name, list(chosen), return_hydra_config=True)
                        HydraConfig.instance().set_config(whole)  # its `${hydra:runtime.choices.data}`
                        # copied per job without its hydra node (a tenth of the copy's time): Hydra's own keys
                        composed[chosen] = (OmegaConf.masked_copy(whole, [k for k in whole if k != "hydra"]),
                                            HydraConfig.instance().cfg)
                    rest, HydraConfig.instance().cfg = composed[chosen]
                    cfg = copy.deepcopy(rest)
                    ConfigLoaderImpl._apply_overrides_to_config([o for o, g in zip(overrides, grouped, strict=True)
                                                                 if not g], cfg)
                except HydraException:
                    return  # a job Hydra cannot compose: it says so as it launches the sweep
                try:
                    elsewhere |= check_job(cfg)
                except OODError as err:
                    shown = shlex.join(o for o in job if not o.lstrip("+~").startswith(("hydra.", "hydra/")))
                    raise ConfigError(f"job {number} of the sweep ({shown}): {err}; no job was started") from None
            for module, why in elsewhere.items():
                log.warning("the sweep's jobs name %s, which cannot be imported here (%s): each job checks it as it "
                            "starts (a module on the PYTHONPATH of the node that runs it)", module, why)
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]
        GlobalHydra.instance().clear()


def check_job(cfg: DictConfig) -> dict[str, str]:
    """The checks of one run's composed config that read no data, build no network and look for no GPU: epochs,
    seed, weights (`check_values`), loader counts and `data.fit_fraction`, detector names and parameters, the
    objective, the method's class (`_method_class`) and its own values (its constructor, given an `_Unbuilt`
    network). A check that fails otherwise (an interpolation only the job resolves, a constructor reaching the
    network) leaves the rest to the job, as does a module of the user's that the method `_target_` or a detector's
    import path names and that does not import here (a module on the PYTHONPATH a cluster launcher's `setup` sets on
    the node): returned, module -> why, for the sweep's one warning (refused, it stopped a sweep that would have
    run)."""
    from ood.data.benchmark import LOADER_COUNTS, check_loader_options
    from ood.runs.checks import check_values
    from ood.utils import instantiate

    try:
        check_values(cfg)
        data = cfg.get("data") or {}
        check_loader_options({k: data[k] for k in [*LOADER_COUNTS, "fit_fraction"] if k in data})
        node = _detached(cfg, "evaluation.evaluator")
        names = node.get("detectors")
        paths = [n for n in [*([names] if isinstance(names, str) else names or []), *(node.get("exclude") or []),
                             *(node.get("params") or {})] if isinstance(n, str) and "." in n]
        elsewhere = _unimportable([*paths, str(cfg.method.get("_target_", ""))])
        if elsewhere:
            return elsewhere
        evaluator = instantiate(node)
        method = getattr(_method_class(str(cfg.method._target_)), "name", None)
        if isinstance(method, str):
            evaluator.check_own_names(method, [method])
            if cfg.get("evaluate", True):
                check_objective(cfg.get("objective"), method, [d.name for d in evaluator.detectors])
        instantiate(_detached(cfg, "method"), backbone=_Unbuilt())
    except OODError:
        raise
    except Exception:  # noqa: BLE001 - `_NotBuilt`, or what only the job can resolve: the job checks the rest
        pass
    return {}


def _unimportable(paths: Iterable[str]) -> dict[str, str]:
    """Of import paths (`module.Class`, or Hydra's nested `pkg.mod.Class.factory`), the modules that do not import
    here -> the import error: a module missing here, or one importing what is missing here. A module of ood's own is
    left out: its misspelt path is refused by the check it fails, as a wrong name in a module that imports is."""
    out: dict[str, str] = {}
    for path in paths:
        if "." not in path:
            continue
        try:
            _located(path)
        except _NotImported as err:
            if (err.cause.name or err.module).split(".")[0] != "ood":
                out.setdefault(err.module, str(err.cause))
        except _NotFound:
            pass
    return out


class _NotImported(Exception):
    """`module` of an import path does not import: `cause`, its ImportError."""

    def __init__(self, module: str, cause: ImportError) -> None:
        super().__init__(module, cause)
        self.module, self.cause = module, cause


class _NotFound(Exception):
    """`owner` (an imported module or an attribute of one, at path `where`) holds nothing named `name`."""

    def __init__(self, owner: Any, where: str, name: str) -> None:
        super().__init__(where, name)
        self.owner, self.where, self.name = owner, where, name


def _located(path: str) -> Any:
    """The object at import path `path`, found as Hydra's `_target_` is (`hydra._internal.utils._locate`, private):
    its first part imported, then each next part an attribute, else a submodule of a package. Raises `_NotImported`
    for a module that does not import: named as the path less its last part where the path's first part is missing
    (a `module.Class` the node imports), else the module whose import failed; `_NotFound` for a part the (imported)
    owner lacks, which is its last part or an owner that is no package."""
    parts = path.split(".")
    obj: Any = None
    for i, part in enumerate(parts):
        name = ".".join(parts[:i + 1])
        if i and hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        if i and not hasattr(obj, "__path__"):  # a class, or a module that is no package: no submodule either
            raise _NotFound(obj, ".".join(parts[:i]), part)
        try:
            obj = importlib.import_module(name)
        except ImportError as err:
            if i and err.name == name and i == len(parts) - 1:  # the last part, in a package that imports
                raise _NotFound(obj, ".".join(parts[:i]), part) from None
            raise _NotImported(path.rpartition(".")[0] if err.name == parts[0] else name, err) from None
    return obj


def _method_class(target: str) -> Any:
    """The class (or factory) the method `_target_` names, imported as Hydra does (`_located`): one line for a module
    that imports but holds no such name (its methods, closest first), and for a module of ood's own that does not
    exist (`_unimportable` left a user's module that does not import here to the jobs). Hydra's `get_class` failed
    both silently here: each job failed at its start."""
    from ood.methods import OODMethod

    try:
        return _located(target)
    except _NotImported as err:
        raise ConfigError(f"method._target_={target!r} cannot be imported: {err.cause}") from None
    except _NotFound as err:
        hint = ""
        if isinstance(err.owner, ModuleType):
            methods = [k for k, v in vars(err.owner).items() if isinstance(v, type) and issubclass(v, OODMethod)
                       and v is not OODMethod and not k.startswith("_")]
            close = difflib.get_close_matches(err.name, methods, n=5, cutoff=0)
            hint = f"; its methods, closest first: {', '.join(close)}" if close else "; it holds no OODMethod subclass"
        raise ConfigError(f"method._target_={target!r}: {err.where} holds nothing named {err.name!r}{hint}") from None


def _detached(cfg: DictConfig, key: str) -> DictConfig:
    """`cfg`'s node at `key`, resolved, under the same key in a config of its own: Hydra's `instantiate` copies the
    node with its parents, the whole config (20 ms a node, the most of a job's check)."""
    out = OmegaConf.create()
    OmegaConf.update(out, key, OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True, throw_on_missing=True))
    return OmegaConf.select(out, key)


def sweep_jobs_checked(config_name: str) -> None:
    """`check_sweep_jobs` on the entry point's command line: its refusal is one line and exit status 1."""
    from ood import CONFIG_DIR

    try:
        check_sweep_jobs(CONFIG_DIR, config_name, sys.argv[1:])
    except OODError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
