"""The DataLoader worker count of every data config: its cap, or the CPUs the process may use when fewer."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from helpers import compose_config
from torch.utils.data import DataLoader

from ood.data.benchmark import capped_workers
from ood.errors import ConfigError

#: each data config's worker count on a machine with CPUs to spare (what the configs had before the cap)
CAPS = {"cifar10": 4, "cifar100": 4, "tinyimagenet": 4, "imagenet1k": 8, "imagenet200": 8, "folder": 4, "digits": 0}


def test_every_data_config_loads_with_workers_the_machine_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cifar10 / cifar100 / tinyimagenet set 4 workers and the ImageNet configs 8, whatever the machine: on a 2-CPU
    one torch warned at every loader ('This DataLoader will create 4 worker processes in total. Our suggested max
    number of worker in current system is 2'). Each config's count is its cap, or the usable CPUs when fewer (read
    where the config is resolved); a given data.num_workers is kept."""
    configs = {name: compose_config(tmp_path, [f"data={name}"]).data for name in CAPS}
    for cpus in (2, 64):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        got = {name: data.num_workers for name, data in configs.items()}
        assert got == {name: min(cap, cpus) for name, cap in CAPS.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for workers in got.values():  # torch's check when a loader starts its workers
                DataLoader(range(4), num_workers=workers).check_worker_number_rationality()
    assert compose_config(tmp_path, ["data=imagenet1k", "data.num_workers=6"]).data.num_workers == 6


def test_a_worker_cap_that_is_no_count_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^the worker cap of \$\{ood.workers:N\}=-1 is outside its range"):
        capped_workers(-1)


def test_the_worker_count_resolves_wherever_a_config_is_instantiated() -> None:
    """A fresh process that composes a data config and reads it through the one instantiate helper, before anything
    imported `ood.data` (a test file run alone, a script): `${ood.workers:N}` failed with OmegaConf's
    'Unsupported interpolation type ood.workers' (the resolver was registered by `ood.data.benchmark`'s import)."""
    import subprocess
    import sys

    code = ("import sys; from ood.utils import instantiate; from omegaconf import OmegaConf; "
            "cfg = OmegaConf.create({'n': '${ood.workers:3}', '_target_': 'builtins.dict'}); "
            "assert 'ood.data' not in sys.modules; print(instantiate(cfg)['n'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # the child inherits this process's CPUs: 3 workers, or fewer where fewer CPUs are usable
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert int(out) == min(3, cpus)
