#!/usr/bin/env bash
# ResNet-18 training step and inference: mica (burn 0.21, flex CPU backend) vs PyTorch, same
# machine, same input (1x128x128, batch 32 by default), same thread count. Prints both results
# and the ratios. Not part of CI: it installs torch (about 4.7 GB with its CUDA libraries) into
# a virtual environment from PyPI.
#
#   bench/cnn_vs_pytorch.sh [--size 128] [--batch 32] [--steps 10] [--model resnet18]
#
# Environment: VENV (default bench/.venv-torch), THREADS (default: all cores), PROFILE
# (cargo profile, default release; dev reuses the test build, whose kernels are less optimised),
# SKIP_TORCH=1 to run only the mica side.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=128 BATCH=32 STEPS=10 MODEL=resnet18
while [ $# -gt 0 ]; do
  case "$1" in
    --size) SIZE=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
THREADS=${THREADS:-$(nproc)}
VENV=${VENV:-bench/.venv-torch}
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

echo "== mica (burn flex), $MODEL 1x${SIZE}x${SIZE}, batch $BATCH, $THREADS threads" >&2
# Release, always for figures: since 2026-12-04 the test profile builds mica-cnn at opt-level 1
# and burn-flex at 2 (for build time), so PROFILE=dev no longer runs the same kernels as users do.
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = dev ]; then
  echo "note: PROFILE=dev runs the test profile (mica-cnn at opt-level 1, burn-flex at 2): slower than release, not for figures" >&2
fi
cargo build --profile "$PROFILE" -q -p mica-cnn --features bench --example bench_cnn
dir=${CARGO_TARGET_DIR:-target}/$PROFILE; [ "$PROFILE" = dev ] && dir=${CARGO_TARGET_DIR:-target}/debug
ARGS=(--model "$MODEL" --size "$SIZE" --batch "$BATCH" --steps "$STEPS")
MICA=$($dir/examples/bench_cnn "${ARGS[@]}")
echo "$MICA"
# The same build with each vendored burn-flex patch switched off (vendor/burn-flex/MICA-PATCH.md),
# so each patch's gain is measured in the same run, not against a number from another day. These
# runs time burn's own forward pass only (MICA_CNN_ENGINE=burn): the patches act on burn's path.
STOCK_CONV=$(MICA_CNN_ENGINE=burn MICA_FLEX_STOCK_CONV=1 $dir/examples/bench_cnn "${ARGS[@]}")
GENERIC=$(MICA_CNN_ENGINE=burn MICA_FLEX_GENERIC_COPY=1 MICA_FLEX_STOCK_CONV=1 $dir/examples/bench_cnn "${ARGS[@]}")
STOCK_POOL=$(MICA_FLEX_STOCK_POOL=1 $dir/examples/bench_cnn "${ARGS[@]}")
# mica's training step splits the batch between two data-parallel workers; this run times the
# whole batch in one pass (the step before), in the same build.
ONE_PASS=$($dir/examples/bench_cnn "${ARGS[@]}" --one-pass)
python3 - "$MICA" "$STOCK_CONV" "$GENERIC" "$STOCK_POOL" "$ONE_PASS" <<'PY'
import json, sys
a, b, c, d, e = (json.loads(v) for v in sys.argv[1:6])
print(f"data-parallel training step ({a.get('train_path', '?')}): {a['train_step_ms']:.1f} ms on {a['train_cpu_cores']:.2f} cores "
      f"vs one pass {e['train_step_ms']:.1f} ms on {e['train_cpu_cores']:.2f} cores (x{e['train_step_ms'] / a['train_step_ms']:.2f})")
burn = a.get("infer_burn_images_per_s", a["infer_images_per_s"])
print(f"burn-flex GEMM convolution patch: train step {a['train_step_ms']:.1f} ms vs {b['train_step_ms']:.1f} ms stock "
      f"(x{b['train_step_ms'] / a['train_step_ms']:.2f}), burn's inference {burn:.1f} vs {b['infer_images_per_s']:.1f} img/s "
      f"(x{burn / b['infer_images_per_s']:.2f})")
print(f"burn-flex copy patch (on stock convolutions): train step {b['train_step_ms']:.1f} ms vs {c['train_step_ms']:.1f} ms unpatched "
      f"(x{c['train_step_ms'] / b['train_step_ms']:.2f})")
print(f"burn-flex max-pool patch: train step {a['train_step_ms']:.1f} ms vs {d['train_step_ms']:.1f} ms stock "
      f"(x{d['train_step_ms'] / a['train_step_ms']:.2f})")
if a.get("infer_engine") == "fused":
    print(f"fused inference engine (mica_cnn::fused): {a['infer_images_per_s']:.1f} img/s vs burn's forward pass {burn:.1f} img/s "
          f"(x{a['infer_images_per_s'] / burn:.2f}), same weights, same build")
PY

if [ "${SKIP_TORCH:-0}" = 1 ]; then exit 0; fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== installing torch into $VENV (PyPI)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch
fi

echo "== PyTorch, same model written out by hand (bench/torch_resnet18.py), $THREADS threads" >&2
if [ "$MODEL" != resnet18 ]; then echo "the PyTorch side implements resnet18 only"; exit 0; fi
TORCH=$("$VENV/bin/python" bench/torch_resnet18.py --size "$SIZE" --batch "$BATCH" --steps "$STEPS" --threads "$THREADS")
echo "$TORCH"

python3 bench/ratios.py "$MICA" "$TORCH"
