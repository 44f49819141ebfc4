"""What `make gpu-check` measures on a GPU, checked on the CPU: its timings compare ood and the plain loop alike."""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks import gpu_check


def test_step_log_counts_the_wait_before_each_epochs_first_batch() -> None:
    """The throughput table's ood images/s (`StepLog`) and the plain loop's must both include an epoch's restart
    (the loader's first batch, Lightning's epoch hooks): `plain_loop`'s clock runs through them, and StepLog dropped
    the wait before every later epoch's first batch, flattering ood by that much (0.4 s a restart for ResNet-50's
    224 px batches of 256 from 8 workers, against 1 to 2 s of steps per epoch on a GPU)."""
    log = gpu_check.StepLog()
    loss = torch.tensor(1.0)
    for epoch in range(2):
        for batch in range(2):
            log.on_train_batch_start(None, None, None, batch)
            log.on_train_batch_end(None, None, loss, None, batch)
            if batch == 1 and epoch == 0:
                log.on_train_epoch_end(None, None)
                time.sleep(0.05)  # the next epoch's first batch takes this long to arrive
    assert log.losses == [1.0] * 4
    assert log.wait[0] == 0.0 and log.wait[2] == pytest.approx(0.05, abs=0.04)
    assert log.step[2] >= log.wait[2] and sum(log.wait) / sum(log.step) > 0.5
