#!/usr/bin/env bash
# CI: the install that docs/phi3.md gives for QLoRA, in a fresh venv (nothing from [dev], which brings
# accelerate through PEFT), must run the example with each --quantize value for a few steps (issue #24).
# Its last line says PASS or FAIL; it exits non-zero on a failure.
set -uo pipefail
cd "$(dirname "$0")/.."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python="$work/venv/bin/python"
fail() {
    echo "extras smoke test: FAIL ($1)"
    exit 1
}
start=$SECONDS

python3 -m venv "$work/venv" || fail "python3 -m venv"
"$python" -m pip install --quiet torch==2.13.0 || fail "pip install torch==2.13.0"
"$python" -m pip install --quiet -e ".[hf,qlora]" || fail 'pip install -e ".[hf,qlora]"'
for quantize in nf4 fp4 int8; do
    # A couple of steps on the tiny offline model; HF_HUB_OFFLINE keeps bitsandbytes off the Hub.
    if ! OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$python" examples/phi3_finetune.py --quantize "$quantize" \
            --max-steps 2 --synthetic-examples 40 --exact-match-prompts 2 --batch-size 4 --eval-steps 2 \
            --save-steps 2 --logging-steps 1 --output-dir "$work/out-$quantize" >"$work/log" 2>&1; then
        tail -n 40 "$work/log"
        fail "python examples/phi3_finetune.py --quantize $quantize"
    fi
done
echo "extras smoke test: PASS (.[hf,qlora] in a fresh venv ran --quantize nf4, fp4 and int8; $((SECONDS - start)) s)"
