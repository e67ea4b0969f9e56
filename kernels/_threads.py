"""Blocks of CPU work spread over the cores by Python threads whose torch ops run alone.

Why: torch splits each CPU op over its intra-op threads (an OpenMP parallel region), and a
region ends when its last thread does. Where another process keeps a core busy, the thread
on that core waits for the scheduler, up to a time slice per region: an 8 MiB softmax took
20 ms instead of 0.6 ms while a busy loop ran on the second of two cores. A loss over half-
precision logits, a few ops on each of dozens of blocks, opens hundreds of regions per call
and was 6x torch's time there (torch's own loss: a few large ops, a few regions). Here every
block's ops run single-threaded, each in one of ``torch.get_num_threads()`` threads that take
the next block as they finish one: a slow core takes fewer blocks, and no op waits for
another core. The results come back in block order, so the sums over blocks do not depend
on the scheduling.

Single-threaded ops in one thread only: the OpenMP runtime's thread count is a per-thread
setting (``omp_set_num_threads`` from the thread itself), which ``torch.get_num_threads()``
reads in that thread; ``torch.set_num_threads`` would also change what every thread created
later gets. Where that runtime cannot be found and steered (not Linux, another threading
backend), the blocks run in order in the calling thread, as torch's ops parallelize them.
"""

from __future__ import annotations

import ctypes
import threading

import torch

_RUNTIME: list = []  # [the OpenMP library torch's ops use, or None], found once


def _openmp_candidates() -> list[str]:
    """The loaded OpenMP runtimes' files (Linux: /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[-1].strip() for line in f if "/" in line}
    except OSError:
        return []
    names = ("libgomp", "libiomp", "libomp")
    return sorted(p for p in paths if p.rsplit("/", 1)[-1].startswith(names))


def _steers_torch(lib) -> bool:
    """Whether ``lib.omp_set_num_threads(1)`` makes torch's ops single-threaded in the calling
    thread (tried in a thread of its own, which then ends)."""
    found = []

    def probe():
        torch.get_num_threads()  # torch sets a thread's count on its first use: first
        lib.omp_set_num_threads(1)
        found.append(torch.get_num_threads() == 1)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join()
    return bool(found and found[0])


def _runtime():
    """The OpenMP library whose per-thread setting torch's CPU ops follow, or None."""
    if not _RUNTIME:
        lib = None
        for path in _openmp_candidates():
            try:
                candidate = ctypes.CDLL(path)  # already loaded: the same handle
                candidate.omp_set_num_threads.argtypes = [ctypes.c_int]
                if _steers_torch(candidate):
                    lib = candidate
                    break
            except (OSError, AttributeError):
                continue
        _RUNTIME.append(lib)
    return _RUNTIME[0]


def workers(device: torch.device, n_blocks: int) -> int:
    """How many threads ``run_blocks`` would use: 1 (the calling thread, torch's own
    parallelism) unless the blocks are on the CPU, more than one, torch may use more than one
    thread and its OpenMP runtime can be steered."""
    if device.type != "cpu" or n_blocks < 2:
        return 1
    n = min(torch.get_num_threads(), n_blocks)
    return n if n > 1 and _runtime() is not None else 1


def run_blocks(fn, n_blocks: int, device: torch.device) -> list:
    """``[fn(i, scratch) for i in range(n_blocks)]``, on ``workers(device, n_blocks)``
    threads, each running torch's ops single-threaded and taking the next block as it
    finishes one; ``scratch`` is a dict of the thread's own, for buffers it reuses from
    block to block. ``fn`` runs without grad mode (it may enable it), inference mode as the
    caller's. The first exception a block raises is raised here (no further block starts).
    The threads are made per call (a tenth of a millisecond: nothing to fork or tear down),
    so callers hand over blocks of some size (``eager._blocks``)."""
    n_threads = workers(device, n_blocks)
    if n_threads == 1:
        scratch: dict = {}
        return [fn(i, scratch) for i in range(n_blocks)]
    results: list = [None] * n_blocks
    errors: list = []
    lock = threading.Lock()
    next_block = iter(range(n_blocks))
    inference = torch.is_inference_mode_enabled()
    lib = _runtime()

    def work():
        try:
            torch.get_num_threads()  # torch's own setting for this thread first, then ours
            lib.omp_set_num_threads(1)
            scratch: dict = {}
            with torch.inference_mode(inference), torch.no_grad():
                while True:
                    with lock:
                        i = None if errors else next(next_block, None)
                    if i is None:
                        return
                    results[i] = fn(i, scratch)
        except BaseException as e:  # handed to the caller
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(n_threads)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    finally:  # interrupted (Ctrl-C): the threads take no further block
        with lock:
            errors.append(None)
    if errors[0] is not None:
        raise errors[0]
    return results
