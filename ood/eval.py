"""`ood-eval ckpt_path=PATH` (or `backbone.weights=FILE`): evaluate a checkpoint, or a backbone with pretrained
weights (`ood-eval data=imagenet1k backbone=resnet50 backbone.weights=... method=grood`), with the method's score and
every detector (no training).

`ood-eval ckpt_path=<run>` evaluates the run as it was trained: the overrides of its training command line that say
what it trained (`method=`, `data=`, `backbone=`, `experiment=`, their keys, `paths.data_dir`) are added to
this command line where it does not name them (`ood.runs.checkpoints.training_overrides`), and said on stderr.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import hydra
from omegaconf import DictConfig

from ood import CONFIG_DIR
from ood.cli import check_argv, friendly_errors, require_config_dir
from ood.runs.checkpoints import ADOPTED_ENV, training_overrides
from ood.termination import sigterm_noted
from ood.train import run


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
@friendly_errors
def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """`ood-eval` entry point."""
    require_config_dir()
    runs, adopted = training_overrides(sys.argv[1:])
    if adopted:  # before the user's first override: Hydra's flags (`-m`, `--cfg job`) must stay ahead of them
        first = next(i for i, arg in enumerate(sys.argv)
                     if i and not arg.startswith("-") and ("=" in arg or arg.startswith("~")))
        sys.argv[first:first] = adopted
        others = len(runs) - 1
        where = f"{runs[0]}" + (f" and {others} other run{'s' * (others > 1)} trained alike" if others else "")
        print(f"ood-eval: as trained in {where}: {' '.join(adopted)}", file=sys.stderr)
    os.environ[ADOPTED_ENV] = json.dumps(adopted)  # not the user's asking for a difference (`check_evaluated`)
    try:
        check_argv("eval")
        # the ~0.5M objects the imports made live until exit: freezing them spares every later collection (and the
        # ones at exit) from rescanning them, a fifth of a default digits run
        gc.freeze()
        with sigterm_noted():  # from here on, before Hydra makes the run folder: SIGTERM leaves FAILED.txt there
            _main()
    finally:
        os.environ.pop(ADOPTED_ENV, None)


if __name__ == "__main__":
    main()
