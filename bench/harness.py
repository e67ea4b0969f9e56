"""Timing and the per-case loop: every provider on the same inputs, in one process.

How each figure is taken (the same words go into the JSON and the Markdown, ``METHOD``):

- forward and forward+backward: ``triton.testing.do_bench`` (median, L2 flushed before each
  run) on CUDA; ``time.perf_counter`` around each call on the CPU. The forward is the training
  forward (inputs require grad). forward+backward resets ``.grad`` to None, then
  ``loss.backward()``, as a training step does.
- backward alone: every repetition re-runs the forward untimed, flushes L2, then times
  ``loss.backward()`` alone (CUDA events, synchronised after each; median).
- peak memory: ``torch.cuda.max_memory_allocated()`` over one forward+backward, less what was
  allocated before it (the inputs): the gradient counts, the inputs do not.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cases import Case, fill_inputs, make_inputs, min_bytes
from .providers import REFERENCE, Provider, Skip

MODES = ("fwd", "bwd", "fwd_bwd")
SEED = 1234
METHOD = {
    "forward": (
        "the training forward (inputs require grad), median of timed calls: "
        "triton.testing.do_bench on CUDA (L2 flushed before each run), time.perf_counter "
        "around each call on the CPU"
    ),
    "forward_backward": "x.grad = None; loss = forward(); loss.backward(); timed as forward",
    "backward": (
        "each repetition re-runs the forward untimed, flushes L2, then times loss.backward() "
        "alone (median). Providers marked grad_in_forward (fused_losses, Liger) compute the "
        "gradient inside the forward and their backward only multiplies it by the upstream "
        "gradient (skipped when it is 1), so their backward is near zero and their forward "
        "carries the gradient's cost: compare forward+backward across providers."
    ),
    "peak_memory": (
        "torch.cuda.max_memory_allocated() over one forward+backward less the memory allocated "
        "before it: the gradient and all temporaries count, the inputs do not"
    ),
    "rotation": (
        "input sets smaller than 4x the last-level cache are replicated (up to 8 copies) and "
        "rotated between calls; do_bench also flushes L2 before every timed run"
    ),
    "torch.compile": "torch.compile(fn, dynamic=True): one compilation per (loss, dtype), "
                     "reused for every shape; its compile time is in warmup_s, not timed",
}


@dataclass(frozen=True)
class Settings:
    warmup_ms: float
    rep_ms: float
    min_reps: int = 3
    max_reps: int = 50  # backward-alone repetitions (each also runs an untimed forward)


def settings_for(device: str, quick: bool) -> Settings:
    # CUDA: fewer repetitions than do_bench's defaults (25/100 ms) keep the full sweep inside
    # gpu_check.sh's budget; medians of 40 ms of runs are stable to ~1% on memory-bound kernels.
    if device == "cuda":
        return Settings(5, 20) if quick else Settings(10, 40)
    return Settings(5, 40) if quick else Settings(10, 100)


@dataclass(frozen=True)
class Stat:
    median: float
    p20: float
    p80: float

    @staticmethod
    def of(times: list[float]) -> Stat:
        qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else None
        if qs is None:
            return Stat(times[0], times[0], times[0])
        return Stat(statistics.median(times), qs[1], qs[7])


class Timer:
    """Times callables on one device, in milliseconds."""

    def __init__(self, device: str, settings: Settings):
        self.device = device
        self.settings = settings

    def sync(self) -> None:
        pass

    def _clock(self, setup: Callable, fn: Callable) -> float:
        setup()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def time(self, fn: Callable) -> Stat:
        deadline = time.perf_counter() + self.settings.warmup_ms / 1e3
        fn()
        while time.perf_counter() < deadline:
            fn()
        return self.time_after(lambda: None, fn)

    def time_after(self, setup: Callable, fn: Callable) -> Stat:
        """Median of ``fn`` alone, with ``setup`` run untimed before each repetition."""
        first = self._clock(setup, fn)  # also a warm-up
        s = self.settings
        reps = int(min(max(s.rep_ms / max(first, 1e-3), s.min_reps), s.max_reps))
        return Stat.of([self._clock(setup, fn) for _ in range(reps)])


class CudaTimer(Timer):
    def __init__(self, device: str, settings: Settings):
        super().__init__(device, settings)
        # Written before each backward-alone repetition to evict the inputs from L2 (do_bench
        # does the same with its own buffer).
        self._flush = torch.empty(256 << 20, dtype=torch.int8, device=device)

    def sync(self) -> None:
        torch.cuda.synchronize()

    def time(self, fn: Callable) -> Stat:
        from triton.testing import do_bench

        # warmup, rep, quantiles: accepted by every Triton from 2.1 to 3.9.
        med, p20, p80 = do_bench(fn, warmup=self.settings.warmup_ms, rep=self.settings.rep_ms,
                                 quantiles=[0.5, 0.2, 0.8])
        return Stat(med, p20, p80)

    def _clock(self, setup: Callable, fn: Callable) -> float:
        setup()
        self._flush.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def make_timer(device: str, settings: Settings) -> Timer:
    return CudaTimer(device, settings) if device == "cuda" else Timer(device, settings)


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus written:
    the roofline's bandwidth, measured in the same run as the losses."""
    src = torch.randn(nbytes // 4, device=timer.device)  # random, never zeros (METHOD.md)
    dst = torch.empty_like(src)
    ms = timer.time(lambda: dst.copy_(src)).median
    return 2 * src.numel() * 4 / (ms * 1e-3)


def cache_bytes(device: str) -> int:
    """The last-level cache that repeated runs could be served from."""
    if device == "cuda":
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return 32 << 20  # a nominal CPU last-level cache


def n_input_sets(case: Case, cache: int) -> int:
    """Copies of the inputs to rotate through so that together they exceed 4x the cache."""
    per_set = min_bytes(case).read
    return max(1, min(8, -(-4 * cache // per_set)))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_fits(case: Case, provider: Provider) -> None:
    """Skip (as skipped-OOM) a provider whose estimated peak exceeds the free device memory."""
    if case.device != "cuda":
        return
    free_memory()
    free, _total = torch.cuda.mem_get_info()
    # + 1 GiB: do_bench's 256 MB flush buffer, ours, and allocator slack
    need = provider.mem_factor * case.input_bytes() + (1 << 30)
    if need > free:
        raise MemoryError(f"needs ~{need / 1e9:.1f} GB beyond its inputs, {free / 1e9:.1f} GB "
                          "free")


class Runner:
    """The forward of one provider over rotated input sets, and the three timed modes."""

    def __init__(self, forwards: list[Callable], sets: list[dict]):
        self.forwards = forwards
        self.inputs = [t["input"] for t in sets]
        self.next = itertools.cycle(range(len(sets))).__next__
        self.loss = None

    def fwd(self):
        return self.forwards[self.next()]()

    def fwd_bwd(self) -> None:
        i = self.next()
        self.inputs[i].grad = None
        self.forwards[i]().backward()

    def setup_bwd(self) -> None:
        i = self.next()
        self.inputs[i].grad = None
        self.loss = None  # free the last graph before building the next
        self.loss = self.forwards[i]()

    def bwd(self) -> None:
        self.loss.backward()

    def clear(self) -> None:
        self.loss = None
        for x in self.inputs:
            x.grad = None


def _warmup_and_value(runner: Runner, timer: Timer) -> tuple[float, float]:
    """The first forward+backward (compilation included): its loss value and seconds."""
    start = time.perf_counter()
    runner.inputs[0].grad = None
    loss = runner.forwards[0]()
    value = float(loss.detach().float())
    loss.backward()
    timer.sync()
    return value, time.perf_counter() - start


def _peak_extra_bytes(runner: Runner, timer: Timer) -> int | None:
    if timer.device != "cuda":
        return None
    runner.clear()
    timer.sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    runner.forwards[0]().backward()
    timer.sync()
    peak = torch.cuda.max_memory_allocated() - base
    runner.clear()
    return peak


def measure(provider: Provider, case: Case, sets: list[dict], timer: Timer) -> dict:
    """Warm-up, peak memory and the three timings of one provider on one case."""
    for i, t in enumerate(sets):
        fill_inputs(case, t, SEED + i)
    runner = Runner([provider.build(case, t) for t in sets], sets)
    try:
        _check_fits(case, provider)
        value, warmup_s = _warmup_and_value(runner, timer)
        peak = _peak_extra_bytes(runner, timer)
        stats = {
            "fwd": timer.time(runner.fwd),
            "fwd_bwd": timer.time(runner.fwd_bwd),
            "bwd": timer.time_after(runner.setup_bwd, runner.bwd),
        }
    finally:
        runner.clear()
    return {
        "loss_value": value,
        "warmup_s": round(warmup_s, 3),
        "peak_extra_bytes": peak,
        "ms": {m: stats[m].median for m in MODES},
        "ms_p20_p80": {m: [stats[m].p20, stats[m].p80] for m in MODES},
    }


def run_provider(provider: Provider, case: Case, sets: list[dict], timer: Timer) -> dict:
    """One result row; every failure becomes a status, so the sweep always goes on."""
    row = {"case": case.to_json(), "provider": provider.name, "status": "ok", "reason": ""}
    try:
        if case.device not in provider.devices:
            raise Skip(f"not run on {case.device} by this benchmark")
        row.update(measure(provider, case, sets, timer))
    except Skip as e:
        row.update(status="skipped", reason=str(e))
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        row.update(status="skipped-oom", reason=str(e).splitlines()[0][:300])
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        row.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
    finally:
        free_memory()
    return row


def add_figures(rows: list[dict], case: Case, copy_gbps: float) -> None:
    """GB/s, the fraction of the roofline, and fused_losses's speed-up against each peer."""
    traffic = min_bytes(case)
    ref = next((r for r in rows if r["provider"] == REFERENCE and r["status"] == "ok"), None)
    torch_row = next((r for r in rows if r["provider"] == "torch" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] != "ok":
            continue
        row["bytes"] = {m: traffic.bytes_for(m) for m in MODES}
        row["gbps"] = {m: row["bytes"][m] / (row["ms"][m] * 1e6) for m in MODES}
        # roofline time / measured time: 1.0 would be moving the counted bytes at copy speed
        row["roofline"] = {m: row["bytes"][m] / (copy_gbps * 1e9) / (row["ms"][m] * 1e-3)
                           for m in MODES}
        if ref is not None and row is not ref:
            row["fused_speedup"] = {m: row["ms"][m] / ref["ms"][m] for m in MODES}
        if torch_row is not None:
            v, v_ref = row["loss_value"], torch_row["loss_value"]
            row["rel_diff_vs_torch"] = abs(v - v_ref) / max(abs(v_ref), 1e-30)


def run_case(case: Case, providers: list[Provider], timer: Timer, copy_gbps: float) -> list[dict]:
    """Every provider on the same inputs (drawn from the same seed before each one)."""
    sets = []
    try:
        n_sets = n_input_sets(case, cache_bytes(case.device))
        sets = [make_inputs(case) for _ in range(n_sets)]
        rows = [run_provider(p, case, sets, timer) for p in providers]
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        reason = f"inputs do not fit: {str(e).splitlines()[0][:200]}"
        rows = [skipped_row(case, p, "skipped-oom", reason) for p in providers]
    except Exception as e:  # making the inputs failed: every provider's row says why
        traceback.print_exc(file=sys.stderr)
        rows = [skipped_row(case, p, "error", f"inputs: {type(e).__name__}: {e}"[:500])
                for p in providers]
    finally:
        sets = None
        free_memory()
    add_figures(rows, case, copy_gbps)
    return rows


def skipped_row(case: Case, provider: Provider, status: str, reason: str) -> dict:
    return {"case": case.to_json(), "provider": provider.name, "status": status,
            "reason": reason}
