"""`ood-eval ckpt_path=PATH` (or `backbone.weights=FILE`): evaluate a checkpoint, or a backbone with pretrained
weights (`ood-eval data=imagenet1k backbone=resnet50 backbone.weights=... method=grood`), with the method's score and
every detector (no training)."""

from __future__ import annotations

import gc

import hydra
from omegaconf import DictConfig

from ood import CONFIG_DIR
from ood.cli import check_argv, friendly_errors, require_config_dir
from ood.termination import sigterm_noted
from ood.train import run


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
@friendly_errors
def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """`ood-eval` entry point."""
    require_config_dir()
    check_argv("eval")
    # the ~0.5M objects the imports made live until exit: freezing them spares every later collection (and the
    # ones at exit) from rescanning them, a fifth of a default digits run
    gc.freeze()
    with sigterm_noted():  # from here on, before Hydra makes the run folder: SIGTERM leaves FAILED.txt there
        _main()


if __name__ == "__main__":
    main()
