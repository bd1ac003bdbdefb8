#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (the `device` tool of this workplace, or
# any CUDA box with jax[cuda] installed). Run from the repository root:
#
#   bash tools/gpu_check.sh [OUTDIR]
#
# Needs: python3 with jax (CUDA), flax, optax, orbax-checkpoint, sentencepiece, pytest,
# pytest-xdist, hypothesis. Wheels of the other requirements (grain, tensorflow-datasets, gguf,
# ...) are installed from ./.whl if that folder exists (no network there), and the benchmark
# spec is read from ./.whl/workloads.json or ../shared/peers/workloads.json.
#
# In the order they run (the most wanted figure first; each step has its own time limit and
# appends to OUTDIR, so a late failure loses nothing before it):
# 1. Step efficiency (issue 19): `scalign.bench train` on Llama-3.2-1B shapes (`llama3_2_1b`,
#    random init), bf16 compute with f32 params and f32 accumulation, cuDNN flash attention
#    (`attention_impl=cudnn`), batch 8 x 2048 tokens, no remat: tokens/s and MFU against the
#    measured bf16 8192^3 matmul peak and against the datasheet's 989 TFLOP/s dense bf16.
# 2. Decode bandwidth: `scalign.bench sample` on the same 1B shapes in bf16 (batch 32, prompt
#    64, 128 greedy tokens): decode_GBps against a measured copy (decode_bw_util); then
#    `sample_llama_small` at full f32 precision (the spec's workload) as before.
# 3. The same train step at batch 16 (a larger step; may not fit: its failure is reported).
# 4. tests/models/test_attention_impl.py (cuDNN vs einsum attention, values and gradients) and
#    tests/test_sampling.py on the GPU.
# 5. A CPU subset of the suite under this machine's jax (the house pins 0.10.2; this machine
#    may have a newer one), 14 workers, 110 s at most.
set -u
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
SPEC=../shared/peers/workloads.json
[ -f .whl/workloads.json ] && SPEC=.whl/workloads.json
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

bench() { local kind=$1 limit=$2; shift 2
  timeout "$limit" python3 -m scalign.bench "$kind" --spec "$SPEC" "$@" 2>>"$OUT/bench.err" \
    | tee -a "$OUT/bench.jsonl"; echo "bench $kind rc=${PIPESTATUS[0]}" | tee -a "$OUT/gpu.txt"; }
ONEB=(--extra model=llama3_2_1b --extra dtype=bfloat16)
TRAIN=(--workload sft_llama_small "${ONEB[@]}" --extra attention_impl=cudnn --extra seq_len=2048
       --extra peak_n=8192 --extra peak_tflops=989 --extra warmup_steps=2 --extra timed_steps=5)

bench train 150 "${TRAIN[@]}" --extra batch=8
bench sample 90 --workload sample_llama_small "${ONEB[@]}" --extra param_dtype=bfloat16 \
  --extra bon=0
JAX_DEFAULT_MATMUL_PRECISION=highest bench sample 60 --workload sample_llama_small \
  --extra bon=0
bench train 110 "${TRAIN[@]}" --extra batch=16

JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 60 python3 -m pytest -q \
  -p no:cacheprovider tests/models/test_attention_impl.py tests/test_sampling.py 2>&1 \
  | tail -15 | tee "$OUT/pytest_gpu.txt"

JAX_PLATFORMS=cpu timeout 110 python3 -m pytest -q -n 14 --dist loadfile -p no:cacheprovider \
  tests/algorithms tests/objectives tests/training tests/evaluation tests/models \
  > "$OUT/pytest_cpu.log" 2>&1
echo "cpu suite rc=$?"; tail -25 "$OUT/pytest_cpu.log"
