#!/usr/bin/env bash
# The first GPU run of lora_layers (issue #26), as one call of the device tool:
#
#     bash benchmarks/gpu_check.sh                 # on the GPU machine, in the repository root
#     bash benchmarks/gpu_check.sh --dry-run       # here, on CPU: the same steps at toy sizes
#     bash benchmarks/gpu_check.sh --dry-run --quick   # the smallest sizes (tests/test_gpu_check.py)
#
# Steps, most valuable first, each under its own timeout (seconds, 480 in all,
# so the whole script ends within 8 minutes on an H100):
#   1 env      (45)  nvidia-smi, torch/triton/CUDA versions, installs only what is missing, imports the project
#   2 tests    (180) pytest -m cuda --device cuda tests/test_device.py: layers, functional, merge, DoRA,
#                    fused loss, lean Phi-3 step, kernels vs torch path, bf16 autocast; fp32, bf16, fp16
#   3 kernels  (120) benchmarks/bench_kernels.py at the Phi-3-mini shapes: correctness, then timings
#   4 phi3     (75)  benchmarks/bench_phi3_step.py --size mini, bf16: lean and plain vs PEFT, saved bytes, peak memory
#   5 example  (60)  examples/phi3_finetune.py, tiny default, 100 steps, bf16 autocast
#
# Everything a step prints goes to $OUT/stepN_NAME.log (OUT defaults to ./gpu_out); $OUT/summary.txt
# has one line per step. The device tool brings back at most 8 files: these 5 logs, the summary,
# kernels.md and phi3_step.json. The exit status is the number of steps that failed or timed out.
# Options: --dry-run, --quick (with --dry-run), --steps 1,3 (a subset). GPU_CHECK_PYTHON picks the python.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
QUICK=0
STEPS="1,2,3,4,5"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --quick) QUICK=1 ;;
        --steps) shift; STEPS="${1:-}" ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (expected --dry-run, --quick, --steps LIST)" >&2; exit 64 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ] && [ "$DRY" = 0 ]; then
    echo "gpu_check.sh: --quick only shrinks a --dry-run; the GPU run has no quick mode" >&2
    exit 64
fi

PY="${GPU_CHECK_PYTHON:-python3}"
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
SCRATCH="$(mktemp -d)"  # the example's checkpoints: many files, kept out of $OUT
trap 'rm -rf "$SCRATCH"' EXIT

# The project runs from this tree whether or not the editable install below works.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ "$DRY" = 1 ]; then
    # Triton's interpreter must be chosen before anything imports triton.
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
    DEVICE=cpu
else
    # Compiled kernels, even where tests/conftest.py would not find /dev/nvidia0 and pick the interpreter.
    export TRITON_INTERPRET=0
    DEVICE=cuda
fi

FAILED=0
step() {  # step N NAME LIMIT_S COMMAND...
    local n="$1" name="$2" limit="$3"
    shift 3
    case ",$STEPS," in *",$n,"*) ;; *) return 0 ;; esac
    local log="$OUT/step${n}_${name}.log" start rc status
    start=$(date +%s)
    echo "== step $n ($name), limit ${limit}s: $*" | tee "$log"
    # bash -c: a step may be one of the functions below (exported)
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >> "$log" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMEOUT after ${limit}s"; FAILED=$((FAILED + 1)) ;;
        *) status="FAILED (exit $rc)"; FAILED=$((FAILED + 1)) ;;
    esac
    echo "step $n $name: $status in $(( $(date +%s) - start ))s -> $(basename "$log")" | tee -a "$SUMMARY"
    [ $rc = 0 ] || tail -n 15 "$log"
}

env_step() {
    nvidia-smi || echo "nvidia-smi: not available"
    if [ "$DRY" = 1 ]; then
        echo "dry run: no package is installed"
    else
        install_missing
    fi
    "$PY" - <<'PYEOF'
import importlib, os, platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "| CUDA runtime", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"| {p.total_memory / 2**30:.1f} GiB | sm_{p.major}{p.minor} | {p.multi_processor_count} SMs")
for name in ("triton", "transformers", "peft", "safetensors", "tokenizers", "numpy", "pytest", "loralib"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "NOT IMPORTABLE:", type(exc).__name__, exc)
import lora_layers
from lora_layers import functional, kernels
print("lora_layers", lora_layers.__version__, "from", os.path.dirname(lora_layers.__file__))
print("kernels.is_available():", kernels.is_available(), kernels.unavailable_reason())
print("AUTO_USES_TRITON:", functional.AUTO_USES_TRITON)
if os.environ.get("GPU_CHECK_DEVICE") == "cuda" and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device: every later step would test the CPU")
PYEOF
}

install_missing() {
    # The GPU machine may reach no package registry: each install is tried once, briefly, and logged.
    local pip=("$PY" -m pip install --retries 0 --timeout 15 --disable-pip-version-check)
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
        || "${pip[@]}" torch==2.13.0 || echo "INSTALL FAILED: torch==2.13.0 (as .ci/run pins it)"
    if ! "$PY" -c "import safetensors, transformers, tokenizers, peft, pytest" 2>/dev/null; then
        "${pip[@]}" -e ".[dev]" || echo "INSTALL FAILED: -e .[dev] (as .ci/run); the steps use PYTHONPATH"
    fi
    "$PY" -c "import triton" 2>/dev/null || "${pip[@]}" triton || echo "INSTALL FAILED: triton"
}

export GPU_CHECK_DEVICE="$DEVICE" DRY PY
export -f env_step install_missing
if [ "$DRY" = 1 ] && [ "$QUICK" = 1 ]; then
    TESTS_K=(-k "test_linear_layers and float32")
    KERNELS=(--smoke --quick)
    PHI3=(--quick --reps 1 --no-phi3)
    EXAMPLE=(--max-steps 2 --synthetic-examples 40 --exact-match-prompts 2 --batch-size 4 --max-length 64
             --tiny-num-hidden-layers 1 --logging-steps 1)
elif [ "$DRY" = 1 ]; then
    TESTS_K=()
    KERNELS=(--smoke)
    PHI3=(--quick)
    EXAMPLE=(--max-steps 3 --synthetic-examples 100 --exact-match-prompts 4 --batch-size 8 --logging-steps 1)
else
    TESTS_K=()
    KERNELS=(--tokens 4096 --reps 10 --warmup 2)
    PHI3=(--device cuda --size mini --layers 2 --dtype bf16 --reps 5 --warmup 1)
    # 64 greedy exact-match prompts instead of 200 keep the two scoring passes inside the step's minute
    EXAMPLE=(--max-steps 100 --logging-steps 10 --exact-match-prompts 64)
fi

step 1 env 45 env_step
step 2 tests 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda --device "$DEVICE" tests/test_device.py \
    "${TESTS_K[@]}"
step 3 kernels 120 "$PY" benchmarks/bench_kernels.py --out "$OUT/kernels.md" "${KERNELS[@]}"
step 4 phi3 75 "$PY" benchmarks/bench_phi3_step.py --out "$OUT/phi3_step.json" "${PHI3[@]}"
step 5 example 60 "$PY" examples/phi3_finetune.py --output-dir "$SCRATCH/example" "${EXAMPLE[@]}"

echo "gpu_check: $FAILED step(s) failed; summary in $SUMMARY" | tee -a "$SUMMARY"
exit "$FAILED"
