"""Results out: the JSON (every figure), the Markdown tables, the PNG plots, the short summary
printed at the end of a run, and the README's benchmark section."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .cases import LOSSES, Case, case_from_json, min_bytes, plot_point, sort_key
from .meta import ROOT, stem
from .providers import REFERENCE, REGISTRY

README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"
RESULTS_DIR = ROOT / "bench" / "results"
LOSS_VALUE_TOLERANCE = 2e-2  # bf16 losses round at ~4e-3: a larger gap means a wrong call
STATUS_ORDER = ("ok", "skipped", "skipped-oom", "skipped-time", "error")


# ------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------


def write_json(run: dict, path: Path) -> None:
    """Atomically (a killed run leaves the last complete JSON, never half of one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(run, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_reports(run: dict, out: Path) -> list[Path]:
    """<stem>.json, <stem>.md and (with matplotlib) <stem>.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / stem(run)
    written = [base.with_suffix(".json"), base.with_suffix(".md")]
    write_json(run, written[0])
    written[1].write_text(markdown(run))
    png = base.with_suffix(".png")
    if plot(run, png):
        written.append(png)
    return written


# ------------------------------------------------------------------------------------------
# grouping and formatting
# ------------------------------------------------------------------------------------------


def groups(run: dict) -> list[tuple[str, str, list[dict]]]:
    """(loss, dtype, rows) in the registry's loss order, rows by shape then provider."""
    order = {name: i for i, name in enumerate(LOSSES)}
    found: dict[tuple[str, str], list[dict]] = {}
    for row in run["results"]:
        c = row["case"]
        found.setdefault((c["loss"], c["dtype"]), []).append(row)
    out = []
    for (loss, dtype), rows in sorted(found.items(), key=lambda kv: order.get(kv[0][0], 99)):
        names = list(REGISTRY.get(loss, {}))
        rows.sort(key=lambda r: (sort_key(_case(r)),
                                 names.index(r["provider"]) if r["provider"] in names else 99))
        out.append((loss, dtype, rows))
    return out


def _case(row: dict) -> Case:
    return case_from_json(row["case"])


def _ms(x) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _gb(n) -> str:
    return "–" if n is None else f"{n / 1e9:.2f} GB"


def _peak(row: dict) -> str:
    peak = row.get("peak_extra_bytes")
    if peak is None:
        return "n/a" if row["status"] == "ok" else "–"
    return f"{_gb(peak)} ({peak / _case(row).input_bytes():.2f}×)"


def _speedup(row: dict, mode: str = "fwd_bwd") -> str:
    if row["provider"] == REFERENCE:
        return "—"
    x = row.get("fused_speedup", {}).get(mode)
    return "–" if x is None else f"{x:.2f}×"


def floor_ms(case: Case, copy_gbps: float) -> float:
    """The roofline time of forward+backward: counted bytes over the copy bandwidth."""
    return min_bytes(case).bytes_for("fwd_bwd") / (copy_gbps * 1e9) * 1e3


def _note(row: dict) -> str:
    if row["status"] != "ok":  # a reason may quote an error message: keep the table whole
        return f"{row['status']}: {row['reason']}".replace("|", "\\|").replace("\n", " ")
    diff = row.get("rel_diff_vs_torch")
    if diff is not None and diff > LOSS_VALUE_TOLERANCE:
        return f"⚠ loss differs from torch's by {diff:.1e}"
    return ""


def _table(header: list[str], body: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _uniformly_skipped(rows: list[dict]) -> dict[str, str]:
    """Providers skipped for the same reason at every shape of a group: said once, below the
    table, instead of in every row."""
    by_provider: dict[str, set] = {}
    for row in rows:
        key = (row["status"], row["reason"]) if row["status"] == "skipped" else None
        by_provider.setdefault(row["provider"], set()).add(key)
    return {p: next(iter(keys))[1] for p, keys in by_provider.items()
            if len(keys) == 1 and None not in keys}


# ------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------


def _header(run: dict) -> list[str]:
    d, v, g = run["device"], run["versions"], run["git"]
    peers = ", ".join(f"{k} {x}" for k, x in v.items()
                      if k not in ("python", "torch", "triton", "fused_losses")) or "none"
    device = d["name"] + (f", driver {d.get('driver')}, CUDA {d.get('cuda')}"
                          if d["type"] == "cuda" else " (CPU)")
    dirty = " (uncommitted changes)" if g.get("dirty") else ""
    lines = [
        f"- device: {device}",
        f"- versions: Python {v['python']}, torch {v['torch']}, triton {v.get('triton')}, "
        f"fused_losses {v['fused_losses']}; peers installed: {peers}",
        f"- commit: {g['commit']}{dirty}; date: {run['date']}; command: `{run['command']}`",
        f"- copy bandwidth (device-to-device, bytes read + written): "
        f"{run['copy_bandwidth_gbps']:.0f} GB/s",
    ]
    if not run.get("complete", True):
        lines.append("- **incomplete run**: interrupted or time-boxed; see the skipped rows")
    if d["type"] != "cuda":
        lines.append("- CPU sweep: fused_losses here is its eager fallback, so the speed-up "
                     "column is torch's time over the fallback's (below 1: the overhead)")
    return lines


def _notes(run: dict) -> list[str]:
    m = run["method"]
    lines = ["## How these were measured", "",
             "- **bytes counted**: GB/s = bytes / time; roofline = (bytes / copy bandwidth) / "
             "time. Forward counts only the reads; backward and forward+backward the reads and "
             "the gradient's write:"]
    lines += [f"  - {LOSSES[loss].title}: {text}" for loss, text in run["bytes_counted"].items()]
    lines += [f"- **{label}**: {m[key]}" for label, key in (
        ("forward", "forward"), ("forward+backward", "forward_backward"),
        ("backward (†)", "backward"), ("peak memory", "peak_memory"),
        ("rotation", "rotation"), ("torch.compile", "torch.compile"))]
    lines += ["- **fused_losses ×**: the provider's forward+backward time over fused_losses's "
              "(above 1: fused_losses is faster)", "", "Providers:", ""]
    for loss, table in run["providers"].items():
        lines += [f"- {LOSSES[loss].title} / `{name}`: {p['description']}"
                  for name, p in table.items()]
    return lines


def _group_table(run: dict, rows: list[dict]) -> list[str]:
    collapsed = _uniformly_skipped(rows)
    gpu = run["device"]["type"] == "cuda"
    body, last_shape = [], None
    for row in rows:
        if row["provider"] in collapsed:
            continue
        case = _case(row)
        shape = ""
        if case.label != last_shape:
            shape = f"{case.label} (floor {_ms(floor_ms(case, run['copy_bandwidth_gbps']))} ms)"
            last_shape = case.label
        ms, ok = row.get("ms", {}), row["status"] == "ok"
        dagger = "†" if gpu and ok and run["providers"][case.loss][row["provider"]].get(
            "grad_in_forward") else ""
        body.append([
            shape, row["provider"], _ms(ms.get("fwd")), _ms(ms.get("bwd")) + dagger,
            _ms(ms.get("fwd_bwd")), "–" if not ok else f"{row['gbps']['fwd_bwd']:.3g}",
            _pct(row.get("roofline", {}).get("fwd_bwd")), _peak(row), _speedup(row), _note(row),
        ])
    header = ["shape", "provider", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd GB/s",
              "roofline", "peak beyond inputs", "fused_losses ×", "note"]
    lines = _table(header, body)
    if collapsed:
        lines += [""] + [f"Skipped: `{p}`: {reason}" for p, reason in collapsed.items()]
    return lines


def markdown(run: dict) -> str:
    title = f"# fused_losses benchmark: {run['device']['name']}, {run['date'][:10]}"
    lines = [title, "", *_header(run), ""]
    targets = target_lines(run)
    if targets:
        lines += ["## Targets", "", *[f"- {t}" for t in targets], ""]
    for loss, dtype, rows in groups(run):
        lines += [f"## {LOSSES[loss].title}, {dtype}", "", *_group_table(run, rows), ""]
    lines += _notes(run)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# the short summary (end of a run) and the README section: the headline shape of each group
# ------------------------------------------------------------------------------------------


def headline_rows(rows: list[dict]) -> list[dict]:
    """The rows of the group's headline shape, or of its largest shape with results."""
    spec = LOSSES[rows[0]["case"]["loss"]]
    measured = [r for r in rows if r["status"] == "ok"]
    pick = [r for r in measured if tuple(r["case"]["shape"]) == spec.headline]
    if not pick and measured:
        biggest = max(measured, key=lambda r: _case(r).numel())["case"]["shape"]
        pick = [r for r in measured if r["case"]["shape"] == biggest]
    shape = pick[0]["case"]["shape"] if pick else None
    return [r for r in rows if r["case"]["shape"] == shape]


def _headline_body(run: dict) -> list[list[str]]:
    body = []
    for loss, dtype, rows in groups(run):
        collapsed = _uniformly_skipped(rows)
        shown = [r for r in headline_rows(rows) if r["provider"] not in collapsed]
        for i, row in enumerate(shown):
            case = _case(row)
            floor = _ms(floor_ms(case, run["copy_bandwidth_gbps"]))
            what = f"{LOSSES[loss].title} {dtype} {case.label} (floor {floor} ms)" if i == 0 else ""
            ms = row.get("ms", {}).get("fwd_bwd")
            cells = [row["provider"], _ms(ms), _pct(row.get("roofline", {}).get("fwd_bwd")),
                     _peak(row), _speedup(row)]
            if row["status"] != "ok":
                cells[1] = row["status"]
            body.append([what, *cells])
    return body


# The targets, checked on every CUDA run: (loss, dtype, shape, fused_losses's
# forward+backward within this factor of the roofline time, providers it must beat (None:
# every other one)). Cross-entropy also has a peak-memory target: gradient + O(N).
TARGETS = (
    ("cross_entropy", "bfloat16", (8192, 128256), 1.3, None),
    ("bce", "float32", (16384, 16384), 1.2, ("torch", "torch.compile")),
    ("huber", "float32", (1 << 26,), 1.2, ("torch", "torch.compile")),
)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def target_lines(run: dict) -> list[str]:
    """Where fused_losses stands against each target, in words (CUDA runs only)."""
    if run["device"]["type"] != "cuda":
        return []
    lines = []
    for loss, dtype, shape, within, beat in TARGETS:
        rows = [r for r in run["results"] if r["case"]["loss"] == loss
                and r["case"]["dtype"] == dtype and tuple(r["case"]["shape"]) == shape]
        name = f"{LOSSES[loss].title} {dtype} {'x'.join(map(str, shape))}"
        ref = next((r for r in rows if r["provider"] == REFERENCE), None)
        if ref is None or ref["status"] != "ok":
            status = "not in this run" if ref is None else f"{ref['status']}: {ref['reason']}"
            lines.append(f"target {name}: not measured ({status[:120]})")
            continue
        over = 1 / ref["roofline"]["fwd_bwd"]
        lines.append(f"target {name}: fwd+bwd {over:.2f}x the roofline time (<= {within}x): "
                     f"{_met(over <= within)}")
        peers = [r for r in rows if r is not ref and r["status"] == "ok"
                 and (beat is None or r["provider"] in beat)]
        losing = [f"{r['provider']} {r['ms']['fwd_bwd']:.3f} ms" for r in peers
                  if r["ms"]["fwd_bwd"] <= ref["ms"]["fwd_bwd"]]
        names = ", ".join(r["provider"] for r in peers) or "no peer measured"
        lines.append(f"target {name}: faster than {names} (fused_losses "
                     f"{ref['ms']['fwd_bwd']:.3f} ms): {_met(not losing and bool(peers))}"
                     + (f"; not faster than {', '.join(losing)}" if losing else ""))
        if loss == "cross_entropy" and ref.get("peak_extra_bytes") is not None:
            # gradient + O(N): the row statistics, the loss, allocator rounding (2 MB blocks)
            limit = _case(ref).input_bytes() + 64 * shape[0] + (16 << 20)
            lines.append(f"target {name}: peak beyond the logits {_gb(ref['peak_extra_bytes'])}"
                         f" (<= gradient + O(N) = {_gb(limit)}): "
                         f"{_met(ref['peak_extra_bytes'] <= limit)}")
    return lines


def summary(run: dict) -> str:
    """A short plain-text table for the end of a log: headline shapes and status counts."""
    header = ["case", "provider", "fwd+bwd ms", "roofline", "peak beyond inputs",
              "fused_losses ×"]
    body = _headline_body(run)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    lines = [f"== {run['device']['name']}, {run['date'][:10]}: copy bandwidth "
             f"{run['copy_bandwidth_gbps']:.0f} GB/s; headline shapes, forward+backward ==",
             fmt.format(*header)] + [fmt.format(*r) for r in body]
    counts = {s: 0 for s in STATUS_ORDER}
    for row in run["results"]:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines.append("rows: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    lines += target_lines(run)
    lines += [f"ERROR {r['provider']} {r['case']['loss']} {r['case']['dtype']} "
              f"{_case(r).label}: {r['reason'][:200]}" for r in run["results"]
              if r["status"] == "error"]
    return "\n".join(lines)


def readme_section(run: dict | None, md_name: str | None, results_dir: Path = RESULTS_DIR) -> str:
    if run is None:
        return ("No GPU results yet: `bench/gpu_check.sh` writes them on a GPU machine "
                "(see CONTRIBUTING.md).")
    d, v = run["device"], run["versions"]
    where = d["name"] + (f" (driver {d.get('driver')})" if d["type"] == "cuda" else "")
    lines = [
        f"Measured on **{where}** on {run['date'][:10]} with torch {v['torch']}, triton "
        f"{v.get('triton')}, commit {run['git']['commit'][:12]}; generated by "
        f"`python -m bench render` from [`bench/results/{md_name}`](bench/results/{md_name}), "
        "which has every shape, the forward and backward times and how they were measured.",
        "",
        f"Forward+backward, median ms. Roofline: the counted bytes (inputs read once, gradient "
        f"written once) over the copy bandwidth measured in the same run "
        f"({run['copy_bandwidth_gbps']:.0f} GB/s); 100% is the floor. fused_losses ×: the "
        "provider's time over fused_losses's.",
        "",
    ]
    header = ["case", "provider", "fwd+bwd ms", "roofline", "peak memory beyond inputs "
              "(× input size)", "fused_losses ×"]
    lines += _table(header, _headline_body(run))
    png = Path(md_name).with_suffix(".png").name
    if (results_dir / png).exists():
        lines += ["", f"![benchmark plots](bench/results/{png})"]
    return "\n".join(lines)


def newest_result(results_dir: Path = RESULTS_DIR) -> Path | None:
    """The newest results JSON by its recorded date, GPU runs before CPU ones."""
    runs = []
    for path in results_dir.glob("*.json"):
        try:
            run = load(path)
            runs.append((run["device"]["type"] == "cuda", run["date"], path))
        except (ValueError, KeyError, OSError):
            continue
    return max(runs)[2] if runs else None


def update_readme(readme: Path, results_dir: Path = RESULTS_DIR) -> str:
    """Rewrite the README between the bench markers from the newest results; returns what
    it did, in words."""
    if not readme.exists():
        return f"{readme} does not exist: nothing updated"
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return f"{readme} has no {README_BEGIN} ... {README_END} markers: left unchanged"
    newest = newest_result(results_dir)
    run = load(newest) if newest else None
    body = readme_section(run, newest.with_suffix(".md").name if newest else None, results_dir)
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{body}\n{README_END}{tail}")
    source = f"from {newest}" if newest else f"saying there are no results yet in {results_dir}"
    return f"{readme}: benchmark section regenerated {source}"


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------


def _series(rows: list[dict]) -> tuple[str, dict[str, list[tuple[int, dict]]]]:
    """The plotted series of a group (cross-entropy: the N with the most measured shapes,
    N=8192 on ties) as {provider: [(x, row)]}."""
    ok = [r for r in rows if r["status"] == "ok"]
    counts: dict[str, int] = {}
    for r in ok:
        key = plot_point(_case(r))[0]
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return "", {}
    best = max(counts, key=lambda k: (counts[k], k == "N=8192"))
    lines: dict[str, list[tuple[int, dict]]] = {}
    for r in ok:
        key, x = plot_point(_case(r))
        if key == best:
            lines.setdefault(r["provider"], []).append((x, r))
    return best, {p: sorted(v, key=lambda t: t[0]) for p, v in lines.items()}


def _color(provider: str):
    """One color per provider in every panel and every run."""
    names = [n for table in REGISTRY.values() for n in table]
    names = list(dict.fromkeys(names))
    return f"C{names.index(provider) % 10}" if provider in names else "k"


def _tick(x: int) -> str:
    if x >= 1 << 20 and x & (x - 1) == 0:
        return f"2^{x.bit_length() - 1}"
    return f"{x / 1e6:.0f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"


def _plot_group(axes, loss: str, dtype: str, rows: list[dict]) -> None:
    ax_ms, ax_roof, ax_mem = axes
    series, lines = _series(rows)
    title = f"{LOSSES[loss].title} {dtype}" + (f", {series}" if series else "")
    xs_all = sorted({x for points in lines.values() for x, _ in points})
    for provider, points in lines.items():
        xs = [x for x, _ in points]
        style = {"marker": "o", "label": provider, "color": _color(provider)}
        ax_ms.plot(xs, [r["ms"]["fwd_bwd"] for _, r in points], **style)
        ax_roof.plot(xs, [r["roofline"]["fwd_bwd"] for _, r in points], **style)
    for ax, ylabel in ((ax_ms, "fwd+bwd ms"), (ax_roof, "fraction of roofline")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [_tick(x) for x in xs_all], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel(LOSSES[loss].x_label)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    ax_roof.axhline(1.0, color="grey", ls="--", lw=0.8)  # the copy bandwidth
    if lines:
        ax_ms.legend(fontsize=7)
    head = [r for r in headline_rows(rows) if r["status"] == "ok"
            and r.get("peak_extra_bytes") is not None]
    if not head:
        ax_mem.axis("off")
        ax_mem.text(0.5, 0.5, "peak memory: measured on CUDA only", ha="center")
        return
    ax_mem.bar([r["provider"] for r in head], [r["peak_extra_bytes"] / 1e9 for r in head],
               color=[_color(r["provider"]) for r in head])
    ax_mem.axhline(_case(head[0]).input_bytes() / 1e9, color="grey", ls="--",
                   label="one input-sized buffer")
    ax_mem.legend(fontsize=7)
    ax_mem.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax_mem.set_title(f"peak memory beyond inputs, {_case(head[0]).label}", fontsize=9)
    ax_mem.set_ylabel("GB")


def plot(run: dict, path: Path) -> bool:
    """One PNG: per (loss, dtype) row, ms and fraction of the roofline against size (one line
    per provider), and peak-memory bars at the headline shape. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install -e '.[bench]')")
        return False
    found = groups(run)
    if not found:
        return False
    fig, axes = plt.subplots(len(found), 3, figsize=(16, 3.6 * len(found)), squeeze=False)
    for row_axes, (loss, dtype, rows) in zip(axes, found, strict=True):
        _plot_group(row_axes, loss, dtype, rows)
    fig.suptitle(f"fused_losses benchmark: {run['device']['name']}, {run['date'][:10]}")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
