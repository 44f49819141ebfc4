"""Atomic files: every result, score file, figure, report and cache is written to a temporary file next to its
target, flushed to disk and renamed onto it, so neither a crash nor a power loss leaves a half-written or empty
file (POSIX rename is atomic; without the fsync some file systems keep the rename but not the data).

A temporary file is named after its writer (`.<name>.<host>.<pid>.tmp`): a process killed mid-write leaves it, and
the next write to the same target removes those of writers that no longer run on this host (those of older
versions, named without the host, it names in a warning: `temporary_path`)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ood.errors import CheckpointError

log = logging.getLogger(__name__)  # not ood.utils' rank-zero logger: a layer of its own


def _running(pid: int) -> bool:
    """Whether process `pid` runs on this host (a reused pid reads as running: its temporary file is kept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


#: the temporaries of older versions named so far (`temporary_path`): each is named once per process
_NAMED: set[Path] = set()


def disk_usage(path: Path) -> str:
    """The disk space the file `path`, or the files under the folder `path`, take, e.g. `15.6 GB` (their blocks: a
    sparse memory-mapped bank counts what was written). A file or folder removed meanwhile counts nothing: another
    process may be deleting it (an evaluation its bank folder, a writer renaming its temporary)."""
    files = [str(path)] if path.is_file() else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    size = 0.0
    for file in files:
        try:
            st = os.lstat(file)
        except FileNotFoundError:
            continue
        size += st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else 0
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _older_version_pid(rest: str) -> str | None:
    """The pid in what follows `.<name>.` in the name of an older version's temporary (`.<name>.tmp<pid>`, the
    decoded-image cache's `.<name>.<pid>.tmp`), None for another file."""
    pid = rest[len("tmp"):] if rest.startswith("tmp") else rest[:-len(".tmp")] if rest.endswith(".tmp") else ""
    return pid if pid.isdigit() else None


def temporary_path(path: Path) -> Path:
    """This process's temporary file for `path`, next to it, after removing those of dead writers on this host (a
    killed process's, which nothing else would ever remove: a decoded-image cache's can be gigabytes). A writer on
    another host sharing the folder, or a live one here, keeps its own. The temporaries of older versions, whose
    names lack the host, are named in a warning (once) when their pid does not run here, never removed: on a folder
    shared between hosts (NFS, a cluster's scratch) that pid may be another host's running writer, whose rename
    would fail, and no file system says for sure that it is not shared."""
    host, prefix = socket.gethostname(), f".{path.name}."
    if path.parent.is_dir():
        for tmp in path.parent.iterdir():
            name = tmp.name
            if not name.startswith(prefix):
                continue
            old_pid = _older_version_pid(name[len(prefix):])
            if old_pid is not None:
                if tmp not in _NAMED and not _running(int(old_pid)) and tmp.is_file():
                    _NAMED.add(tmp)
                    log.warning("%s (%s) is the temporary file of an older version of ood writing %s (process %s, "
                                "not running on this host): kept, as its name does not say its host (another one "
                                "sharing the folder may be writing it); remove it if no ood process writes %s",
                                tmp, disk_usage(tmp), path, old_pid, path)
                continue
            if not name.endswith(".tmp"):
                continue
            writer, _, pid = name[len(prefix):-len(".tmp")].rpartition(".")
            if writer == host and pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
                tmp.unlink(missing_ok=True)
                log.info("removed %s, left by process %s killed while it wrote %s", tmp, pid, path)
    return path.with_name(f"{prefix}{host}.{os.getpid()}.tmp")


#: what opening or fsync answers where the file system cannot flush a file or folder (VirtualBox shared folders,
#: some FUSE and network mounts): there is nothing to flush, and the write stands
UNSYNCABLE = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EPERM})


def _fsync(path: str | Path) -> None:
    """Flush `path`, a file or a folder, to disk where its file system can (`UNSYNCABLE`): raised there, every write
    to such a mount failed, after its rename."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno not in UNSYNCABLE:
            raise


def durable_replace(tmp: str | Path, path: str | Path) -> None:
    """Rename the written `tmp` onto `path` so that both survive a power loss: `tmp`'s data is flushed first, and
    the folder's entry after (where the platform opens folders: not on Windows)."""
    _fsync(tmp)
    os.replace(tmp, path)
    if os.name == "posix":
        _fsync(Path(path).parent)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it onto `path` (`durable_replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_savez(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """`np.savez_compressed` to `path` atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj)` to `path` atomically (caches such as a teacher's features)."""
    import torch  # here: `ood-report` and the entry points' start-up import this module, not torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


#: the first bytes of files a user may give in a checkpoint's place -> what the file is
NOT_TORCH_FILES = {b"\x93NUMPY": "a NumPy .npy file", b"\x1f\x8b": "a gzip file: unpack it first",
                   b"\x89HDF": "an HDF5 file (Keras / TensorFlow weights)", b"PK": "a zip archive"}


#: how torch.save's zip format starts: a zip's first local header, as torch tells it (`zipfile.is_zipfile` also finds
#: zip's end signature in a file's last 64 KiB: in a tensor's bytes of the format before 1.6)
ZIP_START = b"PK\x03\x04"

#: how torch.save's format before 1.6 starts: its magic number pickled, protocol 2 and above (0x80), then 1 (text)
LEGACY_STARTS = (b"\x80", b"L119547037146038801333356L")


def read_torch_file(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> Any:
    """`torch.load(path)` on the CPU (any object: `weights_only=False`), memory-mapped with `mmap` where the file
    allows it: torch.save's zip format. A file in torch's format before PyTorch 1.6 (the released checkpoints of
    2018-2020 papers) is read whole: memory-mapped, torch refused it, saying to save it again. A file that is no
    torch file says what it is (torch said "invalid load key" or that): text, a NumPy file, an archive to unpack.
    A safetensors file is read as its tensors (`ood-eval ckpt_path=model.safetensors` read it for its stored config
    and called it no torch file). Raises `CheckpointError` naming the file (`what`: checkpoint, weights)."""
    import torch  # here: `ood-report` and the entry points' start-up import this module, not torch

    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(len(LEGACY_STARTS[-1]))
        zipped = head.startswith(ZIP_START)
        if zipped:
            try:
                with zipfile.ZipFile(path) as archive:
                    names = archive.namelist()
            except zipfile.BadZipFile:  # its start without its end (central directory): a copy stopped half-way
                raise CheckpointError(f"could not read {what} {path}: it is cut short or damaged (torch.save's zip "
                                      "format without its end): copy or save it again") from None
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                inside = [n for n in names if n.endswith((".ckpt", ".pth", ".pt", ".bin", ".safetensors"))]
                raise CheckpointError(f"could not read {what} {path}: it is a zip archive, not a file of torch.save: "
                                      f"unpack it and give the file inside{f' (e.g. {inside[0]})' if inside else ''}")
        elif head[8:9] == b"{":  # safetensors (Hugging Face's model.safetensors): a header's length, then its JSON
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        elif not head.startswith(LEGACY_STARTS):
            kind = next((k for magic, k in NOT_TORCH_FILES.items() if head.startswith(magic)), None)
            raise CheckpointError(f"could not read {what} {path}: not a file of torch.save (neither its zip format nor "
                                  f"a pickle): {kind or (f'it starts with {head[:16]!r}' if head else 'it is empty')}")
        # the name as a string: torch 2.2 took only a str with mmap ("f must be a string filename ...")
        return torch.load(str(path), map_location="cpu", weights_only=False, mmap=mmap and zipped)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        pickled = "Invalid magic number" in str(err)  # a pickle of another program (`pickle.dump`)
        reason = "a pickle, not one of torch.save: save its tensors with torch.save" if pickled else f"{type(err).__name__}: {err}"
        if isinstance(err, ModuleNotFoundError | AttributeError) and ("No module named" in str(err) or "Can't get attribute" in str(err)):
            # `torch.save(model)`: the network object, pickled with its class's name, not its code
            reason = (f"it holds a pickled object whose class cannot be imported here ({err}): the network itself was "
                      "saved (torch.save(model)); load it where its code is and save model.state_dict() instead, or put "
                      "that code on PYTHONPATH")
        raise CheckpointError(f"could not read {what} {path}: {reason}") from err

