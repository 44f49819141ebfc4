"""ood's Hydra launchers: SLURM (and submitit's local executor) launchers whose requeued jobs resume their checkpoint.

Hydra takes launchers only from the `hydra_plugins` namespace package, so they live here, beside `ood`, in its
distribution (`hydra/launcher=slurm`, `slurm_local` in `ood/conf/hydra/launcher/`).

hydra-submitit-launcher requeues a job that SLURM preempts or that reaches its time limit (submitit's USR2 handler
calls the launcher's `checkpoint`, which resubmits the job with the arguments it was first given). ood's jobs resume
only when told (`ckpt_path=last`), so the requeued job trained from scratch in the same folder and the epochs done
before the signal were lost. These launchers resubmit it with `ckpt_path=last` added to its overrides: in a job of a
sweep, `last` is the job folder's own `checkpoints/last.ckpt` (`ood.runs.checkpoints.resolve_ckpt_path`), so the
requeued job continues from its last completed epoch, or starts from scratch when it had none. A job given its own
`ckpt_path=` (an evaluation sweep, a resume named by hand) is resubmitted as it was; one told to start from scratch
(`ckpt_path=null`, `~ckpt_path`) resumes as the others.

A job that ood stops on SIGTERM (`scancel`, a SIGTERM to the job) exits with status 143 (`ood.termination`), which
Hydra's `run_job` lets through (it records only an `Exception` as a failed job): the job left no submitit result, and
the sweep's own process ended in submitit's `UncompletedJobError` traceback. These launchers' jobs turn that exit into
the failed job it is (`stopped_as_failure`), so the sweep collects every job's result and ends, as under the other
launchers, with one line naming the job's folder and its `FAILED.txt`, and a non-zero status.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

try:  # the `sweep` extra (hydra-submitit-launcher); Hydra imports every plugin module as it starts
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:  # without the extra there is no SLURM launcher to extend
    LocalLauncher = SlurmLauncher = None  # type: ignore[assignment,misc]


def _from_scratch(override: str) -> bool:
    """Whether `override` tells a job to start from scratch: `ckpt_path=null` or `~ckpt_path` (the default, written
    out), which its requeue must not repeat."""
    key, _, value = override.partition("=")
    return key.lstrip("+~") == "ckpt_path" and (key.startswith("~") or value.strip().lower() == "null")


def requeue_overrides(overrides: Sequence[str]) -> list[str]:
    """A job's overrides for its requeue: `ckpt_path=last` added unless they name a checkpoint already (one told to
    start from scratch, `ckpt_path=null` or `~ckpt_path`, resumes like the others: that override goes)."""
    kept = [o for o in overrides if not _from_scratch(o)]
    names = {o.split("=", 1)[0].lstrip("+~") for o in kept}
    return kept if "ckpt_path" in names else [*kept, "ckpt_path=last"]


class _ResumingRequeue:
    """`checkpoint` (what submitit calls on preemption or time-out) resubmitting the job to resume, not restart."""

    def checkpoint(self, sweep_overrides: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, requeue_overrides(sweep_overrides), *args, **kwargs)


def stopped_as_failure(task: Callable[[Any], Any], cfg: Any) -> Any:
    """Run a sweep job's `task`; ood's exit on SIGTERM (status 143, after its `FAILED.txt`) raised as the job's
    failure, one line naming its folder and that file's reason, which Hydra's `run_job` records (any other exit goes
    on: submitit's own, after it requeued the job, must end the process without a result)."""
    from ood.termination import SIGTERM_EXIT

    try:
        return task(cfg)
    except SystemExit as stop:
        if stop.code != SIGTERM_EXIT:
            raise
        from hydra.core.hydra_config import HydraConfig

        from ood.cli import SweepJobError
        from ood.runs.failures import failure

        folder = HydraConfig.get().runtime.output_dir
        raise SweepJobError(f"job {folder} stopped: {failure(folder) or f'exit status {stop.code}'}") from None


class _StoppedJobsFail:
    """`setup` giving the jobs a task whose stop on SIGTERM is a failed job (`stopped_as_failure`), not an exit."""

    def setup(self, *, task_function: Callable[[Any], Any], **kwargs: Any) -> None:
        super().setup(task_function=partial(stopped_as_failure, task_function), **kwargs)  # type: ignore[misc]


if SlurmLauncher is not None:

    class ResumingSlurmLauncher(_ResumingRequeue, _StoppedJobsFail, SlurmLauncher):
        """`hydra/launcher=slurm`: hydra-submitit-launcher's SLURM launcher, its requeued jobs resuming."""

    class ResumingLocalLauncher(_ResumingRequeue, _StoppedJobsFail, LocalLauncher):
        """`hydra/launcher=slurm_local`: the same on submitit's local executor (trying a SLURM sweep without SLURM)."""
