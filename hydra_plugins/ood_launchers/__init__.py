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
"""

from __future__ import annotations

from collections.abc import Sequence
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


if SlurmLauncher is not None:

    class ResumingSlurmLauncher(_ResumingRequeue, SlurmLauncher):
        """`hydra/launcher=slurm`: hydra-submitit-launcher's SLURM launcher, its requeued jobs resuming."""

    class ResumingLocalLauncher(_ResumingRequeue, LocalLauncher):
        """`hydra/launcher=slurm_local`: the same on submitit's local executor (trying a SLURM sweep without SLURM)."""
