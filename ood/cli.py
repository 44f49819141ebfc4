"""What the command-line entry points (`ood-train`, `ood-eval`, `ood-heatmap`) share: the checks before Hydra
starts, one-line errors for user mistakes, a quiet console, and loading a method's weights from any checkpoint.

A user mistake prints one line (`error: ...`) and exits with code 1: an `OODError` (unknown names, missing data,
NaN scores), an override whose value does not fit its key (`seed=abc`), or an OmegaConf error in the composed
config (a missing mandatory value, an interpolation that does not resolve). Anything else is a bug: its traceback
is shown.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException, InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, ValidationError

from ood import CONFIG_DIR
from ood.errors import ConfigError, OODError, working_directory_hint
from ood.runs.checks import check_eval_dir, check_overrides
from ood.utils import progress_bars, warnings_in_log_files

# torch, Lightning and what imports them (`ood.runs.console`, ...) are imported in the functions that use them: the
# entry points import this module at start-up, before Hydra composes a job (`--help`, config errors, a sweep's launcher)

#: OmegaConf errors that mean the composed config is wrong (not the code reading it)
CONFIG_ERRORS = (ValidationError, InterpolationResolutionError, MissingMandatoryValue)
#: the Hydra plugins of the `sweep` extra, by the config of theirs that ood's presets build on (`defaults:` of
#: `hydra/launcher=slurm`, `slurm_local`, `parallel`, `hydra/sweeper=optuna_val`) or that a user names directly
SWEEP_PLUGINS = {"submitit_slurm": "hydra_submitit_launcher", "submitit_local": "hydra_submitit_launcher",
                 "joblib": "hydra_joblib_launcher", "optuna": "hydra_optuna_sweeper"}
#: torch's refusal, under `torch.use_deterministic_algorithms(True)` (Lightning's `deterministic=True`), of an operation
#: without a deterministic kernel, e.g. `adaptive_avg_pool2d_backward_cuda` (pooling to more than 1 x 1, on a GPU)
NONDETERMINISTIC = r"(\w+) does not have a deterministic implementation, but you set 'torch.use_deterministic_algorithms"


def require_config_dir() -> None:
    """The configs are package data (`ood/conf/`): an install without them gets this line, not Hydra's generic error."""
    if not CONFIG_DIR.is_dir():
        print(
            f"error: config folder {CONFIG_DIR} not found: this install of ood lacks its package data; reinstall "
            "it (`pip install --force-reinstall <ood checkout or wheel>`, or `pip install -e .` in a checkout)",
            file=sys.stderr,
        )
        sys.exit(1)


def check_argv(config_name: str) -> None:
    """Refuse a misspelt override key (naming the closest real key), a value of the wrong type, an override the shell
    cut at a space, a launcher or sweeper whose plugin is not installed (`check_sweep_plugins`), and an evaluation
    into a training run's folder, before Hydra composes the config (and writes into its output folder); put `~` paths
    in full (`expand_home`) and `+` before a new key under an empty mapping (`check_overrides`) in `sys.argv`."""
    try:
        check_quoting(sys.argv[1:])
        check_sweep_plugins(sys.argv[1:])
        sys.argv[1:] = check_overrides(CONFIG_DIR, config_name, expand_home(sys.argv[1:]))
        if config_name == "eval":
            check_eval_dir(sys.argv[1:])
    except OODError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def check_sweep_plugins(argv: list[str]) -> None:
    """Refuse a launcher or sweeper whose Hydra plugin (`SWEEP_PLUGINS`) is not installed, saying to install the
    `sweep` extra: Hydra said only "In 'hydra/launcher/slurm': Could not load 'hydra/launcher/submitit_slurm'"."""
    for arg in argv:
        group, eq, name = arg.lstrip("+").partition("=")
        if not eq or group not in ("hydra/launcher", "hydra/sweeper"):
            continue
        preset = CONFIG_DIR / group / f"{name}.yaml"
        defaults = OmegaConf.load(preset).get("defaults") if preset.is_file() else None
        bases = [name, *(defaults or [])]
        for plugin in {SWEEP_PLUGINS[base] for base in bases if isinstance(base, str) and base in SWEEP_PLUGINS}:
            if importlib.util.find_spec(f"hydra_plugins.{plugin}") is None:
                raise ConfigError(f"{arg} needs Hydra's {plugin.replace('_', '-')} plugin, which is not installed: "
                                  "pip install 'ood[sweep]'")


#: a `~` that opens a path in an override's value (`backbone.weights=~/w.pth`, `'{a: ~/x}'`, quoted or not)
HOME_PATH = re.compile(r"""(?<=[=\[{:,\s'"])~(?=[/'",\]}\s]|$)""")


def expand_home(argv: list[str]) -> list[str]:
    """`argv` with `~` at the start of a path in an override's value replaced by the home folder, as the shell would
    have done: its tilde expansion skips `key=~/path` words, and Hydra's grammar refuses a `~` in a value (an
    unquoted one stopped with "LexerNoViableAltException"; a quoted one reached the code as a folder named `~`)."""
    home = str(Path.home())
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        expandable = eq and not arg.startswith("-") and "${" not in value
        out.append(key + eq + HOME_PATH.sub(lambda _: home, "=" + value)[1:] if expandable else arg)
    return out


def check_quoting(argv: list[str]) -> None:
    """Refuse an override the shell split at a space (`+data.ood.near={a: /x}` unquoted arrives as `+data.ood.near={a:`
    and `/x}`; Hydra said "no viable alternative at input '{a:'"), naming the quoted override to type instead."""
    for i, arg in enumerate(argv[:-1]):
        if not arg.startswith("-") and "=" in arg and _open_brackets(arg) > 0:
            rest = argv[i + 1:]
            end = next((j for j in range(1, len(rest) + 1) if _open_brackets(" ".join([arg, *rest[:j]])) <= 0), 1)
            whole = " ".join([arg, *rest[:end]])
            raise ConfigError(f"override {arg!r} ends inside its {{...}} or [...]: the shell split it at a space; "
                              f"quote the whole override: '{whole}'")


def _open_brackets(text: str) -> int:
    """How many `{` / `[` of `text` are left open (outside quotes)."""
    depth, quote = 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        else:
            depth += (char in "{[") - (char in "}]")
    return depth


class SweepJobError(CompactHydraException):
    """A sweep job's user error: Hydra marks the job failed, runs the others and ends the sweep with this one line
    (a `CompactHydraException` is printed without the traceback Hydra shows for any other exception)."""


def friendly_errors(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Run a Hydra task with a quiet console (`ood.runs.console`; ood's own progress bars follow
    `trainer.enable_progress_bar`, as Lightning's do) and turn user mistakes (`user_error`) into a one-line message
    and exit code 1."""

    @wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        from ood.runs.console import logs_above_bars, quiet_lightning

        quiet_lightning()
        try:
            with logs_above_bars(), warnings_in_log_files(), \
                    progress_bars(bool(OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True))):
                return task(cfg)
        except Exception as err:
            user = user_error(err)
            if user is None:
                raise
            print(f"error: {user}", file=sys.stderr)
            if in_multirun():
                raise SweepJobError(str(user)) from None  # Hydra marks this job failed and runs the others
            sys.exit(1)

    return wrapper


def user_error(err: BaseException) -> OODError | None:
    """The user's mistake behind `err`: itself when it is an `OODError`; a `ConfigError` for an OmegaConf error in the
    composed config (`CONFIG_ERRORS`, first line of its message and the key); the `OODError` raised in another
    process, whose traceback text (last line `<module>.<Class>: <message>`) comes back as the message: a spawned
    DDP rank (`trainer=ddp_cpu`, torch's `ProcessRaisedException`) or a DataLoader worker (`data.num_workers>0`:
    torch re-raises the worker's `OODError` with "Caught ... Original Traceback ..." as its text); a `ConfigError`
    for a `_target_` Hydra cannot import (`not_importable`), and for torch's refusal of an operation without a
    deterministic kernel (`NONDETERMINISTIC`), here or in a rank; None for anything else (a bug: its traceback is
    shown)."""
    from torch.multiprocessing import ProcessRaisedException

    if isinstance(err, OODError):
        return raised_elsewhere(str(err)) or err
    if isinstance(err, CONFIG_ERRORS):
        key = getattr(err, "full_key", None)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return ConfigError(f"config {key}: {first}" if key else f"config: {first}")
    if isinstance(err, RuntimeError | ProcessRaisedException) and (op := re.search(NONDETERMINISTIC, str(err))):
        return ConfigError(
            f"{op[1]} has no deterministic implementation and trainer.deterministic=true asks for one (trainer=cpu "
            "sets it; on a GPU, every ResNet's average pooling gradient): use trainer.deterministic=warn "
            "(deterministic where torch can be) or trainer.deterministic=false"
        )
    if isinstance(err, ProcessRaisedException):
        return raised_elsewhere(str(err))
    if isinstance(err, InstantiationException) and (target := re.match(r"Error locating target '([\w.]+)'", str(err))):
        return not_importable(target[1], err)
    return number_as_path(err, _job_overrides())


#: Python's refusal of a number where a path belongs (`Path(2024)`, `open(2024)`): 3.11's words, then 3.12's pathlib's
NOT_A_PATH = re.compile(r"expected str, bytes or os\.PathLike object, not (int|float)"
                        r"|argument should be a str or an os\.PathLike object where __fspath__ returns a str, not '(int|float)'")


def number_as_path(err: BaseException, overrides: Sequence[str]) -> ConfigError | None:
    """A file or folder named by digits on the command line (`data.root=2024`, `ckpt_path=2024`): Hydra reads a bare
    number as a number, and the run ended in Python's `TypeError` (in Hydra's five-line instantiation error). One line
    naming the override and its quoted form; the overrides of that type whose value the failing frame held; None when
    `err` is not that refusal or no override gave the number refused (a frame holding none, a DataLoader worker's
    error re-raised as text: any number of the command line was claimed, and a dataset's bug lost its traceback)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    refusal = next((e for e in _chain(err) if isinstance(e, TypeError) and NOT_A_PATH.search(str(e))), None)
    if refusal is None:
        return None
    kind = next(g for g in NOT_A_PATH.search(str(refusal)).groups() if g)
    held = _numbers_in_failing_frame(refusal)
    given: list[list[str]] = []
    for text in overrides:
        try:
            (override,) = OverridesParser.create().parse_overrides([text])
        except Exception:  # noqa: BLE001 - Hydra took it already; a form it parses differently is not claimed here
            continue
        value = None if override.is_sweep_override() or override.is_delete() else override.value()
        if type(value).__name__ == kind and value in held:
            given.append(text.split("=", 1))  # as typed: `+key` keeps its `+`
    if not given:
        return None
    quoted = " or ".join(f"\"{key}='{raw}'\"" for key, raw in given)
    if len(given) == 1:
        key, raw = given[0]
        return ConfigError(f"{key}={raw}: Hydra reads a bare number as a number, and a file or folder name is expected "
                           f"here; quote it: {quoted}")
    return ConfigError(f"{' or '.join(f'{k}={r}' for k, r in given)}: Hydra reads a bare number as a number, and a file "
                       f"or folder name is expected in one of them; quote that one: {quoted}")


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised from or during (`__cause__`, `__context__`), nearest first."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _numbers_in_failing_frame(err: BaseException) -> list[int | float]:
    """The numbers (not booleans) of the innermost Python frame where `err` was raised, and in its tuples and lists
    (pathlib's `args`): the value a path call refused."""
    tb = err.__traceback__
    if tb is None:
        return []
    while tb.tb_next is not None:
        tb = tb.tb_next
    values = list(tb.tb_frame.f_locals.values())
    values += [v for seq in values if isinstance(seq, tuple | list) for v in seq]
    return [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]


def _job_overrides() -> list[str]:
    """This Hydra job's command-line overrides (a sweep job's own values), or none outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def not_importable(target: str, err: InstantiationException) -> ConfigError:
    """Hydra's "Error locating target" (and three more lines) for a `_target_` that cannot be imported, as one line
    naming the config key, the import error and, for a module in the working directory that an entry point's
    `sys.path` lacks (it starts at its bin/ folder), `PYTHONPATH=.`."""
    key = re.search(r"full_key: ([\w.]+)", str(err))
    cause = err.__cause__.__cause__ or err.__cause__ if err.__cause__ is not None else err
    hint = working_directory_hint(target, cause)
    where = f"{key[1]}._target_" if key else "_target_"
    return ConfigError(f"{where}={target!r} cannot be imported: {cause}{hint}")


def raised_elsewhere(text: str) -> OODError | None:
    """The `OODError` whose traceback `text` is (its last line `<module>.<Class>: <message>`), or None when `text`
    is a plain one-line message."""
    lines = text.strip().splitlines()
    match = re.fullmatch(r"(?:[\w.]+\.)?(\w+): (.*)", lines[-1]) if len(lines) > 1 else None
    cls = next((c for c in _subclasses(OODError) if c.__name__ == match[1]), None) if match else None
    return cls(match[2]) if cls is not None else None


def _subclasses(cls: type) -> list[type]:
    """`cls` and every class derived from it (those defined in modules imported so far)."""
    return [cls, *(d for sub in cls.__subclasses__() for d in _subclasses(sub))]


def in_multirun() -> bool:
    """Whether this job is one of a Hydra multirun (`-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def load_weights(method: Any, path: str | Path, cfg: DictConfig | None = None) -> None:
    """Load a whole method from any checkpoint `ood.models.checkpoint` reads (Lightning, bare, OpenOOD, torchvision),
    strictly; every failure names the file and the first mismatched key, and the `method.*` values it was trained
    with where the run's `cfg` differs (`method=cluster` without the run's `method.objective=supcon` lacks its head).
    A network's own file (`NETWORK_FORMATS`: energy_ood's released WRN under `method=energy_oe`) fills the backbone
    alone, unless the method's score reads parts only its training gives (`trained_parts`: refused as a mismatch)."""
    from ood.errors import CheckpointError
    from ood.models.checkpoint import NETWORK_FORMATS, load_modules, network_hint, read_checkpoint
    from ood.runs.checks import method_changes
    from ood.runs.trained import checkpoint_config

    try:
        state, kind = read_checkpoint(path)
        network_only = kind in NETWORK_FORMATS and not getattr(method, "trained_parts", ())
        load_modules(method, state, {"backbone": "backbone"} if network_only else None, path,
                     network_hint(kind, state))
    except CheckpointError as err:
        changes = method_changes(cfg, checkpoint_config(path)) if cfg is not None else ""
        if not changes:
            raise
        raise CheckpointError(f"{err}; it was trained with {changes}") from None
