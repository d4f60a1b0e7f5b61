#!/usr/bin/env bash
# The checks that need a GPU, in one go: the CUDA tests, the GPU save benchmark and the activation
# checkpointing benchmark on the GPU. Usage: benchmarks/run_gpu.sh OUT_DIR [tests|bench|activation ...]
# (default: all three). Uses $PYTHON (default python3), which must see CUDA and have the package's
# requirements and its lightning/hf extras; $BENCH_GPU_ARGS goes to bench_gpu.py. Logs and results go
# to OUT_DIR.
set -u
out=${1:?usage: benchmarks/run_gpu.sh OUT_DIR [tests|bench|activation ...]}
shift
parts=${*:-tests bench activation}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "$0")/.."
"$py" - <<'EOF'
import torch, importlib
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("lightning", "transformers", "accelerate", "safetensors", "xxhash", "fsspec"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "unavailable:", exc)
EOF
"$py" setup.py -q build_ext --inplace >"$out/build.log" 2>&1 || echo "streaming-copy extension not built (see build.log)"
status=0
for part in $parts; do
  start=$(date +%s)
  case $part in
    tests)
      "$py" -m pytest -q -p no:cacheprovider --timeout=120 $(ls -d tests/gpu 2>/dev/null) \
        "tests/activation/test_activation.py::test_offload_moves_saved_activations_off_the_gpu" 2>&1 \
        | tee "$out/tests.log" | tail -40
      status=$((status | ${PIPESTATUS[0]}));;
    bench)
      "$py" benchmarks/bench_gpu.py --out "$out" ${BENCH_GPU_ARGS:-} 2>&1 | tee "$out/bench_gpu.log" | tail -80
      status=$((status | ${PIPESTATUS[0]}));;
    activation)
      "$py" benchmarks/bench_activation.py --layers 12 --embd 1024 --heads 16 --vocab 32768 --seq 1024 \
        --batch 8 --rounds 10 --warmup 2 --dropout 0.1 --out "$out" 2>&1 | tee "$out/activation.log" | tail -40
      status=$((status | ${PIPESTATUS[0]}));;
    *) echo "unknown part: $part"; status=2;;
  esac
  echo "== $part took $(( $(date +%s) - start )) s"
done
exit $status
