"""Reading run folders for `ood-report`: every `results.jsonl` below the given paths, each row tagged with its run's
identity (`identity.json`, `ood.runs.identity`), re-evaluations of one checkpoint counted once, and the jobs of a
sweep that left no results."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ood.errors import OODError
from ood.report.aggregation import config_params, trained_here
from ood.runs.failures import FAILED_FILE, RESUMED_FILE, failure, resumed_from, resumed_in
from ood.runs.identity import GENERIC_BACKBONES, backbone_label, read_identity

#: the keys every result row needs for the table: its grouping, OOD set and shown metrics
ROW_KEYS = ("method", "detector", "backbone", "id_dataset", "ood_dataset", "ood_group", "auroc", "fpr95")


def _labelled(row: dict[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """`row` with a generic backbone group's label of a run written before rows named the network (`timm`), so its
    seeds group with later runs' `timm/resnet50`."""
    node = {k[len("backbone."):]: v for k, v in config.items() if k.startswith("backbone.")}
    if row.get("backbone") in GENERIC_BACKBONES and row["backbone"] == node.get("library"):
        return {**row, "backbone": backbone_label(row["backbone"], node)}
    return row


#: why a job folder without results is listed when a later run resumed its checkpoint in another folder
RESUMED_IN = "stopped; resumed in"
#: why a job a sweep's `multirun.yaml` lists is named when it has no folder
NOT_STARTED = "not started"
#: the file Hydra's basic sweeper writes into its sweep folder: the sweep's settings and command-line overrides
MULTIRUN_FILE = "multirun.yaml"
#: what the report looks for below its paths: result files, job folders (`.hydra/`, `FAILED.txt`), resume records,
#: sweep records
LOOKED_FOR = ("results.jsonl", ".hydra", FAILED_FILE, RESUMED_FILE, MULTIRUN_FILE)


def found_below(paths: Iterable[str | Path]) -> dict[str, list[Path]]:
    """Every file or folder named as in `LOOKED_FOR` below `paths` (a folder walked once, symlinked folders not
    entered, as `Path.rglob`; a file path stands for itself as a results file), sorted: one walk for every kind,
    where a sweep of thousands of run folders on a network disk made each extra walk seconds."""
    out: dict[str, list[Path]] = {name: [] for name in LOOKED_FOR}
    for path in map(Path, paths):
        if path.is_file():
            out["results.jsonl"].append(path)
            continue
        for folder, dirs, files in os.walk(path):
            for name in set(LOOKED_FOR).intersection(dirs + files):
                out[name].append(Path(folder) / name)
    return {name: sorted(found) for name, found in out.items()}


def parse_rows(file: Path, keys: Sequence[str] = ROW_KEYS) -> list[dict[str, Any]]:
    """The rows of one `results.jsonl` (or, with the `keys` its rows need, another JSON-lines file of a run:
    `Results.from_dir` reads `sensitivity.jsonl` too); a line that is not such a row (cut short, edited by hand) is a
    one-line error naming the file and line, rather than a traceback or a KeyError deep in the aggregation; of a file
    given by name that is no `.jsonl` (a sweep's `multirun.yaml`), it also says what `ood-report` takes."""
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            takes = "" if file.suffix == ".jsonl" else ": ood-report takes run or sweep folders or a results.jsonl"
            raise OODError(f"{file}:{number}: not a JSON line ({err.msg}){takes}") from None
        missing = [k for k in keys if k not in row] if isinstance(row, dict) else list(keys)
        if missing:
            raise OODError(f"{file}:{number}: not a result row, it lacks {missing}")
        rows.append(row)
    return rows


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def unreadable(file: Path) -> str | None:
    """Why the `results.jsonl` `file` gives its run no rows although it is there, None when it does not: empty (a run
    that scored nothing, or a file whose data a power loss lost), or cut short (a last line without its newline that
    is not complete JSON, or zero bytes in it: a crash while it was written, or a copy cut off). A complete last line
    without the newline the writer ends it with is read: a file edited by hand and saved without one."""
    text = file.read_text(errors="replace")
    if not text.strip():
        return f"{file} is empty (a run that scored nothing, or a file lost in a crash: rerun its evaluation)"
    if "\0" in text or not text.endswith("\n") and not _is_json(text.splitlines()[-1]):
        return f"{file} is cut short (its last line is unfinished: a crash while it was written?); rerun its evaluation"
    return None


def load_rows(
    paths: Iterable[str | Path], dropped: dict[tuple[str, str], set[str]] | None = None
) -> list[dict[str, Any]]:
    """All result rows under `paths` (files or folders searched recursively), each tagged with its run folder
    (`_run`), its configuration without the seed (`_config`), its model (`_model`) and the config keys that follow
    the seed (`_seeded`). Rows of a model already seen with the same method, detector settings and OOD set (a
    re-evaluation of one checkpoint in the same configuration) are dropped, training runs first, so each model counts
    once per configuration; a re-evaluation in another configuration (e.g. `data.fit_fraction`, or a detector tuned
    over the user's list: `config_params`) is its own entry. A run that resumed (`resumed.json`) a run whose results
    are read too scores that run's model: a run has results only once its training is done, so the resumed one
    trained nothing more and evaluated the same network again
    (a run stopped by SIGTERM after writing its results, then resumed with `ckpt_path=last` into a new folder).
    `dropped`, when given, gets (run, run kept instead) -> the detectors whose rows were dropped."""
    paths = list(paths)
    for path in map(Path, paths):
        if not path.exists():
            raise OODError(f"no such file or folder: {path}")
    found = found_below(paths)
    files = found["results.jsonl"]
    readable = [file for file in files if not unreadable(file)]  # the others are named by `failed_runs`
    evaluated = {file.parent.resolve() for file in readable}
    origin = {run: stopped for run, stopped in resumed_from(found[RESUMED_FILE]).items() if stopped.resolve() in evaluated}
    rows = []
    for file in readable:
        ident = read_identity(file.parent)
        stopped = origin.get(file.parent.resolve())
        model = read_identity(stopped).model if stopped is not None else ident.model
        tags = {"_run": str(file.parent), "_config": ident.config, "_model": model, "_seeded": ident.seeded}
        rows += [{**_labelled(row, ident.config), **tags} for row in parse_rows(file)]
    if not rows:  # an empty file: a run that scored nothing (detectors=none and a method without a score)
        runs = files or found[".hydra"] or found[FAILED_FILE]  # none: a typo'd path, an empty folder; say what it takes
        takes = "" if runs else (": a sweep that has started no job yet (its multirun.yaml alone)" if found[MULTIRUN_FILE]
                                 else ": ood-report takes the folders ood-train and ood-eval write, a run's "
                                 "(logs/train/runs/<run>) or a sweep's (logs/train/multiruns/<sweep>), or folders holding them")
        what = f"only {len(files)} results.jsonl without rows" if files else "no results.jsonl"
        raise OODError(f"{what} found under {', '.join(map(str, paths))}{takes}")
    seen: dict[tuple[str, ...], str] = {}
    kept = []
    for row in sorted(rows, key=lambda r: ("ckpt" in r["_config"], not trained_here(r), r["_run"])):
        params = json.dumps(config_params(row), sort_keys=True)
        key = (row["_model"], json.dumps(row["_config"], sort_keys=True), str(row["method"]), str(row["detector"]),
               params, str(row["ood_dataset"]), str(row.get("mode", "standard")))
        if seen.setdefault(key, row["_run"]) == row["_run"]:
            kept.append(row)
        elif dropped is not None:
            dropped.setdefault((row["_run"], seen[key]), set()).add(str(row["detector"]))
    return kept


def failed_runs(paths: Iterable[str | Path]) -> dict[str, str]:
    """Job folders (holding `.hydra/`, or `FAILED.txt`: an `ood.evaluate` run folder has no `.hydra/`) under `paths`
    without `results.jsonl`: folder -> why (the error a failed run left in `FAILED.txt`; for a run of
    `evaluate=false`, which writes none, how to evaluate it; for a run whose checkpoint a later run resumed in another
    folder (its `resumed.json`, under `paths` too), that folder; else "no results: still running or killed"); the
    run folders whose `results.jsonl` is empty or cut short (`unreadable`: which file, and why; after the error of
    the failed attempt that left it, if any); and the jobs of a sweep (`multirun.yaml`) that have no folder
    (`unstarted_jobs`)."""
    out = {}
    found = found_below(paths)
    resumed = resumed_in(found[RESUMED_FILE])
    for run in sorted({p.parent for p in (*found[".hydra"], *found[FAILED_FILE])}):
        if run.resolve() in resumed and not (run / "results.jsonl").is_file():
            out[str(run)] = f"{RESUMED_IN} {resumed[run.resolve()]}"
        elif not (run / "results.jsonl").is_file():
            out[str(run)] = failure(run) or (
                f"no results: trained with evaluate=false (evaluate it: ood-eval ckpt_path={run}), or still running"
                if _unevaluated(run) else "no results: still running or killed")
    for file in found["results.jsonl"]:
        why = unreadable(file)
        if why:  # a failed attempt's error too, when it left one
            failed = failure(file.parent)
            out[str(file.parent)] = f"{failed}; no results: {why}" if failed else f"no results: {why}"
    for record in found[MULTIRUN_FILE]:
        out.update(unstarted_jobs(record))
    return dict(sorted(out.items()))


def sweep_jobs(hydra: dict[str, Any]) -> list[list[str]]:
    """The overrides of each job, in Hydra's job order, of a basic sweeper's sweep (`hydra`: the `hydra` node of its
    `multirun.yaml`, with the sweep's `hydra.sweeper.params` and command-line overrides), as Hydra hands them to the
    job (`seed=0`, `key='a,b'`, `key=$\\{seed\\}`); empty for another sweeper (Optuna's jobs are drawn as it runs) or a
    sweep Hydra cannot expand without its config (`glob(...)`)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    sweeper = hydra.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        return []
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides([*params, *hydra["overrides"]["task"]])
        batches = BasicSweeper.split_arguments(overrides, None)
    except (HydraException, KeyError, TypeError):
        return []
    return [job for batch in batches for job in batch]


def unstarted_jobs(record: Path) -> dict[str, str]:
    """The jobs of the sweep whose `multirun.yaml` is `record` that have no folder (`<sweep>/<job number>`, Hydra's
    default `hydra.sweep.subdir`) -> why, ending with the command that runs the job alone in its folder, each
    override one shell word that Hydra reads back as the job's own (`'key='"'"'a,b'"'"''`; printed bare, the shell
    took the quotes of `key='a,b'` and Hydra read a sweep). A sweep stopped in one of its jobs (SIGTERM, Ctrl-C)
    never started the jobs after it, and a report that named only the stopped one read as complete for them. The
    whole sweep goes on with its command plus `ckpt_path=last` (its stopped job resumes); an evaluation's
    (`train: false`: `ood-eval`) without it: it would replace the checkpoint the command names by the newest
    training run."""
    import shlex

    import yaml

    from ood.runs.checks import _override  # `key=value` as one shell word Hydra reads back

    config = yaml.safe_load(record.read_text()) or {}
    hydra = config.get("hydra") or {}
    if (hydra.get("sweep") or {}).get("subdir") != "${hydra.job.num}":
        return {}
    sweep = record.parent
    command, train = _composing_words(config, hydra), config.get("train", True)
    resume = f"the sweep's command plus {'ckpt_path=last ' if train else ''}hydra.sweep.dir={sweep}"

    def alone(job: list[str]) -> list[str]:
        """A training job's overrides but `ckpt_path=last`: the job starts from scratch in its sweep (its folder holds
        no checkpoint), where alone it resumed the newest run under logs/train/runs, another run."""
        return [word for word in job if not (train and word.lstrip("+") == "ckpt_path=last")]

    return {str(sweep / str(num)): f"{NOT_STARTED}: the sweep stopped before it, or is still running ({resume} runs "
            f"it and the others); to run it alone: {command} {shlex.join(alone(job))} "
            f"{_override('hydra.run.dir', str(sweep / str(num)))}"
            for num, job in enumerate(sweep_jobs(hydra)) if not (sweep / str(num)).exists()}


def _composing_words(config: dict[str, Any], hydra: dict[str, Any]) -> str:
    """The entry point of a sweep's `multirun.yaml` (`config`, its `hydra` node) and what composed its jobs beside
    their overrides, as shell words: the config folder (`--config-dir`), a primary config of the user's own
    (`--config-name`; `ood-eval` when its `task_name` is eval's) and `hydra.searchpath` (the user's presets). Without
    them a job's overrides composed ood's train.yaml: another job, or "unknown method" for a preset of one's own."""
    import shlex

    from ood.runs.checks import _override

    name = (hydra.get("job") or {}).get("config_name")
    own = name not in ("train", "eval")
    words = ["ood-eval" if (config.get("task_name") if own else name) == "eval" else "ood-train"]
    sources = (hydra.get("runtime") or {}).get("config_sources") or []
    words += [f"--config-dir={s['path']}" for s in sources if s.get("provider") == "command-line"]
    words += [f"--config-name={name}"] if own and name else []
    searchpath = [_override("hydra.searchpath", hydra["searchpath"])] if hydra.get("searchpath") else []
    return " ".join([shlex.join(words), *searchpath])


def _unevaluated(run: Path) -> bool:
    """Whether the run in `run` was configured not to evaluate (`evaluate: false` in its resolved `config.yaml`)."""
    from omegaconf import OmegaConf

    config = run / "config.yaml"
    return config.is_file() and OmegaConf.load(config).get("evaluate", True) is False
