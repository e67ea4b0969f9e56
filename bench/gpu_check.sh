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
# (bench/README.md says how to fetch them). Writes at most 9 files, all directly in OUT_DIR:
#   log.txt        everything printed below
#   env.txt        nvidia-smi, driver, versions, installed peers
#   pytest.txt     pytest -q over tests/ on CUDA, the kernels' half (see below)
#   compile.txt    tests/test_torch_compile.py: the losses in Inductor graphs
#   sanitizer.txt  python -m bench.cuda_check, plainly and under compute-sanitizer memcheck
#   profile.txt    python -m bench.head_profile (the RL head's time, step by step)
#   <gpu>-<date>-<time>.json, .md, .png   the sweep: copy them into bench/results/ as they are
#
# Budget: 540 s from the start. Each step is stopped by `timeout` at its cap or at what is left
# of the budget, so the script ends in time whatever hangs. The checks of correctness run side
# by side (16 CPUs, one GPU: none of them is timed); the sweep then has the GPU to itself:
#   install     <= 45 s   the project and .whl/*.whl
#   env         <= 15 s
#   checks, together, <= 240 s (the suite took 210 s on the H200 with 8 workers):
#     pytest    the suite's kernel half (FUSED_LOSSES_TEST_BACKENDS=triton: the eager half is
#               CI's) on CUDA, kernels compiled, never interpreted; with pytest-xdist (on the
#               device image) 8 workers compile the ~600 kernel variants side by side. Not:
#               test_compile.py (sm_90 offline, as CI does), the gloo tests (CPU tensors),
#               test_trl.py (TRL's trainer needs `datasets`, absent there)
#     compile   tests/test_torch_compile.py: the losses in Inductor graphs (3 workers)
#     cuda_check, then memcheck: python -m bench.cuda_check (each loss on small CUDA inputs
#               against torch), plainly, then under compute-sanitizer memcheck with PyTorch's
#               allocator cache off
#   sweep       what is left less 85 s; --time-budget (60 s less) stops it starting new cases
#               (those with targets first), so its report is written in time
#   profile     <= 45 s   python -m bench.head_profile: one chunk of the RL head, step by step
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
STEPS=$(mktemp)  # one verdict line per step, also from the steps run side by side

# verdict NAME TEXT: add a step's line to the summary
verdict() { printf '%-11s %s\n' "$1" "$2" >>"$STEPS"; }

# step NAME CAP FILE COMMAND...: run COMMAND under `timeout`, its output appended to FILE
# (and printed, unless QUIET=1: steps run side by side print only their file's tail, at the end)
step() {
    local name=$1 cap=$2 file=$3
    shift 3
    local left=$((DEADLINE - SECONDS))
    ((cap > left)) && cap=$left
    if ((cap < 5)); then
        verdict "$name" "NOT RUN: no time left"
        return 1
    fi
    echo "=== $name (at ${SECONDS}s, at most ${cap}s): $* ==="
    local t0=$SECONDS rc v=ok
    if [[ ${QUIET:-0} == 1 ]]; then
        timeout -s INT -k 10 "$cap" "$@" >>"$file" 2>&1
        rc=$?
    else
        timeout -s INT -k 10 "$cap" "$@" 2>&1 | tee -a "$file"
        rc=${PIPESTATUS[0]}
    fi
    if ((rc == 124 || rc == 137)); then
        v="CUT OFF at ${cap}s"
    elif ((rc != 0)); then
        v="FAILED (exit $rc)"
    fi
    verdict "$name" "$(printf '%-22s %4ss' "$v" $((SECONDS - t0)))"
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

    step install 45 /dev/null bash -c install_project
    if compgen -G ".whl/*.whl" >/dev/null; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    step env 15 "$OUT_DIR/env.txt" bash -c record_env

    # plain pytest keeps the checkout off sys.path (tests/test_api.py checks the install);
    # `python3 -P -m pytest` does the same where no pytest script is on PATH
    local pytest_cmd=(pytest) workers=() compile_workers=()
    command -v pytest >/dev/null || pytest_cmd=(python3 -P -m pytest)
    if python3 -c "import xdist" 2>/dev/null; then
        workers=(-n 8)
        compile_workers=(-n 3)
    fi
    local checks_cap=240 deadline=$DEADLINE
    ((SECONDS + checks_cap < DEADLINE)) && DEADLINE=$((SECONDS + checks_cap))
    echo
    echo "=== checks side by side (at ${SECONDS}s, until ${DEADLINE}s) ==="
    (QUIET=1 FUSED_LOSSES_TEST_BACKENDS=triton step pytest "$checks_cap" "$OUT_DIR/pytest.txt" \
        "${pytest_cmd[@]}" -q -p no:cacheprovider "${workers[@]}" \
        --ignore=tests/test_compile.py --ignore=tests/test_torch_compile.py \
        --ignore=tests/test_trl.py --ignore=tests/test_distributed.py \
        --ignore=tests/test_distributed_linear.py tests) &
    (QUIET=1 step compile "$checks_cap" "$OUT_DIR/compile.txt" "${pytest_cmd[@]}" -q \
        -p no:cacheprovider "${compile_workers[@]}" tests/test_torch_compile.py) &
    (
        export QUIET=1
        step cuda_check 60 "$OUT_DIR/sanitizer.txt" python3 -m bench.cuda_check
        if [[ -n "$SANITIZER" ]]; then
            step memcheck "$checks_cap" "$OUT_DIR/sanitizer.txt" \
                env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
                --error-exitcode 3 --print-limit 20 python3 -m bench.cuda_check
        else
            verdict memcheck "NOT RUN: compute-sanitizer not found"
        fi
    ) &
    wait
    DEADLINE=$deadline
    for f in pytest compile sanitizer; do
        echo "--- $f.txt (tail)"
        tail -n 12 "$OUT_DIR/$f.txt"
    done

    local sweep_cap=$((DEADLINE - SECONDS - 85))
    step sweep "$sweep_cap" /dev/null \
        python3 -m bench --out "$OUT_DIR" --time-budget $((sweep_cap > 120 ? sweep_cap - 60 : sweep_cap / 2))
    step profile 45 "$OUT_DIR/profile.txt" python3 -m bench.head_profile

    local json
    json=$(ls -t "$OUT_DIR"/*.json 2>/dev/null | head -1)
    if [[ -n "$json" ]]; then
        step render 25 /dev/null python3 -m bench render "$json" --out "$OUT_DIR" --no-readme
    else
        verdict render "NOT RUN: the sweep wrote no JSON"
    fi

    echo
    echo "=== gpu_check summary (${SECONDS}s in all) ==="
    cat "$STEPS"
    ls -l "$OUT_DIR"
    [[ -n "$json" ]] && echo "results to commit: cp ${json%.json}.{json,md,png} bench/results/"
    ! grep -v -E '^\S+ +ok ' "$STEPS" >/dev/null
}

main 2>&1 | tee "$OUT_DIR/log.txt"
exit "${PIPESTATUS[0]}"
