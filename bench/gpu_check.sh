#!/usr/bin/env bash
# Everything that needs a GPU, in one command, in under 9 minutes, with no network access:
# the test suite on CUDA, the full benchmark sweep against the peers, and a memcheck of a small
# forward+backward of each loss.
#
#   bash bench/gpu_check.sh OUT_DIR          # OUT_DIR defaults to $OUT (the device tool's)
#   BENCH_GIT_COMMIT=<sha> bash bench/gpu_check.sh "$OUT"   # the tree's copy there has no .git
#
# Expects python3 with torch and triton (and pytest, matplotlib); installs the project offline
# (pip install --no-deps --no-build-isolation -e .) and the peers' wheels in .whl/ if any
# (bench/README.md says how to fetch them). Writes at most 8 files, all directly in OUT_DIR:
#   log.txt        everything printed below
#   env.txt        nvidia-smi, driver, versions, installed peers
#   pytest.txt     pytest -q over tests/ on CUDA, but tests/test_torch_compile.py
#   compile.txt    tests/test_torch_compile.py: the losses in Inductor graphs
#   sanitizer.txt  python -m bench.cuda_check, plainly and under compute-sanitizer memcheck
#   <gpu>-<date>-<time>.json, .md, .png   the sweep: copy them into bench/results/ as they are
#
# Budget: 540 s from the start. Each step is stopped by `timeout` at its cap or at what is left
# of the budget, so the script ends in time whatever hangs; the sweep gets the rest:
#   install     <= 60 s   the project and .whl/*.whl
#   env         <= 20 s
#   pytest      <= 200 s  the suite but test_compile.py and test_torch_compile.py; kernels
#               compiled, never interpreted. The suite launches ~600 kernel variants, each
#               compiled once (~0.4 s): with pytest-xdist (on the device image) 8 workers
#               compile them side by side, else it may be cut off
#   sweep       what is left less 235 s; --time-budget (60 s less) stops it starting new
#               cases (those with targets first), so its report is written in time
#   cuda_check  <= 45 s   each loss on small CUDA inputs against torch; warms Triton's cache
#   memcheck    <= 75 s   the same under compute-sanitizer, PyTorch's allocator cache off
#   compile     <= 90 s   test_torch_compile.py (Inductor compiles slowly: last, on its own)
#   render      <= 25 s   .md/.png from the JSON (also after a cut-off sweep), the summary
# The exit status is 1 if any step failed or was cut off; the summary at the end says which.
set -uo pipefail

OUT_DIR=${1:-${OUT:-}}
if [[ -z "$OUT_DIR" ]]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR   (or set OUT)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 2

export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# Every kernel compiled for the GPU, never interpreted, whatever the caller's environment.
export TRITON_INTERPRET=0
unset FUSED_LOSSES_BACKEND
DEADLINE=${GPU_CHECK_BUDGET_S:-540}  # seconds; overridable only to test this script
SITE=/tmp/bench-site
REPORT=()
FAILED=0

# step NAME CAP FILE COMMAND...: run COMMAND under `timeout`, its output also appended to FILE.
step() {
    local name=$1 cap=$2 file=$3
    shift 3
    local left=$((DEADLINE - SECONDS))
    ((cap > left)) && cap=$left
    if ((cap < 5)); then
        REPORT+=("$(printf '%-11s NOT RUN: no time left' "$name")")
        FAILED=1
        return 1
    fi
    echo
    echo "=== $name (at ${SECONDS}s, at most ${cap}s): $* ==="
    local t0=$SECONDS rc verdict=ok
    timeout -s INT -k 10 "$cap" "$@" 2>&1 | tee -a "$file"
    rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then
        verdict="CUT OFF at ${cap}s"
    elif ((rc != 0)); then
        verdict="FAILED (exit $rc)"
    fi
    [[ $verdict == ok ]] || FAILED=1
    REPORT+=("$(printf '%-11s %-22s %4ss' "$name" "$verdict" $((SECONDS - t0)))")
    return "$rc"
}

# The steps that are shell functions run as `bash -c NAME` under `timeout` (exported below).
# shellcheck disable=SC2317  # invoked indirectly
install_project() {
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . ||
        return 1
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl || return 1
    fi
}

# shellcheck disable=SC2317  # invoked indirectly
record_env() {
    local rc=0
    nvidia-smi || rc=1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv
    python3 -c '
import sys, torch, triton, fused_losses
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA",
      torch.version.cuda, "| triton", triton.__version__, "| fused_losses", fused_losses.__file__)
p = torch.cuda.get_device_properties(0)
print(p.name, f"{p.total_memory / 2**30:.1f} GiB,", p.multi_processor_count, "SMs, L2 bytes",
      getattr(p, "L2_cache_size", "?"))' || rc=1
    python3 -m pip list 2>/dev/null |
        grep -i -E "^(torch|triton|liger|flash|quack|cut|transformers|numpy|matplotlib|pytest|tqdm)"
    ls .whl 2>/dev/null
    echo "compute-sanitizer: ${SANITIZER:-not found}"
    if [[ -n "${SANITIZER:-}" ]]; then "$SANITIZER" --version | tail -2; fi
    echo "$(nproc) CPUs"
    free -g | head -2
    return "$rc"
}
export -f install_project record_env
export SITE

main() {
    echo "gpu_check: $(date -u +%FT%TZ) on $(hostname), commit ${BENCH_GIT_COMMIT:-unknown}, out $OUT_DIR"
    SANITIZER=$(command -v compute-sanitizer ||
        ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -1)
    export SANITIZER

    step install 60 /dev/null bash -c install_project
    if compgen -G ".whl/*.whl" >/dev/null; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    step env 20 "$OUT_DIR/env.txt" bash -c record_env

    # plain pytest keeps the checkout off sys.path (tests/test_api.py checks the install);
    # `python3 -P -m pytest` does the same where no pytest script is on PATH
    local pytest_cmd=(pytest) workers=() compile_workers=()
    command -v pytest >/dev/null || pytest_cmd=(python3 -P -m pytest)
    if python3 -c "import xdist" 2>/dev/null; then
        workers=(-n 8)
        compile_workers=(-n 3)
    fi
    # tests/test_compile.py (tests/_compile_check.py) compiles for sm_90 without a GPU, as CI
    # does: not needed here
    step pytest 200 "$OUT_DIR/pytest.txt" "${pytest_cmd[@]}" -q -p no:cacheprovider \
        "${workers[@]}" --ignore=tests/test_compile.py --ignore=tests/test_torch_compile.py tests

    local sweep_cap=$((DEADLINE - SECONDS - 235))
    step sweep "$sweep_cap" /dev/null \
        python3 -m bench --out "$OUT_DIR" --time-budget $((sweep_cap > 120 ? sweep_cap - 60 : sweep_cap / 2))

    step cuda_check 45 "$OUT_DIR/sanitizer.txt" python3 -m bench.cuda_check
    if [[ -n "$SANITIZER" ]]; then
        step memcheck 75 "$OUT_DIR/sanitizer.txt" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 20 \
            python3 -m bench.cuda_check
    else
        REPORT+=("$(printf '%-11s NOT RUN: compute-sanitizer not found' memcheck)")
        FAILED=1
    fi

    step compile 90 "$OUT_DIR/compile.txt" "${pytest_cmd[@]}" -q -p no:cacheprovider \
        "${compile_workers[@]}" tests/test_torch_compile.py

    local json
    json=$(ls -t "$OUT_DIR"/*.json 2>/dev/null | head -1)
    if [[ -n "$json" ]]; then
        step render 25 /dev/null python3 -m bench render "$json" --out "$OUT_DIR" --no-readme
    else
        REPORT+=("$(printf '%-11s NOT RUN: the sweep wrote no JSON' render)")
        FAILED=1
    fi

    echo
    echo "=== gpu_check summary (${SECONDS}s in all) ==="
    printf '%s\n' "${REPORT[@]}"
    ls -l "$OUT_DIR"
    [[ -n "$json" ]] && echo "results to commit: cp ${json%.json}.{json,md,png} bench/results/"
    return "$FAILED"
}

main 2>&1 | tee "$OUT_DIR/log.txt"
exit "${PIPESTATUS[0]}"
