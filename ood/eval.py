"""`ood-eval ckpt_path=PATH` (or `backbone.weights=FILE`): evaluate a checkpoint, or a backbone with pretrained
weights (`ood-eval data=imagenet1k backbone=resnet50 backbone.weights=... method=grood`), with the method's score and
every detector (no training).

`ood-eval ckpt_path=<run>` evaluates the run as it was trained: the overrides of its training command line that say
what it trained (`method=`, `data=`, `backbone=`, `experiment=`, their keys, `paths.data_dir`) and the detectors it
evaluated (`detectors.names`) are added to this command line where it does not name them
(`ood.runs.trained.training_overrides`; a detector of its own that cannot be imported here is one line,
`missing_detectors`), with its
`hydra.searchpath` (`search_path`), and said on stderr; their relative paths are made absolute from the folder the
training started in (`anchored`), which is put on `sys.path` too. The weights are those its training evaluated: its
`checkpoints/best.ckpt` when trained with `evaluation.weights=best_val_acc`, else `last.ckpt`
(`evaluation.weights=last|best_val_acc` picks one; `ood.runs.checkpoints.resolve_ckpt_path`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ood import CONFIG_DIR
from ood.cli import check_argv, expand_home, friendly_errors, require_config_dir
from ood.runs.sweeps import failed_jobs_listed, sweep_jobs_checked
from ood.runs.trained import ADOPTED_ENV, training_overrides
from ood.termination import sigterm_noted
from ood.train import run, run_modules


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
@friendly_errors
def _main(cfg: DictConfig) -> None:
    run_modules()
    run(cfg)


#: the keys of an adopted override whose strings are files or folders (every string of a `data.ood` mapping)
PATH_KEYS = re.compile(r"(data\.(root|train|test|val|outliers|ood)|backbone\.weights|paths\.\w+)(\..+)?")


def started_in(run: Path) -> Path | None:
    """The folder `run`'s training started in (`hydra.runtime.cwd`), or None when it is this one (or not recorded)."""
    hydra_yaml = run / ".hydra" / "hydra.yaml"
    started = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.cwd") if hydra_yaml.is_file() else None
    return None if started is None or Path(started).resolve() == Path.cwd().resolve() else Path(started)


def anchored(overrides: list[str], started: Path) -> list[str]:
    """`overrides` of a run's training command line with each relative path (`PATH_KEYS`) that exists from the folder
    the training `started` in made absolute from there: `ood-eval ckpt_path=<run>` started elsewhere read
    `data.root=data/my_id` from its own folder ("folder not found", or another folder of that name)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    def absolute(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: absolute(v) for k, v in value.items()}
        if isinstance(value, list):
            return [absolute(v) for v in value]
        if isinstance(value, str) and value and "${" not in value and not Path(value).is_absolute() \
                and (started / value).exists():
            return str(started / value)
        return value

    out = []
    for text in overrides:
        override = OverridesParser.create().parse_overrides([text])[0]
        value = None if override.is_sweep_override() else override.value()
        if PATH_KEYS.fullmatch(override.key_or_group) and absolute(value) != value:
            text = f"{text.partition('=')[0]}={_hydra_text(absolute(value))}"
        out.append(text)
    return out


def search_path(run: Path, started: Path | None) -> list[str]:
    """`hydra.searchpath=[...]` of `run`'s training (its own config folders: a `conf/method/<name>.yaml` outside ood,
    `ood-train hydra.searchpath=[file://my_conf] method=<name>`), relative folders made absolute from where it
    `started`; [] when it had none. Hydra keeps it out of `.hydra/overrides.yaml`, so `ood-eval ckpt_path=<run>`
    said "unknown method '<name>'"."""
    hydra_yaml = run / ".hydra" / "hydra.yaml"
    folders = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.searchpath") if hydra_yaml.is_file() else None
    if not folders:
        return []

    def absolute(entry: str) -> str:
        scheme, sep, path = entry.rpartition("://")
        if started is None or scheme not in ("", "file") or Path(path).is_absolute():
            return entry
        return f"{scheme}{sep}{started / path}"

    return [f"hydra.searchpath={_hydra_text([absolute(str(f)) for f in folders])}"]


def missing_detectors(adopted: list[str], run: Path) -> str | None:
    """The one-line error for the detectors of `run`'s `detectors.names` (`adopted`) named by an import path whose
    module cannot be found here, giving the override that leaves them out; None when there are none. Without it the
    run stopped later at "detector 'my_detectors.FeatureNorm' cannot be imported", a name this command line never
    gave."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [o for o in adopted if o.partition("=")[0].lstrip("+") == "detectors.names"]
    override = OverridesParser.create().parse_overrides(given)[0] if given else None
    if override is None or override.is_sweep_override():
        return None
    names = override.value()
    names = [str(n) for n in (names if isinstance(names, list) else [names])]

    def found(path: str) -> bool:
        try:
            return importlib.util.find_spec(path.rpartition(".")[0]) is not None
        except ImportError:  # a parent package missing
            return False

    missing = [n for n in names if "." in n and not found(n)]
    if not missing:
        return None
    kept = shlex.quote(f"detectors.names=[{','.join(n for n in names if n not in missing)}]")
    many = len(missing) > 1
    return (f"{run} was trained with detector{'s' * many} {', '.join(map(repr, missing))} (detectors.names), whose "
            f"module{'s are' if many else ' is'} not on the import path here: put {'their folders' if many else 'its folder'} "
            f"on PYTHONPATH (PYTHONPATH=<folder> ood-eval ...), or leave {'them' if many else 'it'} out: {kept}")


def _hydra_text(value: Any) -> str:
    """`value` (strings, numbers, lists, mappings) as Hydra override grammar, every string quoted."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_hydra_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_hydra_text(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    return "null" if value is None else json.dumps(value)


def main() -> None:
    """`ood-eval` entry point."""
    require_config_dir()
    sys.argv[1:] = expand_home(sys.argv[1:])  # before `ckpt_path=~/...` is read for its run folder
    runs, adopted = training_overrides(sys.argv[1:])
    taken, started = adopted, started_in(runs[0]) if runs else None
    if started is not None:
        # a path made absolute differs from the run's recorded one on purpose: not adopted as is, so not refused
        adopted = anchored(adopted, started)
        sys.path.append(str(started))  # its `backbone.target=my_nets.Net`, imported from where ood-train ran
    missing = missing_detectors(adopted, runs[0]) if runs else None
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        sys.exit(1)
    if runs and not any(arg.lstrip("+").startswith("hydra.searchpath=") for arg in sys.argv[1:]):
        adopted = search_path(runs[0], started) + adopted
    if adopted:  # before the user's first override: Hydra's flags (`-m`, `--cfg job`) must stay ahead of them
        first = next(i for i, arg in enumerate(sys.argv)
                     if i and not arg.startswith("-") and ("=" in arg or arg.startswith("~")))
        sys.argv[first:first] = adopted
        others = len(runs) - 1
        where = f"{runs[0]}" + (f" and {others} other run{'s' * (others > 1)} trained alike" if others else "")
        print(f"ood-eval: as trained in {where}: {' '.join(adopted)}", file=sys.stderr)
    os.environ[ADOPTED_ENV] = json.dumps(taken)  # not the user's asking for a difference (`check_evaluated`)
    try:
        check_argv("eval")
        sweep_jobs_checked("eval")
        with sigterm_noted(), failed_jobs_listed():  # sigterm: from here on, before Hydra makes the run folder
            _main()
    finally:
        os.environ.pop(ADOPTED_ENV, None)


if __name__ == "__main__":
    main()
