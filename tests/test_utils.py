"""Shared helpers: atomic folders."""

import os
import platform
import subprocess
import sys

import pytest

from tspo.utils import atomic_directory


def test_atomic_directory_replaces_the_target_only_on_success(tmp_path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")

    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # staging removed
    assert (target / "old.txt").read_text() == "old"

    with atomic_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_thread_policy_flag_beats_env_beats_free_cores(monkeypatch):
    from tspo.errors import TSPOError
    from tspo.utils import THREADS_ENV, choose_threads, free_cores

    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setattr("tspo.utils._running_elsewhere", lambda: 0)
    assert choose_threads() == free_cores() >= 1
    monkeypatch.setattr("tspo.utils._running_elsewhere", lambda: 64)
    assert choose_threads() == 1  # a busy machine: one thread, never zero
    monkeypatch.setenv(THREADS_ENV, "3")
    assert choose_threads() == 3
    assert choose_threads(2) == 2
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(TSPOError, match=THREADS_ENV):
        choose_threads()
    with pytest.raises(TSPOError, match="--threads"):
        choose_threads(0)


def test_requested_threads_survive_the_policy_applied_later(monkeypatch):
    """`--threads` of `tspo quickstart`/`train`/`eval` must not be undone when the trainer or the
    evaluator applies the thread policy on loading the model."""
    import torch

    from tspo.utils import THREADS_ENV, apply_thread_policy, request_threads

    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setattr("tspo.utils._running_elsewhere", lambda: 0)
    before = torch.get_num_threads()
    try:
        request_threads(1)
        assert apply_thread_policy() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
        os.environ.pop(THREADS_ENV, None)


def test_peak_memory_always_names_cuda_memory_null_on_cpu():
    import json

    from tspo.utils import peak_memory_mb

    memory = peak_memory_mb()
    assert memory["peak_rss_mb"] > 0
    assert "peak_cuda_mb" in memory and '"peak_cuda_mb": null' in json.dumps(memory)


HEAP_PROBE = """
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if sys.argv[1] == "policy":
    from tspo.utils import limit_heap_retention
    assert limit_heap_retention()

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS")) / 1024

size = 3 << 20
libc.free(libc.malloc(size))  # glibc raises its own threshold to the size of a freed block
blocks, pins = [], []
for _ in range(64):
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    blocks.append(block)
    pins.append(libc.malloc(512))  # small and long-lived: pins the heap under the blocks
before = rss_mib()
for block in blocks:
    libc.free(block)
print(before - rss_mib())
"""


@pytest.mark.skipif(
    sys.platform != "linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only"
)
def test_freed_blocks_go_back_to_the_os_under_the_heap_policy(monkeypatch) -> None:
    """64 freed blocks of 3 MiB, each pinned in the heap by a small live allocation: with the
    policy their 192 MiB leave the process; without it glibc keeps them."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    released = {}
    for mode in ("policy", "default"):
        result = subprocess.run(
            [sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, check=True
        )
        released[mode] = float(result.stdout)
    assert released["policy"] > 150, released
    assert released["default"] < 50, released


def test_the_users_malloc_setting_wins(monkeypatch) -> None:
    from tspo.utils import limit_heap_retention

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    assert limit_heap_retention() is False
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
