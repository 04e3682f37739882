#!/usr/bin/env bash
# The GPU rows of README's results table, on one GPU, in one go (each step capped, so a slow one
# cannot starve the rest):
#   1. the native attention kernels against the dense reference (tests/models/test_attention_gpu.py);
#   2. long context: attention and `llama-100m` train steps at 2K / 8K / 32K tokens, tokamax against
#      the pure-JAX blockwise kernel, bfloat16 (memory, tokens/s, MFU);
#   3. a `llama-400m` train step (batch 8 x 4096, bfloat16) with tokamax and with the XLA default;
#   4. generation against transformers on the same GPU (bench.generate's decode and RL workloads).
#
#   bash bench/gpu.sh [out_dir]      # default results/gpu; six files: env.txt, gpu_tests.txt, stderr.log,
#                                    # long_context.out (a JSON line per row, then the whole JSON),
#                                    # train_step.out (two JSON objects), generate.json
set -u
out=${1:-results/gpu}
mkdir -p "$out"
export JAX_PLATFORMS=cuda,cpu PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
log="$out/stderr.log"
: >"$log"

run() {  # run NAME SECONDS COMMAND...: stdout appended to $out/NAME, stderr to the log, timing to both
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name: $*" | tee -a "$log"
  timeout "$limit" "$@" >>"$out/$name" 2>>"$log"
  echo "== $name: rc=$? in $((SECONDS - start)) s" | tee -a "$log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$py" -c 'import jax, flax, optax, tokamax, torch, transformers
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__,
      "transformers", transformers.__version__, jax.devices())'
} >"$out/env.txt" 2>>"$log"

run gpu_tests.txt 120 "$py" -m pytest -q -m gpu -rA tests/models/test_attention_gpu.py
run long_context.out 170 "$py" -m bench.long_context --presets=llama-100m --seqs=2048,8192,32768 \
  --kernels=tokamax,blockwise --dtype=bfloat16 --loss_chunks=4096 --run_max_seq=32768 --run_presets=llama-100m \
  --progress
for kernel in tokamax xla; do
  run train_step.out 75 "$py" -m bench.train_step --preset=llama-400m --dtype=bfloat16 --batch=8 --seq=4096 \
    --steps=5 --warmup=1 --attention=$kernel
done
run generate.json 110 "$py" -m bench.generate --workloads=decode,rl
