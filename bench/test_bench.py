"""``pytest bench/``: the benchmark's own checks (not part of CI's ``pytest``, whose testpaths
is tests/). No GPU needed: the CUDA report is rendered from a made-up CUDA run."""

from __future__ import annotations

import json

import pytest

from bench import cases, report, run
from bench.cases import LOSSES, TARGETS, Case, build_cases


def _row(provider: str, ms: list[float], case: Case, **extra) -> dict:
    return {"case": case.to_json(), "provider": provider, "status": "ok", "reason": "",
            "ms": ms, **extra}


def test_ratios_whose_spreads_overlap_are_within_noise():
    case = Case("huber", (32, 1000), "float32", "cpu")
    ours = _row("fused_losses", [1.0, 1.1, 0.9, 1.05, 0.95], case)
    close = _row("torch", [1.02, 1.12, 0.92, 1.07, 0.97], case)
    slow = _row("torch", [2.0, 2.1, 1.9, 2.05, 1.95], case)
    assert report.stat(ours)[0] == 1.0
    assert report.compare(close, ours)[3] and report._vs(close, ours).startswith("within noise")
    ratio, lo, hi, overlap = report.compare(slow, ours)
    assert not overlap and lo <= ratio == 2.0 <= hi and report._vs(slow, ours) == "2.00x"


def test_device_names_and_file_names():
    cpu = run.device_info("cpu")
    assert cpu["model"] and f"{cpu['threads']} threads" in cpu["name"]
    when = __import__("datetime").datetime(2026, 11, 22, 10, 15, 0)
    gpu = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}
    assert run.stem(gpu, when) == "h100-80gb-hbm3-2026-11-22-101500"
    assert run.stem(cpu, when).startswith("cpu-")


def test_sweeps_have_every_loss_and_the_targets_first():
    for device in ("cpu", "cuda"):
        for quick in (False, True):
            swept = build_cases(device, quick)
            assert {c.loss for c in swept} == set(LOSSES), (device, quick)
            targeted = [(t.loss, t.shape, t.dtype) for t in TARGETS if t.device == device]
            assert {(c.loss, c.shape, c.dtype) for c in swept[:len(set(targeted))]} == \
                set(targeted), (device, quick)


def test_missing_functions_and_peers_are_skipped_with_a_reason(monkeypatch):
    import fused_losses

    monkeypatch.delattr(fused_losses, "linear_cross_entropy", raising=False)
    rows = run.run_case(Case("linear_cross_entropy", (8, 16, 64), "float32", "cpu"), None,
                        (0.05, 2, 3, 0))
    by = {r["provider"]: r for r in rows}
    assert by["fused_losses"]["status"] == "skipped"
    assert "does not exist yet" in by["fused_losses"]["reason"]
    assert by["liger"]["status"] == "skipped"  # CUDA only
    assert report.ok(by["torch"]) and report.ok(by["3 GEMMs"])
    assert by["torch"]["peak_bytes"] >= 0
    with pytest.raises(cases.Skip, match="not importable"):
        cases._peer("no_such_module_for_the_benchmark", "fn")


def test_cpu_peak_memory_in_a_fresh_process_does_not_depend_on_the_order():
    case = Case("cross_entropy", (256, 8192), "float32", "cpu")
    grad = 256 * 8192 * 4
    first = run.cpu_peaks(case, ["fused_losses", "torch"])
    second = run.cpu_peaks(case, ["torch", "fused_losses"])
    for name, peak in first.items():
        assert grad <= peak < 10 * grad and abs(second[name] - peak) <= 0.1 * peak, name


def _tiny_sweep(device, quick):
    return [("cross_entropy", "float32", (64, 512)), ("huber", "float32", (32, 1000)),
            ("huber", "float32", (4096,)), ("linear_cross_entropy", "float32", (16, 32, 128))]


def test_a_cpu_run_writes_json_markdown_png_and_never_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cases, "_sweep", _tiny_sweep)
    monkeypatch.setattr(run, "cpu_peaks", lambda case, names: dict.fromkeys(names, 1 << 20))
    argv = ["--quick", "--out", str(tmp_path), "--seconds-per-case", "0.05"]
    assert run.main(argv) == 0
    assert run.main(argv) == 0
    written = sorted(tmp_path.glob("cpu-*.json"))
    assert len(written) == 2  # the same second: still two runs, two sets of files
    result = json.loads(written[0].read_text())
    assert result["complete"] and result["device"]["type"] == "cpu"
    assert {r["provider"] for r in result["results"] if report.ok(r)} >= {
        "fused_losses", "torch", "torch chunked", "3 GEMMs"}
    assert all(len(r["ms"]) >= 3 for r in result["results"] if report.ok(r))
    md = written[0].with_suffix(".md").read_text()
    assert "| 32x1000 | fused_losses |" in md and "roofline" not in md.split("## How")[0]
    assert written[0].with_suffix(".png").stat().st_size > 10_000
    assert "Huber float32 32x1000: fused_losses time ÷ torch's" in capsys.readouterr().out

    assert run.main(["--quick", "--loss", "huber", "--time-budget", "0", "--out",
                     str(tmp_path / "budget")]) == 0
    (path,) = (tmp_path / "budget").glob("*.json")
    assert {r["status"] for r in json.loads(path.read_text())["results"]} == {"skipped-time"}


def fake_cuda_run() -> dict:
    """Plausible samples for every case and provider of the quick CUDA sweep."""
    device = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "driver": "580.1", "cuda": "13.0"}
    out = {"schema": 2, "date": "2026-11-23T10:00:00+00:00", "command": "python -m bench",
           "device": device, "versions": {"python": "3.12", "torch": "2.11.0", "triton": "3.6.0"},
           "git": {"commit": "0123456789abcdef", "dirty": False}, "copy_gbps": 3000.0,
           "settings": dict(zip(("seconds_per_case", "min_rounds", "max_rounds",
                                 "cuda_sample_ms"), run.SETTINGS["cuda", True], strict=True)),
           "results": [], "complete": True, "elapsed_s": 60}
    factor = {"fused_losses": 1.0, "torch": 3.0, "torch+float": 6.0, "torch.compile": 2.0,
              "liger": 1.6, "torch chunked": 1.3, "3 GEMMs": 0.98, "transformers": 1.2}
    for case in build_cases("cuda", quick=True):
        floor = report.floor_ms(out, case) or 10.0
        for name in LOSSES[case.loss].providers:
            if name not in factor:
                out["results"].append({"case": case.to_json(), "provider": name,
                                       "status": "skipped", "reason": "not importable"})
                continue
            ms = [floor * factor[name] * (1.08 + 0.01 * i) for i in range(-3, 4)]
            out["results"].append(_row(name, ms, case, loss=11.0,
                                       peak_bytes=int(1e9 * factor[name])))
    return out


def test_cuda_report_targets_and_readme(tmp_path):
    results = tmp_path / "results"
    fake = fake_cuda_run()
    written = report.write_all(fake, results / "h100-80gb-hbm3-2026-11-23-100000.json")
    assert [p.suffix for p in written] == [".json", ".md", ".png"]
    md = written[1].read_text()
    assert "÷ floor" in md and "Skipped (not importable): `flash_attn`, `quack`" in md
    text = "\n".join(report.target_lines(fake))
    assert "time ÷ the roofline's" in text and "1.08x (p20–p80" in text and "**met**" in text
    assert "time ÷ 3 GEMMs's: 1.02x" in text

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nold\n{report.END}\n\nrest\n")
    assert "regenerated from" in report.update_readme(readme, results)
    body = readme.read_text()
    assert "NVIDIA H100 80GB HBM3" in body and "rest" in body and "old" not in body
    assert "(bench/results/h100-80gb-hbm3-2026-11-23-100000.png)" in body
    assert "http" not in body  # no link leaves the repository
    report.update_readme(readme, tmp_path / "empty")
    assert "No GPU results yet" in readme.read_text()

    out = tmp_path / "rerendered"
    assert run.main(["render", str(written[0]), "--out", str(out), "--no-readme"]) == 0
    assert (out / written[1].name).read_text() == md


def test_cuda_check_script_runs_on_the_cpu_fallback(capsys):
    from bench import cuda_check

    assert cuda_check.main(["--device", "cpu"]) == 0
    assert "checks passed" in capsys.readouterr().out


def test_newest_prefers_a_full_sweep_to_a_later_partial_rerun(tmp_path):
    # two H200 runs of one session: the full sweep, then a rerun of the RL and distillation
    # cases only; the README keeps showing the sweep
    full, partial = "h200-2026-12-04-164514.json", "h200-2026-12-04-170203.json"
    for name in (full, partial):
        (tmp_path / name).write_text((report.RESULTS / name).read_text())
    assert report.newest(tmp_path).name == full
    (tmp_path / full).unlink()
    assert report.newest(tmp_path).name == partial
