#!/usr/bin/env bash
# ResNet-18 training step and inference: mica (burn 0.21, flex CPU backend) vs PyTorch, same
# machine, same input (1x128x128, batch 32 by default), same thread count. Prints both results
# and the ratios. Not part of CI: it installs torch (about 4.7 GB with its CUDA libraries) into
# a virtual environment from PyPI.
#
#   bench/cnn_vs_pytorch.sh [--size 128] [--batch 32] [--steps 10] [--model resnet18]
#
# Environment: VENV (default bench/.venv-torch), THREADS (default: all cores), PROFILE
# (cargo profile, default release),
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
# PROFILE=dev reuses the test build: its dependencies and mica-cnn are compiled at opt-level 3
# too, so the kernels are the same code; release adds fat codegen units and takes a cold build.
PROFILE=${PROFILE:-release}
cargo build --profile "$PROFILE" -q -p mica-cnn --example bench_cnn
dir=$PROFILE; [ "$PROFILE" = dev ] && dir=debug
MICA=$(./target/$dir/examples/bench_cnn --model "$MODEL" --size "$SIZE" --batch "$BATCH" --steps "$STEPS")
echo "$MICA"
# The same build with the vendored burn-flex patch switched off (vendor/burn-flex/MICA-PATCH.md),
# so the patch's gain is measured in the same run, not against a number from another day.
GENERIC=$(MICA_FLEX_GENERIC_COPY=1 ./target/$dir/examples/bench_cnn --model "$MODEL" --size "$SIZE" --batch "$BATCH" --steps "$STEPS")
python3 - "$MICA" "$GENERIC" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1])["train_step_ms"], json.loads(sys.argv[2])["train_step_ms"]
print(f"burn-flex patch: train step {a:.1f} ms patched vs {b:.1f} ms unpatched (ratio {a / b:.2f})")
PY

if [ "${SKIP_TORCH:-0}" = 1 ]; then exit 0; fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== installing torch into $VENV (PyPI)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch
fi

echo "== PyTorch, same model written out by hand (torchvision layout), $THREADS threads" >&2
TORCH=$("$VENV/bin/python" - "$SIZE" "$BATCH" "$STEPS" "$THREADS" "$MODEL" <<'PY'
import json, resource, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
size, batch, steps, threads, model_name = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
torch.manual_seed(1)

class Block(nn.Module):
    def __init__(s, cin, cout, stride):
        super().__init__()
        s.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); s.bn1 = nn.BatchNorm2d(cout)
        s.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); s.bn2 = nn.BatchNorm2d(cout)
        s.down = None
        if stride != 1 or cin != cout:
            s.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    def forward(s, x):
        idt = x if s.down is None else s.down(x)
        y = F.relu(s.bn1(s.conv1(x)))
        return F.relu(s.bn2(s.conv2(y)) + idt)

class ResNet18(nn.Module):
    def __init__(s, classes=4):
        super().__init__()
        s.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False); s.bn1 = nn.BatchNorm2d(64)
        s.pool = nn.MaxPool2d(3, 2, 1)
        cfg = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        s.layers = nn.Sequential(*[nn.Sequential(Block(a, b, st), Block(b, b, 1)) for a, b, st in cfg])
        s.drop = nn.Dropout(0.3); s.fc = nn.Linear(512, classes)
    def forward(s, x):
        x = s.pool(F.relu(s.bn1(s.conv1(x))))
        x = s.layers(x)
        return s.fc(s.drop(x.mean((2, 3))))

if model_name != "resnet18":
    print(json.dumps({"error": "the PyTorch side implements resnet18 only"})); sys.exit(0)
m = ResNet18()
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-4)
x = torch.rand(batch, 1, size, size) - 0.5
y = torch.arange(batch) % 4
times = []
m.train()
for s in range(steps + 1):
    t0 = time.perf_counter()
    opt.zero_grad()
    loss = F.cross_entropy(m(x), y)
    loss.backward(); opt.step()
    loss.item()
    if s > 0: times.append(time.perf_counter() - t0)
m.eval()
with torch.no_grad():
    m(x)
    t0 = time.perf_counter()
    for _ in range(10): m(x)
    secs = time.perf_counter() - t0
print(json.dumps({"framework": f"pytorch-{torch.__version__}", "model": model_name, "size": size, "batch": batch,
                  "train_step_ms": round(1000 * sum(times) / len(times), 2),
                  "infer_images_per_s": round(10 * batch / secs, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
PY
)
echo "$TORCH"

python3 - "$MICA" "$TORCH" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if "error" in b: print(b["error"]); sys.exit(0)
print(f"train step   mica {a['train_step_ms']:.1f} ms  pytorch {b['train_step_ms']:.1f} ms  ratio mica/pytorch {a['train_step_ms']/b['train_step_ms']:.2f} (target <= 2)")
print(f"inference    mica {a['infer_images_per_s']:.1f} img/s  pytorch {b['infer_images_per_s']:.1f} img/s  ratio mica/pytorch {a['infer_images_per_s']/b['infer_images_per_s']:.2f} (target >= 1)")
print(f"peak memory  mica {a['peak_rss_mb']:.0f} MB  pytorch {b['peak_rss_mb']:.0f} MB  ratio {a['peak_rss_mb']/b['peak_rss_mb']:.2f}")
PY
