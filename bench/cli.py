"""``python -m bench``: the throughput sweep, and ``python -m bench render``.

The sweep times every provider of each loss on the same inputs in one process and writes
<gpu>-<date>.json (every figure), .md (tables) and .png (plots) under --out. On CUDA it is the
full sweep against the peers; without a GPU, a small CPU sweep of the eager fallback against
torch (its overhead) that finishes in well under a minute.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

from . import harness, meta, report
from .cases import BYTE_COUNTS, DTYPE_ALIASES, DTYPES, LOSS_ALIASES, LOSSES, Case, build_cases
from .providers import REGISTRY, all_names, providers_for

DEFAULT_OUT = meta.ROOT / "bench" / "out"

EPILOG = """\
outputs (under --out): <gpu>-<date>.json, .md and .png, e.g. h100-80gb-hbm3-2026-11-22.json;
`--out bench/results` writes the files that are committed.

re-render:
  python -m bench render [JSON] [--out DIR] [--readme PATH | --no-readme]
      re-writes the .md and .png of JSON (default: the newest bench/results/*.json) into DIR
      (default: the JSON's folder), then regenerates README.md's section between
      <!-- bench:begin --> and <!-- bench:end --> from the newest bench/results/*.json.

exit status: 0, or 1 when a provider raised an error (skips are not errors), 130 when
interrupted (the results so far are still written).
"""


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v for value in values for v in value.split(",") if v.strip()]


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[1],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="a few shapes per loss, the main dtype only, shorter timing")
    p.add_argument("--loss", action="append", metavar="LOSS",
                   help=f"losses to run (repeat or comma-separate): {', '.join(LOSSES)} "
                        "(aliases ce, huber_loss, binary_cross_entropy_with_logits); "
                        "default all")
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help=f"input dtypes: {', '.join(DTYPES)} (or bf16, fp32, fp16); default: "
                        "bfloat16 and float32 (CPU: float32, and bfloat16 for cross-entropy)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="folder for the JSON, Markdown and PNG (default: bench/out, "
                        "git-ignored); bench/results for results to commit")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available, else the CPU sweep")
    p.add_argument("--providers", action="append", metavar="NAME",
                   help=f"only these providers: {', '.join(all_names())}")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new shape after this many seconds; the rest are reported "
                        "as skipped-time (headline shapes run first)")
    return p


def render_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench render",
                                description="Re-render a results JSON and the README section.")
    p.add_argument("json", nargs="?", type=Path,
                   help="results JSON (default: the newest bench/results/*.json)")
    p.add_argument("--out", type=Path, help="folder for the .md and .png (default: the JSON's)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--readme", type=Path, default=meta.ROOT / "README.md",
                       help="README to update (default: the checkout's README.md)")
    group.add_argument("--no-readme", action="store_true", help="leave the README alone")
    return p


# ------------------------------------------------------------------------------------------
# progress: tqdm on a terminal, one line per shape otherwise (logs stay readable)
# ------------------------------------------------------------------------------------------


class LineProgress:
    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.monotonic()

    def set_postfix_str(self, text: str) -> None:
        print(f"[{self.done + 1}/{self.total} {time.monotonic() - self.start:5.0f}s] {text}",
              file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


def progress(total: int):
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(total=total, unit="shape", dynamic_ncols=True)
        except ImportError:
            pass
    return LineProgress(total)


# ------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return choice


def _cpu_backend_guard() -> None:
    """The CPU sweep measures the eager fallback: never the Triton interpreter."""
    if os.environ.get("FUSED_LOSSES_BACKEND", "auto").strip().lower() == "triton":
        print("FUSED_LOSSES_BACKEND=triton ignored: the CPU sweep measures the eager fallback")
        os.environ["FUSED_LOSSES_BACKEND"] = "auto"


def new_run(device: str, args, settings: harness.Settings, copy_gbps: float) -> dict:
    dev = meta.device_info(device)
    return {
        "schema": 1,
        "date": meta.now(),
        "command": meta.command_line(),
        "device": dev,
        "versions": meta.versions(),
        "git": meta.git_info(),
        "settings": {"quick": args.quick, "warmup_ms": settings.warmup_ms,
                     "rep_ms": settings.rep_ms, "time_budget_s": args.time_budget},
        "copy_bandwidth_gbps": copy_gbps,
        "method": harness.METHOD,
        "bytes_counted": BYTE_COUNTS,
        "providers": {loss: {name: {"description": p.description,
                                    "grad_in_forward": p.grad_in_forward and device == "cuda"}
                             for name, p in table.items()} for loss, table in REGISTRY.items()},
        "results": [],
        "complete": False,
        "elapsed_s": 0.0,
    }


def _case_line(case: Case, rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if r["status"] == "ok":
            x = r.get("fused_speedup", {}).get("fwd_bwd")
            parts.append(f"{r['provider']} {r['ms']['fwd_bwd']:.3f} ms"
                         + (f" ({x:.2f}x)" if x else ""))
        else:
            parts.append(f"{r['provider']} {r['status']}")
    return f"{case.loss} {case.dtype} {case.label}: " + "; ".join(parts)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def sweep(args) -> int:
    device = _device(args.device)
    if device == "cpu":
        _cpu_backend_guard()
    losses = [_resolve(v, LOSS_ALIASES, LOSSES) for v in _split(args.loss) or []] or None
    dtypes = [_resolve(v, DTYPE_ALIASES, DTYPES) for v in _split(args.dtype) or []] or None
    names = [_resolve(v, {}, all_names()) for v in _split(args.providers) or []] or None
    cases = build_cases(device, args.quick, losses, dtypes)
    settings = harness.settings_for(device, args.quick)
    timer = harness.make_timer(device, settings)
    start = time.monotonic()
    copy_gbps = harness.copy_bandwidth(timer, (1 << 30) if device == "cuda" else (64 << 20)) / 1e9
    run = new_run(device, args, settings, copy_gbps)
    json_path = args.out / f"{meta.stem(run)}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{run['device']['name']}: {len(cases)} shapes, copy bandwidth {copy_gbps:.0f} GB/s; "
          f"writing {json_path}", flush=True)
    # `timeout` (SIGTERM) stops the sweep like Ctrl-C: the results so far are still written
    old_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    bar, status = progress(len(cases)), 0
    try:
        for i, case in enumerate(cases):
            providers = providers_for(case.loss, names)
            if args.time_budget is not None and time.monotonic() - start > args.time_budget:
                _skip_rest(run, cases[i:], names, "skipped-time",
                           f"time budget of {args.time_budget:.0f} s used up")
                break
            bar.set_postfix_str(f"{case.loss} {case.dtype} {case.label}")
            rows = harness.run_case(case, providers, timer, copy_gbps)
            run["results"] += rows
            bar.write(_case_line(case, rows))
            bar.update(1)
            run["elapsed_s"] = round(time.monotonic() - start, 1)
            report.write_json(run, json_path)  # a killed run still leaves its results
        else:
            run["complete"] = True
    except KeyboardInterrupt:
        done = {(r["case"]["loss"], tuple(r["case"]["shape"]), r["case"]["dtype"])
                for r in run["results"]}
        rest = [c for c in cases if (c.loss, c.shape, c.dtype) not in done]
        _skip_rest(run, rest, names, "skipped-time", "interrupted")
        status = 130
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, old_handler)
    run["elapsed_s"] = round(time.monotonic() - start, 1)
    for path in report.write_reports(run, args.out):
        print(f"wrote {path}")
    print(report.summary(run))
    errors = any(r["status"] == "error" for r in run["results"])
    return status or (1 if errors else 0)


def _skip_rest(run: dict, cases: list[Case], names, status: str, reason: str) -> None:
    for case in cases:
        run["results"] += [harness.skipped_row(case, p, status, reason)
                           for p in providers_for(case.loss, names)]


def _resolve(value: str, aliases: dict, valid) -> str:
    key = value.strip().lower()
    key = aliases.get(key, key)
    if key not in valid:
        raise SystemExit(f"unknown {value!r}: choose from {', '.join(valid)}")
    return key


# ------------------------------------------------------------------------------------------
# render
# ------------------------------------------------------------------------------------------


def render(args) -> int:
    path = args.json or report.newest_result()
    if path is not None:
        run = report.load(path)
        out = args.out or Path(path).parent
        for written in report.write_reports(run, out):
            print(f"wrote {written}")
        print(report.summary(run))
    else:
        print(f"no results in {report.RESULTS_DIR}: nothing to re-render")
    if not args.no_readme:
        print(report.update_readme(args.readme))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["render"]:
        return render(render_parser().parse_args(argv[1:]))
    return sweep(sweep_parser().parse_args(argv))
