"""``pytest bench/``: the benchmark's own checks, and a pytest-benchmark suite.

- Checks of the harness that need no GPU: byte counts, the sweep's order, the provider
  registry's skips, the OOM estimate, a CPU sweep end to end (JSON, Markdown, PNG), and the
  report/README rendering of a CUDA-shaped run (so the CUDA-only report paths run here too).
- Benchmarks, grouped by shape so pytest-benchmark compares the providers side by side: a small
  CPU group (fused_losses's eager fallback against torch) and a CUDA group at realistic shapes
  with every provider (skipped without a GPU).
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import cli, harness, meta, report
from bench.cases import CPU_QUICK, Case, build_cases, fill_inputs, make_inputs, min_bytes
from bench.providers import REGISTRY, Provider, Skip, _import, providers_for

# ------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------


def test_byte_counts():
    ce = min_bytes(Case("cross_entropy", (8192, 128256), "bfloat16", "cuda"))
    logits = 8192 * 128256 * 2  # 2.10 GB: PERFORMANCE.md's floor is 2x this over bandwidth
    assert (ce.read, ce.grad) == (logits + 8 * 8192, logits)
    assert ce.bytes_for("fwd") == ce.read and ce.bytes_for("fwd_bwd") == ce.read + ce.grad
    bce = min_bytes(Case("bce", (16, 32), "float32", "cuda"))
    assert (bce.read, bce.grad) == (2 * 16 * 32 * 4 + 32 * 4, 16 * 32 * 4)
    huber = min_bytes(Case("huber", (100,), "bfloat16", "cuda"))
    assert (huber.read, huber.grad) == (400, 200)


def test_sweep_order_and_size():
    cases = build_cases("cuda", quick=False)
    # the grid: 3 N x 5 V x 2 dtypes; 4 BCE and 3 Huber shapes in 2 dtypes
    assert len(cases) == 30 + 8 + 6
    assert cases[0] == Case("cross_entropy", (8192, 128256), "bfloat16", "cuda")
    assert {c.loss for c in cases[:3]} == {"cross_entropy", "bce", "huber"}  # headlines first
    quick = build_cases("cuda", quick=True)
    assert {c.dtype for c in quick if c.loss == "cross_entropy"} == {"bfloat16"}
    assert build_cases("cpu", True, ["huber"], ["bfloat16"]) == [
        Case("huber", CPU_QUICK["huber"][0], "bfloat16", "cpu")]


def test_registry_has_the_required_providers():
    for loss, table in REGISTRY.items():
        assert list(table)[:3] == ["fused_losses", "torch", "torch.compile"], loss
    assert {"torch+float", "liger", "flash_attn", "quack"} <= set(REGISTRY["cross_entropy"])
    assert [p.name for p in providers_for("huber", ["torch"])] == ["torch"]


def _case_and_sets(loss="huber", shape=(1000,), dtype="float32"):
    case = Case(loss, shape, dtype, "cpu")
    return case, [make_inputs(case)]


def test_missing_peer_and_missing_loss_are_skipped(monkeypatch):
    with pytest.raises(Skip, match="not importable"):
        _import("no_such_module_for_the_benchmark", "fn")
    case, sets = _case_and_sets()
    missing = Provider("ghost", lambda c, t: _import("no_such_peer_module", "f"), 1.0, "absent")
    assert harness.run_provider(missing, case, sets, _timer())["status"] == "skipped"
    import fused_losses

    monkeypatch.delattr(fused_losses, "huber_loss", raising=False)
    row = harness.run_provider(REGISTRY["huber"]["fused_losses"], case, sets, _timer())
    assert row["status"] == "skipped" and "not in this build" in row["reason"]
    cuda_only = harness.run_provider(REGISTRY["huber"]["torch.compile"], case, sets, _timer())
    assert cuda_only["status"] == "skipped"


def test_a_failing_provider_is_an_error_row_not_a_crash():
    def broken(case, t):
        def forward():
            raise RuntimeError("kernel launch failed")

        return forward

    case, sets = _case_and_sets()
    row = harness.run_provider(Provider("broken", broken, 1.0, "raises"), case, sets, _timer())
    assert row["status"] == "error" and row["reason"] == "RuntimeError: kernel launch failed"


def test_oom_estimate_skips_before_running(monkeypatch):
    # the CUDA-only check, driven on the CPU with a pretend 1 GB free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (1 << 30, 80 << 30))
    big = Case("cross_entropy", (16384, 262144), "float32", "cuda")
    with pytest.raises(MemoryError, match="GB free"):
        harness._check_fits(big, REGISTRY["cross_entropy"]["torch"])


def test_rotation_copies():
    small = Case("huber", (1024,), "float32", "cuda")
    assert harness.n_input_sets(small, 50 << 20) == 8  # capped
    big = Case("cross_entropy", (8192, 128256), "bfloat16", "cuda")
    assert harness.n_input_sets(big, 50 << 20) == 1


def test_slug_and_stem():
    device = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}
    assert meta.slug(device) == "h100-80gb-hbm3"
    assert meta.stem({"device": device, "date": "2026-11-22T10:00:00+00:00"}) == \
        "h100-80gb-hbm3-2026-11-22"
    assert meta.slug({"type": "cpu", "name": "x86_64"}) == "cpu"


def _timer():
    return harness.make_timer("cpu", harness.Settings(1, 2, min_reps=2, max_reps=3))


def test_cpu_sweep_writes_json_markdown_png(tmp_path, capsys):
    assert cli.main(["--quick", "--loss", "huber,ce", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("cpu-*.json")
    run = json.loads(json_path.read_text())
    assert run["complete"] and run["device"]["type"] == "cpu"
    assert run["copy_bandwidth_gbps"] > 0 and run["git"]["commit"]
    ok = [r for r in run["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"torch"}
    for row in ok:
        assert set(row["ms"]) == {"fwd", "bwd", "fwd_bwd"} and row["roofline"]["fwd_bwd"] > 0
    assert json_path.with_suffix(".md").read_text().startswith("# fused_losses benchmark")
    assert json_path.with_suffix(".png").stat().st_size > 0
    assert "headline shapes" in capsys.readouterr().out


def test_cuda_check_script_runs_on_the_cpu_fallback(capsys):
    from bench import cuda_check

    assert cuda_check.main(["--device", "cpu"]) == 0
    assert "checks passed" in capsys.readouterr().out


def test_time_budget_reports_the_rest_as_skipped(tmp_path):
    assert cli.main(["--quick", "--loss", "huber", "--time-budget", "0",
                     "--out", str(tmp_path)]) == 0
    run = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {r["status"] for r in run["results"]} == {"skipped-time"}


# ------------------------------------------------------------------------------------------
# the report's CUDA paths, on a CUDA-shaped run made from the registry
# ------------------------------------------------------------------------------------------


def fake_cuda_run() -> dict:
    """Plausible numbers for every case and provider of the full CUDA sweep."""
    run = {
        "schema": 1, "date": "2026-11-23T10:00:00+00:00", "command": "python -m bench",
        "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "driver": "580.159.04",
                   "cuda": "13.0"},
        "versions": {"python": "3.12.3", "torch": "2.11.0", "triton": "3.6.0",
                     "fused_losses": "0.1.0", "liger-kernel": "0.8.5"},
        "git": {"commit": "0123456789abcdef", "dirty": False}, "settings": {},
        "copy_bandwidth_gbps": 3000.0, "method": harness.METHOD,
        "bytes_counted": cli.BYTE_COUNTS, "results": [], "complete": True, "elapsed_s": 1.0,
        "providers": {loss: {n: {"description": p.description,
                                 "grad_in_forward": p.grad_in_forward}
                             for n, p in table.items()} for loss, table in REGISTRY.items()},
    }
    factor = {"fused_losses": 1.1, "torch": 3.0, "torch+float": 6.0, "torch.compile": 2.0,
              "liger": 1.6}
    for case in build_cases("cuda", quick=False):
        rows = []
        for p in providers_for(case.loss):
            if p.name not in factor:
                rows.append(harness.skipped_row(case, p, "skipped", "not importable"))
                continue
            ms = min_bytes(case).bytes_for("fwd_bwd") / 3e9 * factor[p.name]
            rows.append({"case": case.to_json(), "provider": p.name, "status": "ok",
                         "reason": "", "loss_value": 11.0, "warmup_s": 0.1,
                         "peak_extra_bytes": int(p.mem_factor * case.input_bytes()),
                         "ms": {"fwd": ms * 0.7, "bwd": ms * 0.5, "fwd_bwd": ms}})
        harness.add_figures(rows, case, run["copy_bandwidth_gbps"])
        run["results"] += rows
    return run


def test_cuda_report_render_and_readme(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    run = fake_cuda_run()
    written = report.write_reports(run, results)
    assert [p.name for p in written] == [f"h100-80gb-hbm3-2026-11-23{s}"
                                         for s in (".json", ".md", ".png")]
    md = written[1].read_text()
    assert "## Targets" in md and "†" in md and "Skipped: `quack`: not importable" in md
    text = report.summary(run)
    assert "faster than torch, torch.compile, torch+float, liger" in text
    assert "1.10x the roofline time (<= 1.3x): met" in text

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.README_BEGIN}\nold\n{report.README_END}\n\nrest\n")
    assert "regenerated from" in report.update_readme(readme, results)
    body = readme.read_text()
    assert "NVIDIA H100 80GB HBM3" in body and "2026-11-23" in body and "rest" in body
    assert "old" not in body and "h100-80gb-hbm3-2026-11-23.png" in body

    no_markers = tmp_path / "PLAIN.md"
    no_markers.write_text("# plain\n")
    assert "left unchanged" in report.update_readme(no_markers, results)
    assert no_markers.read_text() == "# plain\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    report.update_readme(readme, empty)
    assert "No GPU results yet" in readme.read_text()

    out = tmp_path / "rerendered"
    assert cli.main(["render", str(written[0]), "--out", str(out), "--no-readme"]) == 0
    assert (out / written[1].name).read_text() == md


# ------------------------------------------------------------------------------------------
# pytest-benchmark: forward+backward, one group per shape
# ------------------------------------------------------------------------------------------


def _runner(case: Case, name: str) -> harness.Runner:
    provider = REGISTRY[case.loss][name]
    if case.device not in provider.devices:
        pytest.skip(f"{name} runs on CUDA only")
    inputs = make_inputs(case)
    fill_inputs(case, inputs, harness.SEED)
    try:
        return harness.Runner([provider.build(case, inputs)], [inputs])
    except Skip as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("name", ["fused_losses", "torch"])
@pytest.mark.parametrize("loss", list(CPU_QUICK))
def test_cpu_forward_backward(benchmark, loss, name):
    case = Case(loss, CPU_QUICK[loss][0], "float32", "cpu")
    runner = _runner(case, name)
    benchmark.group = f"cpu {loss} float32 {case.label}"
    benchmark.pedantic(runner.fwd_bwd, rounds=5, warmup_rounds=1, iterations=1)


CUDA_SHAPES = [
    ("cross_entropy", (8192, 128256), "bfloat16"),  # the headline: Llama-3 vocabulary
    ("cross_entropy", (4096, 32000), "float32"),
    ("bce", (16384, 16384), "float32"),
    ("huber", (1 << 26,), "float32"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted({n for t in REGISTRY.values() for n in t}))
@pytest.mark.parametrize(("loss", "shape", "dtype"), CUDA_SHAPES,
                         ids=[f"{s[0]}-{s[2]}-{'x'.join(map(str, s[1]))}" for s in CUDA_SHAPES])
def test_cuda_forward_backward(benchmark, loss, shape, dtype, name):
    if name not in REGISTRY[loss]:
        pytest.skip(f"no {name} provider for {loss}")
    runner = _runner(Case(loss, shape, dtype, "cuda"), name)

    def step():
        runner.fwd_bwd()
        torch.cuda.synchronize()  # pytest-benchmark reads a host clock

    benchmark.group = f"cuda {loss} {dtype} {'x'.join(map(str, shape))}"
    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
    runner.clear()
