#!/usr/bin/env bash
# The GPU check (bench/README.md, "GPU"): one script, run from the repository root on a machine
# with one CUDA GPU and torch, transformers and accelerate installed. Wheels for what such a
# machine may lack (trl, datasets, lark, pydantic, ...) are installed from .whl/ when present.
# Writes its results under $OUT (default bench-gpu-out/); SKIP_RUN=1 skips step 1.
#   1. `shapeflow run specs/grpo.shape` on the GPU (builtin:arith-tiny, 100 steps, JSONL tracking);
#   2. bench/run_vs_trl.py --device cuda --model random-qwen2-0.5b: step time and tokens/s of
#      shapeflow's GRPO against TRL's GRPOTrainer on the same batch (16 prompts x 8, 128 new tokens);
#   3. bench/logprob_pass.py --device cuda: peak memory and time of the chunked log-prob pass
#      against autograd on the plain expression (vocab 151936, bf16 autocast).
set -u
OUT=${OUT:-bench-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate, trl; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'trl', trl.__version__)"

if [ -z "${SKIP_RUN:-}" ]; then
echo "== 1. shapeflow run on the GPU"
t0=$(date +%s)
timeout 180 python3 -m shapeflow.cli run specs/grpo.shape --steps 100 --device cuda --tracking jsonl \
  --out /tmp/gpu-run > "$OUT/run.log" 2>&1
echo "exit $? after $(( $(date +%s) - t0 )) s"
tail -n 25 "$OUT/run.log"
cp /tmp/gpu-run/summary.json /tmp/gpu-run/metrics.jsonl "$OUT/" 2>/dev/null
fi

echo "== 2. shapeflow vs TRL GRPOTrainer, random-init Qwen2 (Qwen2.5-0.5B shape)"
timeout 400 python3 bench/run_vs_trl.py --device cuda --model random-qwen2-0.5b --max-new-tokens 128 \
  --steps 8 --warmup 2 --rounds 2 --no-cli 2> "$OUT/vs_trl.err" | tee "$OUT/vs_trl.txt"
echo "exit ${PIPESTATUS[0]}"
tail -n 15 "$OUT/vs_trl.err"

echo "== 3. the log-prob pass: chunked against plain autograd (vocab 151936, bf16 autocast)"
timeout 240 python3 bench/logprob_pass.py --device cuda --vocab 151936 --responses 16 --tokens 512 --rounds 2 \
  2> "$OUT/logprob_pass.err" | tee "$OUT/logprob_pass.txt"
echo "exit ${PIPESTATUS[0]}"
