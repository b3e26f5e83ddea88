#!/usr/bin/env bash
# ResNet-18 training step and inference at 224 px on an NVIDIA GPU: mica (burn 0.21's CUDA
# backend) beside PyTorch's CUDA, same model, same input, printing the same JSON lines and
# ratios as bench/cnn_vs_pytorch.sh.
#
#   bench/gpu.sh build            # here, on a machine without a GPU: builds the bench binary
#   bench/gpu.sh run [--size 224] [--batch 32] [--steps 20]   # on the GPU machine
#
# `build` compiles `bench_cnn` with `--features cuda` in release into bench/out/bench_cnn_cuda.
# burn 0.21's CUDA backend loads libcuda and NVRTC when it starts, so the binary carries no CUDA
# libraries and runs on any machine with an NVIDIA driver (bench/README.md, "GPU"). It refuses
# a binary over 64 MB (what the device tool carries). `run` needs that binary, an NVIDIA GPU and
# a Python with torch built for CUDA (PYTHON, default python3); it prints both results and the
# ratios. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=bench/out/bench_cnn_cuda

cmd=${1:-}
shift || true
case "$cmd" in
  build)
    cargo build --release -q -p mica-cnn --features cuda,bench --example bench_cnn
    mkdir -p bench/out
    cp "${CARGO_TARGET_DIR:-target}/release/examples/bench_cnn" "$BIN"
    strip "$BIN" 2>/dev/null || true
    bytes=$(stat -c %s "$BIN")
    echo "built $BIN: $((bytes / 1024 / 1024)) MB; dynamic libraries it needs:"
    ldd "$BIN" | sed 's/^/  /'
    if [ "$bytes" -gt $((64 * 1024 * 1024)) ]; then
      echo "error: $BIN is over 64 MB, too large to carry to the GPU machine" >&2
      exit 1
    fi
    ;;
  run)
    SIZE=224 BATCH=32 STEPS=20
    while [ $# -gt 0 ]; do
      case "$1" in
        --size) SIZE=$2; shift 2 ;;
        --batch) BATCH=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
      esac
    done
    [ -x "$BIN" ] || { echo "error: $BIN is missing; run 'bench/gpu.sh build' first" >&2; exit 2; }
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    echo "== mica (burn 0.21 cuda), resnet18 1x${SIZE}x${SIZE}, batch $BATCH" >&2
    MICA=$("$BIN" --device cuda --model resnet18 --size "$SIZE" --batch "$BATCH" --steps "$STEPS" --infer-batches 20)
    echo "$MICA"
    echo "== PyTorch CUDA, same model (bench/torch_resnet18.py)" >&2
    TORCH=$("${PYTHON:-python3}" bench/torch_resnet18.py --device cuda --size "$SIZE" --batch "$BATCH" --steps "$STEPS" --infer-batches 20)
    echo "$TORCH"
    python3 bench/ratios.py "$MICA" "$TORCH"
    ;;
  *)
    echo "usage: bench/gpu.sh build | run [--size N] [--batch N] [--steps N]" >&2
    exit 2
    ;;
esac
