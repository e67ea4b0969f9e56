"""Results out: the JSON (every sample), the Markdown tables, the PNG, the summary printed at
the end of a run and README.md's benchmark section. Every figure derived from the samples
(median, p20-p80, ratios, the roofline) is computed here, from the JSON, so a re-render gives
the same numbers."""

from __future__ import annotations

import json
import os
import statistics
import textwrap
from pathlib import Path

from .cases import DTYPES, LOSSES, TARGETS, Case, Target

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
PROVIDERS = list(dict.fromkeys(n for loss in LOSSES.values() for n in loss.providers))
REFERENCES = ("3 GEMMs", "4 GEMMs")  # the GEMMs alone: black, dashed
COLORED = [n for n in PROVIDERS if n not in REFERENCES]  # one colour each, in every picture
METHOD = """\
- **Time**: a training step (gradients set to None, forward, `backward()`), median and p20–p80
  of the samples. Each provider runs once untimed first (compilation, first-call costs), then
  the providers are timed round-robin, one sample each per round, the order rotated every
  round, for the seconds per case of the header (and at least its fewest rounds). A sample is
  one call timed with `time.perf_counter` on the CPU (no cache flush), a
  `triton.testing.do_bench` run on CUDA (CUDA events, L2 flushed before each call).
- **Ratios** are medians over medians. Where the two providers' p20–p80 ranges overlap the
  ratio is printed *within noise*: no speed-up is claimed. A target is *within noise* when the
  range of the ratio (one's p20 over the other's p80 to one's p80 over the other's p20)
  straddles it.
- **Peak memory beyond the inputs**: CUDA: `torch.cuda.max_memory_allocated()` over one step
  less what was allocated before it. CPU: a fresh process per case makes the inputs (drawn in
  place in their own dtype, so making them raises no high-water mark) and every provider, runs
  each once on a tiny copy of the case (first-call costs), then per provider resets the
  resident set's high-water mark (`/proc/self/clear_refs`), runs one step and takes the growth
  of `VmHWM` over the resident set before it; glibc is told to return freed buffers of 64 KiB
  and more at once (`MALLOC_MMAP_THRESHOLD_`), so each provider starts from the inputs alone.
  Gradients and temporaries count, the inputs (and model weights) do not.
- **Roofline** (CUDA, memory-bound losses): the fewest bytes a step moves (each input read
  once, the gradient written once) over the device-to-device copy bandwidth measured in the
  same run (`do_bench` of a 1 GiB copy, bytes read + written). None on the CPU.
- **Same inputs**: every provider of a case runs on the same tensors (Liger, which writes its
  gradient into the logits, on its own copy). On the CPU fused_losses runs its eager path.
"""


# ------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------


def write_json(run: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # atomic: a killed run never leaves half a file
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    os.replace(tmp, path)


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def ok(row: dict | None) -> bool:
    return bool(row) and row["status"] == "ok" and bool(row.get("ms"))


def stat(row: dict) -> tuple[float, float, float]:
    """(median, p20, p80) of a row's samples in ms."""
    t = row["ms"]
    if len(t) < 2:
        return t[0], t[0], t[0]
    q = statistics.quantiles(t, n=10, method="inclusive")
    return statistics.median(t), q[1], q[7]


def compare(a: dict, b: dict) -> tuple[float, float, float, bool]:
    """a's time over b's: (ratio of medians, lowest, highest ratio of the p20-p80 ranges,
    whether the two ranges overlap)."""
    (am, al, ah), (bm, bl, bh) = stat(a), stat(b)
    return am / bm, al / bh, ah / bl, al <= bh and bl <= ah


def floor_ms(run: dict, case: Case) -> float | None:
    count = LOSSES[case.loss].min_bytes
    if not run.get("copy_gbps") or count is None:
        return None
    return count(case.shape, DTYPES[case.dtype].itemsize) / (run["copy_gbps"] * 1e6)


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _ms(row: dict) -> str:
    med, lo, hi = stat(row)
    return f"{_num(med)} ({_num(lo)}–{_num(hi)})"


def _bytes(n) -> str:
    return "–" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _vs(row: dict, ours: dict | None) -> str:
    if row is ours:
        return "—"
    if not (ok(row) and ok(ours)):
        return "–"
    r, _, _, overlap = compare(row, ours)
    return f"within noise ({r:.2f}x)" if overlap else f"{r:.2f}x"


def groups(run: dict) -> list[tuple[str, str, list[dict]]]:
    """(loss, dtype, rows) in LOSSES's order; rows by swept size, then provider."""
    found: dict[tuple[str, str], list[dict]] = {}
    for row in run["results"]:
        found.setdefault((row["case"]["loss"], row["case"]["dtype"]), []).append(row)
    order = list(LOSSES)
    for rows in found.values():
        rows.sort(key=lambda r: (Case.from_json(r["case"]).x, PROVIDERS.index(r["provider"])))
    return [(loss, dtype, found[loss, dtype]) for loss, dtype in
            sorted(found, key=lambda k: (order.index(k[0]), list(DTYPES).index(k[1])))]


def _by_shape(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    shapes: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        shapes.setdefault(tuple(r["case"]["shape"]), {})[r["provider"]] = r
    return shapes


def _note(row: dict, ref: dict | None) -> str:
    note = row["reason"] if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
    if row.get("loss") is not None and ref and ref.get("loss") and row is not ref:
        diff = abs(row["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
        if diff > 2e-2:  # bf16 losses round at ~4e-3: more than this is a wrong call
            note = f"loss differs from {ref['provider']}'s by {diff:.1e}. {note}"
    return note.replace("|", "\\|").strip()


# ------------------------------------------------------------------------------------------
# text: the per-case line, Markdown, the targets, the README section
# ------------------------------------------------------------------------------------------


def case_line(run: dict, rows: list[dict]) -> str:
    ours = next((r for r in rows if r["provider"] == "fused_losses" and ok(r)), None)
    parts = [f"{r['provider']} {_ms(r)} ms" + ("" if r is ours else f" [{_vs(r, ours)}]")
             + (f" {_bytes(r['peak_bytes'])}" if r.get("peak_bytes") is not None else "")
             if ok(r) else f"{r['provider']} {r['status']}" for r in rows]
    c = rows[0]["case"]
    return f"{c['loss']} {c['dtype']} {Case.from_json(c).label}: " + "; ".join(parts)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(cells) + " |" for cells in body]]


def group_table(run: dict, loss: str, rows: list[dict], only: tuple | None = None) -> list[str]:
    """The rows of one (loss, dtype): every shape, or only the shape ``only``. A provider
    skipped at every shape for one reason is said once, below the table."""
    reasons: dict[str, set] = {}
    for r in rows:
        reasons.setdefault(r["provider"], set()).add(
            r["reason"] if r["status"] == "skipped" else None)
    collapsed = {p: next(iter(s)) for p, s in reasons.items() if s != {None} and len(s) == 1}
    cuda = run["device"]["type"] == "cuda" and LOSSES[loss].min_bytes is not None
    ref_name = LOSSES[loss].reference
    body = []
    for shape, by in _by_shape(rows).items():
        if only is not None and shape != only:
            continue
        case = Case.from_json(next(iter(by.values()))["case"])
        floor = floor_ms(run, case)
        label = case.label + (f" (floor {_num(floor)} ms)" if floor else "")
        ours = by.get("fused_losses") if ok(by.get("fused_losses")) else None
        for name, r in by.items():
            if name in collapsed:
                continue
            cells = [label, name, _ms(r) if ok(r) else r["status"], _vs(r, ours),
                     _bytes(r.get("peak_bytes"))]
            if cuda:
                cells.append(f"{stat(r)[0] / floor:.2f}x" if ok(r) and floor else "–")
            body.append(cells + [_note(r, by.get(ref_name))])
            label = ""
    header = [f"shape ({LOSSES[loss].shape})", "provider", "fwd+bwd ms (p20–p80)",
              "its time ÷ fused_losses's", "peak beyond inputs", *(["÷ floor"] if cuda else []),
              "note"]
    why: dict[str, list[str]] = {}
    for p, reason in collapsed.items():
        why.setdefault(reason, []).append(f"`{p}`")
    return _table(header, body) + ([""] + [f"Skipped ({reason}): {', '.join(names)}"
                                           for reason, names in why.items()] if why else [])


def _target_rows(run: dict, t: Target):
    """(fused_losses's row, the rows measured of those ``t`` compares with, the case)."""
    by = {r["provider"]: r for r in run["results"] if r["case"]["loss"] == t.loss
          and r["case"]["dtype"] == t.dtype and tuple(r["case"]["shape"]) == t.shape}
    peers = [by[a] for a in t.against if ok(by.get(a))]
    return by.get("fused_losses"), peers, Case(t.loss, t.shape, t.dtype, t.device)


def _measured(ours, peers, t: Target) -> bool:
    """Whether a run has what target ``t`` needs: ours, and one of what it compares with."""
    return ok(ours) and bool(peers or not t.against)


def target_lines(run: dict) -> list[str]:
    """Where fused_losses stands against each target of this device, in words."""
    lines = []
    for t in TARGETS:
        if t.device != run["device"]["type"]:
            continue
        ours, peers, case = _target_rows(run, t)
        name = f"{LOSSES[t.loss].title} {t.dtype} {case.label}"
        if not _measured(ours, peers, t):
            why = "not run" if ours is None else ours["reason"] or ours["status"]
            if ok(ours):
                why = f"no {' / '.join(t.against)} measured"
            lines.append(f"{name}: {t.kind} not measured ({why[:120]})")
            continue
        best = min(peers, key=lambda r: stat(r)[0]) if peers else None
        if t.kind == "time":
            r, lo, hi, _ = compare(ours, best)
            what = f"time ÷ {best['provider']}'s" + (
                f" (the fastest of {', '.join(t.against)})" if len(t.against) > 1 else "")
        elif t.kind == "roofline":
            floor = floor_ms(run, case)
            r, lo, hi = (x / floor for x in stat(ours))
            what = f"time ÷ the roofline's {_num(floor)} ms"
        else:
            mine = ours.get("peak_bytes")
            base = (best or {}).get("peak_bytes") if t.kind == "peak" else (
                t.shape[0] * t.shape[1] * DTYPES[t.dtype].itemsize)
            if mine is None or not base:
                lines.append(f"{name}: {t.kind} not measured (no peak memory)")
                continue
            r = lo = hi = mine / base
            what = (f"peak memory ÷ {best['provider']}'s ({_bytes(mine)} / {_bytes(base)})"
                    if t.kind == "peak" else f"peak memory ÷ the logits' size ({_bytes(mine)})")
        verdict = "met" if hi <= t.limit else "NOT met" if lo > t.limit else \
            "within noise of the target"
        spread = f" (p20–p80 {lo:.2f}–{hi:.2f})" if hi > lo else ""
        lines.append(f"{name}: fused_losses {what}: {r:.2f}x{spread}; target <= "
                     f"{t.limit:.2f}x: **{verdict}**")
    return lines


def _header(run: dict) -> list[str]:
    d, v, g, s = run["device"], run["versions"], run["git"], run["settings"]
    extra = f", driver {d['driver']}, CUDA {d['cuda']}" if d["type"] == "cuda" else (
        f" ({d['logical_cpus']} logical CPUs)")
    lines = [
        f"- device: {d['name']}{extra}",
        "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
        f"- commit {g['commit'][:12]}{' (uncommitted changes)' if g.get('dirty') else ''}; "
        f"{run['date']}; `{run['command']}`; {run['elapsed_s']} s",
        f"- timing: {s['seconds_per_case']} s per case, {s['min_rounds']} to {s['max_rounds']} "
        "rounds" + (f"; copy bandwidth {run['copy_gbps']:.0f} GB/s" if run["copy_gbps"] else ""),
    ]
    if not run.get("complete"):
        lines.append("- **incomplete run** (interrupted or time-boxed): see the skipped rows")
    return lines


def _group_title(loss: str, dtype: str, rows: list[dict]) -> str:
    fixed = sorted({LOSSES[loss].fixed(tuple(r["case"]["shape"])) for r in rows} - {""})
    return f"{LOSSES[loss].title}, {dtype}" + (f" ({'; '.join(fixed)})" if fixed else "")


def markdown(run: dict, method: bool = True) -> str:
    lines = [f"# fused_losses benchmark: {run['device']['name']}, {run['date'][:10]}", "",
             *_header(run), "", "## Targets", "",
             *[f"- {t}" for t in target_lines(run) or ["none for this device"]], ""]
    for loss, dtype, rows in groups(run):
        lines += [f"## {_group_title(loss, dtype, rows)}", "", *group_table(run, loss, rows), ""]
    if method:
        lines += ["## How these were measured", "", METHOD, "Providers:", ""]
        lines += [f"- {loss.title} / `{name}`: {p.description}" for loss in LOSSES.values()
                  for name, p in loss.providers.items()]
    return "\n".join(lines) + "\n"


def summary(run: dict) -> str:
    return markdown(run, method=False)


def newest(results: Path = RESULTS) -> Path | None:
    """The newest results JSON, GPU runs before CPU ones, and runs that measured every target
    of their device before partial ones (a short rerun of a few cases does not replace the
    last full sweep)."""
    found = []
    for path in results.glob("*.json"):
        try:
            run = load(path)
            complete = all(_measured(*_target_rows(run, t)[:2], t)
                           for t in TARGETS if t.device == run["device"]["type"])
            found.append((run["device"]["type"] == "cuda", complete, run["date"], path))
        except (ValueError, KeyError, OSError):
            continue
    return max(found)[3] if found else None


def readme_section(path: Path | None) -> str:
    if path is None:
        return ("No GPU results yet: `bench/gpu_check.sh` writes them on a GPU machine "
                "(see CONTRIBUTING.md).")
    run, rel = load(path), f"bench/results/{path.stem}"
    v = run["versions"]
    lines = [f"Measured on **{run['device']['name']}** on {run['date'][:10]} (torch "
             f"{v['torch']}, triton {v.get('triton')}, commit {run['git']['commit'][:12]}); "
             f"every shape and how each number is taken: [`{rel}.md`]({rel}.md). Forward + "
             "backward, median (p20–p80) of interleaved runs; ratios whose ranges overlap are "
             "*within noise*.", "", *[f"- {t}" for t in target_lines(run)], ""]
    for loss, dtype, rows in groups(run):
        shapes = _by_shape(rows)
        measured = [s for s, by in shapes.items() if any(ok(r) for r in by.values())]
        if not measured:
            continue
        targeted = [t.shape for t in TARGETS if (t.loss, t.dtype) == (loss, dtype)]
        shape = next((s for s in measured if s in targeted), measured[-1])
        lines += [f"**{_group_title(loss, dtype, rows)}, {'x'.join(map(str, shape))}**", "",
                  *group_table(run, loss, rows, only=shape), ""]
    if (path.parent / f"{path.stem}.png").exists():
        lines.append(f"![forward+backward time and peak memory against size]({rel}.png)")
    return "\n".join(lines).strip()


def update_readme(readme: Path, results: Path = RESULTS) -> str:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return f"{readme}: no {BEGIN} ... {END} markers, left unchanged"
    path = newest(results)
    head, rest = text.split(BEGIN, 1)
    readme.write_text(f"{head}{BEGIN}\n{readme_section(path)}\n{END}{rest.split(END, 1)[1]}")
    return f"{readme}: benchmark section regenerated from {path or 'no results'}"


# ------------------------------------------------------------------------------------------
# the picture: per (loss, dtype) a row of two panels, time and peak memory against size
# ------------------------------------------------------------------------------------------


def _si(x: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def plot(run: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install -e '.[bench]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    shown = [(loss, dtype, rows) for loss, dtype, rows in groups(run) if any(map(ok, rows))]
    if not shown:
        return False
    fig, axes = plt.subplots(len(shown), 2, figsize=(13, 3.3 * len(shown) + 0.6),
                             squeeze=False, layout="constrained")
    markers = "osD^v<>pXhP*"  # (the last: the GEMMs references)
    for (ax_t, ax_m), (loss, dtype, rows) in zip(axes, shown, strict=True):
        xs = sorted({Case.from_json(r["case"]).x for r in rows if ok(r)})
        top = 0.0
        for name in dict.fromkeys(r["provider"] for r in rows):
            pts = [(Case.from_json(r["case"]).x, *stat(r), r.get("peak_bytes"))
                   for r in rows if r["provider"] == name and ok(r)]
            if not pts:
                continue
            i, ours = COLORED.index(name) if name in COLORED else -1, name == "fused_losses"
            color = f"C{i % 10}" if i >= 0 else "k"  # black: the GEMMs references
            # fused_losses filled and underneath, the others hollow on top: a point that
            # coincides with fused_losses's shows as an outline around it, never hidden
            style = {"color": color, "marker": markers[i], "label": name, "ms": 7, "mew": 1.5,
                     "lw": 2.2 if ours else 1.3, "zorder": 2 if ours else 3,
                     "mfc": color if ours else "none", "ls": "-" if i >= 0 else "--"}
            x, med, lo, hi, peak = zip(*pts, strict=True)
            ax_t.errorbar(x, med, yerr=[[m - a for m, a in zip(med, lo, strict=True)],
                                        [b - m for m, b in zip(med, hi, strict=True)]],
                          capsize=3, **style)
            if len(x) > 1 and i >= 0:  # the reference line keeps its error bars only
                ax_t.fill_between(x, lo, hi, color=style["color"], alpha=0.18, lw=0)
            mem = [(a, p / 1e6) for a, p in zip(x, peak, strict=True) if p is not None]
            if mem:
                ax_m.plot(*zip(*mem, strict=True), **style)
                top = max(top, *(m for _, m in mem))
        title = textwrap.fill(_group_title(loss, dtype, rows), 60)
        ax_t.set_title(f"{title}\nforward+backward time", fontsize=9)
        ax_m.set_title(f"{title}\npeak memory beyond the inputs", fontsize=9)
        ax_t.set_ylabel("ms: median, p20–p80")
        ax_m.set_ylabel("MB")
        ax_t.set_yscale("log")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log")
            ax.set_xticks(xs, [_si(x) for x in xs])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel(LOSSES[loss].x_label)
            ax.margins(x=0.1, y=0.12)
            ax.grid(True, alpha=0.3)
        if len(xs) == 1:  # one shape: room either side of it
            for ax in (ax_t, ax_m):
                ax.set_xlim(xs[0] / 2, xs[0] * 2)
        ax_m.set_ylim(0, top * 1.15 or 1)  # from zero, room above the highest point
        low, high = ax_t.get_ylim()  # labelled ticks: fewer over many decades, more within one
        subs = (1.0,) if high / low > 1e3 else (1.0, 2.0, 5.0) if high / low > 8 else (
            1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)
        ax_t.yaxis.set_major_locator(LogLocator(subs=subs))
        ax_t.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _num(v)))
        ax_t.yaxis.set_minor_locator(NullLocator())
        ax_m.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"fused_losses benchmark: {run['device']['name']}, {run['date'][:10]}",
                 fontsize=11)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_all(run: dict, path: Path, with_json: bool = True) -> list[Path]:
    """<stem>.json (unless with_json is False), .md and .png beside each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if with_json:
        write_json(run, path)
    path.with_suffix(".md").write_text(markdown(run))
    png = path.with_suffix(".png")
    return [path] * with_json + [path.with_suffix(".md")] + ([png] if plot(run, png) else [])


def render(path: Path | None, out: Path | None, readme: Path | None) -> int:
    """Re-writes the .md and .png of a results JSON, then README.md's section."""
    path = path or newest()
    if path is not None:
        for written in write_all(load(path), (out or path.parent) / path.name, False):
            print(f"wrote {written}")
    else:
        print(f"no results in {RESULTS}: nothing to re-render")
    if readme is not None:
        print(update_readme(readme))
    return 0
