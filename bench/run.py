"""``python -m bench``: every provider of every case, timed interleaved, and the results written.

For each case the providers are built on the same inputs, run once untimed (compilation, lazy
initialisation; the loss values are compared), then timed round-robin: every round times each
provider once, in an order rotated from round to round, until the case's time is used up (at
least ``min_rounds`` rounds), so a machine that slows down or speeds up during a case affects
every provider alike. A sample is one call on the CPU (``time.perf_counter``) and a
``triton.testing.do_bench`` run on CUDA (CUDA events, L2 flushed before each call). Peak
memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU a fresh process per case, the
growth of its resident-set high-water mark over one step of each provider (``cpu_peaks``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from . import report
from .cases import LOSSES, Case, Skip, build_cases, make_inputs

ROOT = Path(__file__).resolve().parent.parent
# (seconds of timing per case, least rounds, most rounds, ms of do_bench per CUDA sample)
SETTINGS = {("cuda", False): (2.0, 5, 20, 25), ("cuda", True): (1.0, 5, 10, 20),
            ("cpu", False): (5.0, 5, 1000, 0), ("cpu", True): (2.0, 5, 1000, 0)}
PEERS = ("liger-kernel", "flash-attn", "quack-kernels", "cut-cross-entropy", "transformers")


# ------------------------------------------------------------------------------------------
# where: the device as a person names it, versions, commit
# ------------------------------------------------------------------------------------------


def _cmd(*args: str) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1] for line in f if line.startswith("model name")]
    except OSError:
        names = []
    name = names[0] if names else platform.processor() or platform.machine() or "CPU"
    return re.sub(r"\s+", " ", re.sub(r"\((R|TM)\)|\bCPU\b", "", name, flags=re.I)).strip()


def device_info(device: str) -> dict:
    if device == "cpu":
        threads = torch.get_num_threads()
        return {"type": "cpu", "name": f"{cpu_model()}, {threads} threads", "model": cpu_model(),
                "threads": threads, "logical_cpus": os.cpu_count()}
    p = torch.cuda.get_device_properties(0)
    driver = _cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return {"type": "cuda", "name": p.name, "driver": driver and driver.splitlines()[0],
            "cuda": torch.version.cuda, "capability": f"{p.major}.{p.minor}",
            "memory_gb": round(p.total_memory / 1e9, 1), "sms": p.multi_processor_count}


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "fused_losses", *PEERS):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def git_info() -> dict:
    """The GPU machine gets a copy of the tree without .git: BENCH_GIT_COMMIT says which."""
    status = _cmd("git", "status", "--porcelain", "--untracked-files=no")
    return {"commit": os.environ.get("BENCH_GIT_COMMIT") or _cmd("git", "rev-parse", "HEAD")
            or "unknown", "dirty": None if status is None else bool(status)}


def stem(device: dict, when: datetime.datetime) -> str:
    """'NVIDIA H100 80GB HBM3' -> h100-80gb-hbm3-2026-11-22-101500 (UTC); a CPU:
    cpu-<model>-...: every run its own files."""
    name = device["name"] if device["type"] == "cuda" else f"cpu {device['model']}"
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"^nvidia\s+", "", name.lower())).strip("-")
    return f"{slug}-{when:%Y-%m-%d-%H%M%S}"


# ------------------------------------------------------------------------------------------
# timing and peak memory
# ------------------------------------------------------------------------------------------


def sample(device: str, step, rep_ms: float) -> list[float]:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(step, warmup=1, rep=rep_ms, return_mode="all")
    start = time.perf_counter()
    step()
    return [(time.perf_counter() - start) * 1e3]


def copy_gbps() -> float:
    """The roofline's bandwidth on CUDA: a 1 GiB copy, bytes read + written, in GB/s."""
    from triton.testing import do_bench

    src = torch.randn(1 << 28, device="cuda")  # random, never zeros
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


def round_robin(steps: dict, device: str, settings, rows: dict) -> dict[str, list[float]]:
    """Samples of every step, interleaved, for ``seconds`` and at least ``min_rounds`` rounds
    (at least 3 where those take over 5x ``seconds``); a step that fails is dropped with an
    error row."""
    seconds, min_rounds, max_rounds, rep_ms = settings
    samples = {name: [] for name in steps}
    start, r = time.perf_counter(), 0
    while steps:
        spent = time.perf_counter() - start
        if r >= max_rounds or r >= 3 and (spent > 5 * seconds or
                                          r >= min_rounds and spent > seconds):
            break
        names = list(steps)
        for name in names[r % len(names):] + names[: r % len(names)]:
            try:
                samples[name] += sample(device, steps[name], rep_ms)
            except Exception as e:
                rows[name].update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
                del steps[name]
        r += 1
    return samples


def cuda_peak(step) -> int:
    """Peak bytes allocated over one step beyond what was allocated before it (the inputs)."""
    for t in step.leaves:
        t.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cpu_peaks(case: Case, providers: list[str]) -> dict[str, int | str]:
    """Peak bytes beyond the inputs of each provider (or why not), from a fresh process."""
    found: dict[str, int | str] = {}
    # glibc then hands every freed buffer of 64 KiB or more back at once, so the resident set
    # returns to the inputs between providers
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    while len(found) < len(providers):
        todo = [p for p in providers if p not in found]
        spec = json.dumps({"case": case.to_json(), "providers": todo})
        try:
            out = subprocess.run([sys.executable, "-m", "bench", "_peak", spec], cwd=ROOT,
                                 env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            why = "the process took over 900 s"
        else:
            try:
                got = json.loads(out.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):  # e.g. no /proc/self/status: not Linux
                got = {}
            found.update(got)
            if got:
                continue
            why = (out.stderr.strip().splitlines() or ["nothing measured"])[-1]
        return {**found, **{p: f"peak memory: {why}"[:200] for p in todo}}
    return found


def _status(key: str) -> int:
    """VmRSS or VmHWM of this process in bytes (Linux; VmHWM, unlike ru_maxrss, starts afresh
    at exec instead of inheriting the parent's size)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def peak_child(spec: str) -> int:
    """In a fresh process: the inputs and every provider built; one step of each on a tiny
    copy of the case (first-call costs); then per provider the resident set's high-water mark
    reset, one step, and its growth over the resident set before the step printed. Without a
    reset (a kernel before Linux 4.0) only the first provider is measured."""
    spec = json.loads(spec)
    case = Case.from_json(spec["case"])
    providers = LOSSES[case.loss].providers
    inputs, steps, found = make_inputs(case), {}, {}
    caps = (2, 16, 64, 512)[: len(case.shape)]
    tiny = Case(case.loss, tuple(map(min, case.shape, caps)), case.dtype, case.device)
    small = make_inputs(tiny)
    for name in spec["providers"]:
        try:
            providers[name].build(tiny, small)()
            steps[name] = providers[name].build(case, inputs)
        except Exception as e:
            found[name] = f"peak memory: {type(e).__name__}: {e}"[:200]
    del small
    for i, (name, step) in enumerate(steps.items()):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM back to the resident set (Linux >= 4.0)
        except OSError:
            if i:
                break
        before = _status("VmRSS")
        step()
        found[name] = max(0, _status("VmHWM") - before)
        for t in step.leaves:
            t.grad = None
    print(json.dumps(found))
    return 0


# ------------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------------


def _row(case: Case, provider: str, status="ok", reason="") -> dict:
    return {"case": case.to_json(), "provider": provider, "status": status, "reason": reason}


def _fail(row: dict, e: BaseException) -> None:
    oom = isinstance(e, torch.cuda.OutOfMemoryError)
    row.update(status="skipped-oom" if oom else "error",
               reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])


def run_case(case: Case, names, settings) -> list[dict]:
    providers = [p for n, p in LOSSES[case.loss].providers.items() if not names or n in names]
    rows = {p.name: _row(case, p.name) for p in providers}
    steps = {}
    try:
        inputs = make_inputs(case)
    except Exception as e:  # inputs that do not fit: every row says so
        for row in rows.values():
            _fail(row, e)
        return list(rows.values())
    for p in providers:
        row = rows[p.name]
        try:
            if case.device not in p.devices:
                raise Skip("CUDA only" if p.devices == ("cuda",) else f"not on {case.device}")
            start = time.perf_counter()
            step = p.build(case, inputs)
            loss = step()  # compilation and first-call costs stay out of the timing
            if case.device == "cuda":
                torch.cuda.synchronize()
            row["warmup_s"] = round(time.perf_counter() - start, 3)
            row["loss"] = None if loss is None else float(loss.detach().float())
            if case.device == "cuda":
                row["peak_bytes"] = cuda_peak(step)
            steps[p.name] = step
        except Skip as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:
            _fail(row, e)
            gc.collect()
            if case.device == "cuda":
                torch.cuda.empty_cache()
    for name, times in round_robin(steps, case.device, settings, rows).items():
        if rows[name]["status"] == "ok":
            rows[name]["ms"] = times
    del steps, inputs
    gc.collect()
    if case.device == "cuda":
        torch.cuda.empty_cache()
    else:  # in a fresh process, after the timing
        measured = [name for name, row in rows.items() if row["status"] == "ok"]
        for name, peak in (cpu_peaks(case, measured) if measured else {}).items():
            rows[name]["peak_bytes" if isinstance(peak, int) else "reason"] = peak
    return list(rows.values())


# ------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------


def _list(values):
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()] or None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description="Times every provider of every case, "
        "interleaved, with its peak memory; writes JSON, Markdown and PNG.",
        epilog="python -m bench render [JSON] [--no-readme]: re-writes JSON's .md and .png "
               "(default: the newest bench/results/*.json), then README.md's section between "
               "<!-- bench:begin --> and <!-- bench:end --> from the newest bench/results/*.json."
               " Exit status: 1 when a provider raised an error, 130 when interrupted (what "
               "was measured is still written).")
    p.add_argument("--quick", action="store_true",
                   help="fewer and smaller shapes, the main dtype, a shorter time per case")
    p.add_argument("--loss", action="append", metavar="LOSS",
                   help=f"only these (repeat or comma-separate): {', '.join(LOSSES)}")
    p.add_argument("--dtype", action="append", metavar="DTYPE", help="only these dtypes")
    p.add_argument("--providers", action="append", metavar="NAME", help="only these providers")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto (default): CUDA when there is a GPU, else the CPU")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out",
                   help="folder for <device>-<date-time>.json/.md/.png (default: bench/out, "
                        "git-ignored)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no case after this many seconds (the shapes with targets run "
                        "first); the rest are reported as skipped-time")
    p.add_argument("--seconds-per-case", type=float, metavar="S",
                   help="timing rounds per case continue until S seconds (default: CUDA 2, "
                        "CPU 5; --quick 1 and 2)")
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def sweep(args) -> int:
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and os.environ.get("FUSED_LOSSES_BACKEND", "").lower() == "triton":
        print("FUSED_LOSSES_BACKEND=triton ignored: on the CPU the eager path is measured")
        os.environ["FUSED_LOSSES_BACKEND"] = "auto"  # the peak-memory processes inherit it
    cases = build_cases(device, args.quick, _list(args.loss), _list(args.dtype))
    settings = list(SETTINGS[device, args.quick])
    if args.seconds_per_case is not None:
        settings[0] = args.seconds_per_case
    names = _list(args.providers)
    when = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    run = {"schema": 2, "date": when.isoformat(), "command": " ".join(
        ["python -m bench", *sys.argv[1:]]), "device": device_info(device),
        "versions": versions(), "git": git_info(), "settings": dict(zip(
            ("seconds_per_case", "min_rounds", "max_rounds", "cuda_sample_ms"), settings,
            strict=True), quick=args.quick, time_budget_s=args.time_budget),
        "copy_gbps": None, "results": [], "complete": False, "elapsed_s": 0}
    args.out.mkdir(parents=True, exist_ok=True)
    path, n = args.out / f"{stem(run['device'], when)}.json", 1
    while path.exists() or path.with_suffix(".md").exists():  # never overwrite a result
        n += 1
        path = args.out / f"{stem(run['device'], when)}-{n}.json"
    start = time.monotonic()
    if device == "cuda":
        run["copy_gbps"] = copy_gbps()
    print(f"{run['device']['name']}: {len(cases)} cases; writing {path}", flush=True)
    old = signal.signal(signal.SIGTERM, _interrupt)  # `timeout` stops it like Ctrl-C
    status = 0
    try:
        from tqdm import tqdm

        bar = tqdm(cases, unit="case", disable=not sys.stderr.isatty(), leave=False)
        write, postfix = bar.write, bar.set_postfix_str
    except ImportError:
        bar, write, postfix = cases, print, str
    try:
        for case in bar:
            if args.time_budget is not None and time.monotonic() - start > args.time_budget:
                break
            postfix(f"{case.loss} {case.dtype} {case.label}")
            rows = run_case(case, names, settings)
            run["results"] += rows
            write(report.case_line(run, rows))
            sys.stdout.flush()
            run["elapsed_s"] = round(time.monotonic() - start)
            report.write_json(run, path)  # a killed run still leaves what it measured
        else:
            run["complete"] = True
    except KeyboardInterrupt:
        status = 130
    finally:
        signal.signal(signal.SIGTERM, old)
    done = {(r["case"]["loss"], tuple(r["case"]["shape"]), r["case"]["dtype"])
            for r in run["results"]}
    for case in cases:
        if (case.loss, case.shape, case.dtype) not in done:
            why = "interrupted" if status else f"time budget of {args.time_budget:.0f} s used"
            run["results"] += [_row(case, p, "skipped-time", why)
                               for p in LOSSES[case.loss].providers if not names or p in names]
    run["elapsed_s"] = round(time.monotonic() - start)
    for written in report.write_all(run, path):
        print(f"wrote {written}")
    print(report.summary(run))
    return status or int(any(r["status"] == "error" for r in run["results"]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_peak"]:
        return peak_child(argv[1])
    if argv[:1] == ["render"]:
        p = argparse.ArgumentParser(prog="python -m bench render")
        p.add_argument("json", nargs="?", type=Path, help="default: the newest results")
        p.add_argument("--out", type=Path, help="folder for .md/.png (default: the JSON's)")
        p.add_argument("--no-readme", action="store_true", help="leave README.md alone")
        args = p.parse_args(argv[1:])
        return report.render(args.json, args.out, None if args.no_readme else ROOT / "README.md")
    return sweep(parser().parse_args(argv))
