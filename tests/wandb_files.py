"""Read an offline wandb run back from its `run-<id>.wandb` file (LevelDB-log framing of protobuf `Record`s), so
tests check what wandb would upload: the run's group, job type, tags, config and logged keys."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7  # ":W&B" + magic (2 bytes) + version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[bytes]:
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a record header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # the record wandb is still appending: read at the next look
            return
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def read_run(run_dir: Path, timeout: float = 60.0) -> dict[str, Any]:
    """`group`, `job_type`, `tags`, `config` (key -> value) and `logged` (history keys) of an offline run.

    wandb's service process may still be appending to the file when `wandb.finish()` has returned (seen on a loaded
    machine: the last history records were missing), so this waits, up to `timeout` seconds, for the run's closing
    `exit` record before reading; a record still being appended (its bytes not all there) is left for the next look
    (parsed cut short, it failed the test with protobuf's "Wire format was corrupt")."""
    from wandb.proto import wandb_internal_pb2 as pb

    (file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for chunk in _chunks(file.read_bytes()):
            records.append(pb.Record())
            records[-1].ParseFromString(chunk)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out: dict[str, Any] = {"config": {}, "logged": set()}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(group=record.run.run_group, job_type=record.run.job_type, tags=list(record.run.tags))
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            out["logged"] |= {item.key or "/".join(item.nested_key) for item in record.history.item}
            continue
        else:
            continue
        for item in updates:
            out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
