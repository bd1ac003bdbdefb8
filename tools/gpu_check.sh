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
# 1. `scalign.bench sample` on the GPU: sample_llama_small at full f32 matmul precision
#    (JAX_DEFAULT_MATMUL_PRECISION=highest, the spec's float32) and at the backend's default,
#    and sample_gemma3_270m on a random init of its config (its GGUF is too large to carry).
#    Each line reports decode_GBps against copy_GBps (a measured in-place copy) and
#    decode_bw_util.
# 2. tests/test_sampling.py on the GPU (full-precision matmuls): the cached-vs-uncached greedy
#    and log-prob identities on a second backend.
# 3. The whole test suite on this machine's CPU under its jax version (the house pins 0.10.2;
#    this machine may have a newer one), 14 workers, 300 s at most.
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

bench() { timeout 240 python3 -m scalign.bench sample --spec "$SPEC" "$@" 2>>"$OUT/bench.err" \
  | tee -a "$OUT/bench.jsonl"; }
JAX_DEFAULT_MATMUL_PRECISION=highest bench --workload sample_llama_small
bench --workload sample_llama_small --extra bon=0 --extra copy_bw=0
JAX_DEFAULT_MATMUL_PRECISION=highest bench --workload sample_gemma3_270m --extra init=random \
  --extra bon=0

JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 python3 -m pytest -q \
  -p no:cacheprovider tests/test_sampling.py 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt"

JAX_PLATFORMS=cpu timeout 300 python3 -m pytest -q -n 14 --dist loadfile -p no:cacheprovider \
  tests > "$OUT/pytest_cpu.log" 2>&1
echo "cpu suite rc=$?"; tail -25 "$OUT/pytest_cpu.log"
