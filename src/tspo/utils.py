"""Small shared helpers: seeding, atomic files, progress bars, memory and machine facts."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


THREADS_ENV = "TSPO_THREADS"
# Threads that compete with other busy processes slow small models down sharply (measured: the
# quickstart's RL step took 7.5 s quiet and 32 s next to two busy processes at torch's default
# thread count, 17.8 s with one thread; docs/reliability.md), so the policy takes only free cores.


def _running_elsewhere() -> int:
    """Other processes running right now: the most seen in a few samples of /proc/loadavg."""
    import time

    seen = []
    for _ in range(5):
        try:
            fields = Path("/proc/loadavg").read_text().split()
            seen.append(int(fields[3].split("/")[0]) - 1)  # minus this process
        except (OSError, ValueError, IndexError):
            return round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
        time.sleep(0.05)
    return max(0, max(seen))


def free_cores() -> int:
    """CPUs this process may use minus the processes running elsewhere right now, at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    return max(1, min(cpus, cpus - _running_elsewhere()))


def choose_threads(requested: int | None = None) -> int:
    """torch CPU threads: ``requested`` (``--threads``), else ``$TSPO_THREADS``, else the cores
    other processes leave free right now."""
    from tspo.errors import TSPOError

    if requested is None and os.environ.get(THREADS_ENV, "").strip():
        raw = os.environ[THREADS_ENV].strip()
        if not raw.isdigit():
            raise TSPOError(f"{THREADS_ENV}={raw!r}: expected a whole number of threads >= 1")
        requested = int(raw)
    if requested is not None:
        if requested < 1:
            raise TSPOError(f"--threads must be >= 1, got {requested}")
        return requested
    return free_cores()


def request_threads(threads: int | None) -> None:
    """Make ``--threads`` the thread count for the rest of the command: every later
    :func:`apply_thread_policy` (the trainer's and evaluator's, on loading a model) uses it."""
    if threads is not None:
        choose_threads(threads)  # validates
        os.environ[THREADS_ENV] = str(threads)


def apply_thread_policy(requested: int | None = None) -> int:
    """Set torch's CPU threads by :func:`choose_threads`; returns the number set."""
    import torch

    threads = choose_threads(requested)
    torch.set_num_threads(threads)
    return threads


# glibc's mallopt parameter and the size from which allocations get their own mapping. At 2 MiB,
# peak RSS over 6 steps of the SmolLM2 preset fell from 4.40 to 3.76 GiB; 1 MiB reached 3.4 GiB
# but 15-20% slower steps (page faults of fresh mappings); 4 MiB changed nothing. The quickstart's
# 0.9M policy ran 57% slower: hence opt-in (train.release_freed_memory).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 2 * 2**20
ONEDNN_CACHE_CAPACITY = 16


def _glibc() -> Any:
    """The C library when it is glibc on Linux, else None."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_heap_retention(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations of at least ``threshold`` bytes from their own memory mappings, which go
    back to the OS as soon as they are freed, and keep oneDNN's kernel cache small. Returns
    whether the allocator policy was applied.

    By default glibc raises that threshold to the size of each large block freed (up to 32 MiB), so
    after the first update of a run activations and weight casts of a few MiB come from the heap,
    where small long-lived allocations pin them: the process kept ~1 GiB it no longer used, and the
    next step's peak came on top. Fixing the threshold keeps RSS near what is live. Only on Linux
    with glibc, and not when ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice wins). Call it
    before the first matrix product: oneDNN reads ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` then.
    """
    # oneDNN keeps a compiled kernel for each matrix shape it meets (1,024 by default), and RL
    # meets new sequence lengths at every step: over 6 steps of the SmolLM2 preset, what the
    # process held after each step grew 30 MB a step with the default and 17 MB with 16.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def release_free_heap() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``); nothing elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; honour the umask instead
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


@contextmanager
def atomic_directory(target: str | Path, *, staging_prefix: str | None = None) -> Iterator[Path]:
    """Fill a hidden staging folder beside ``target``; on success it replaces ``target``.

    The rename is the commit: a process killed inside the ``with`` block leaves ``target`` as it
    was (plus a stray staging folder named ``staging_prefix…``, ``.<name>.…`` by default). Every
    file and folder of the staging folder is fsynced before the rename, and the parent folder
    after it, so after a power cut ``target`` is either the old folder or the whole new one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = staging_prefix if staging_prefix is not None else f".{target.name}."
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
    try:
        yield staging
        fsync_tree(staging)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{prefix}old-"))
            target.rename(old / target.name)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
        fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def fsync_directory(folder: str | Path) -> None:
    """Flush a folder's entries (new names, renames) to disk.

    Skipped where folders cannot be opened or synced (Windows, some network file systems); a
    failing disk (EIO, ENOSPC) still raises.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file under ``folder`` to disk, then every folder (deepest first)."""
    folder = Path(folder)
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_directory(path)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def progress_bar(
    *, transient: bool = False, disable: bool = False, stderr: bool = False
) -> Progress:
    """The project's rich progress bar: description, bar, done/total, elapsed, ETA (on stderr with
    ``stderr``, so a command's stdout stays clean for its results)."""
    from rich.console import Console

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
        disable=disable,
        console=Console(stderr=True) if stderr else None,
    )


def peak_memory_mb() -> dict[str, float | None]:
    """Peak resident memory of this process and peak CUDA memory, in MiB.

    ``peak_cuda_mb`` is always present: None (JSON null) when CUDA is not in use.
    """
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict[str, float | None] = {
        "peak_rss_mb": rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20,
        "peak_cuda_mb": None,
    }
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def machine_info() -> dict[str, Any]:
    """What a benchmark ran on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info
