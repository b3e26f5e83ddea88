"""Prints mica's figures beside PyTorch's and the ratios the CNN issue targets, from the two
JSON lines that bench_cnn and torch_resnet18.py print."""
import json, sys

a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if "error" in b:
    print(b["error"]); sys.exit(0)
t = a["train_step_ms"] / b["train_step_ms"]
i = a["infer_images_per_s"] / b["infer_images_per_s"]
print(f"train step   mica {a['train_step_ms']:.1f} ms  pytorch {b['train_step_ms']:.1f} ms  "
      f"ratio mica/pytorch {t:.2f} (target <= 2){'' if t <= 2 else '  NOT MET'}")
print(f"inference    mica {a['infer_images_per_s']:.1f} img/s  pytorch {b['infer_images_per_s']:.1f} img/s  "
      f"ratio mica/pytorch {i:.2f} (target >= 1){'' if i >= 1 else '  NOT MET'}")
print(f"cpu cores    training mica {a.get('train_cpu_cores', float('nan')):.2f} pytorch {b.get('train_cpu_cores', float('nan')):.2f}; "
      f"inference mica {a.get('infer_cpu_cores', float('nan')):.2f} pytorch {b.get('infer_cpu_cores', float('nan')):.2f}")
print(f"peak memory  mica {a['peak_rss_mb']:.0f} MB  pytorch {b['peak_rss_mb']:.0f} MB  ratio {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}"
      + (f" (PyTorch GPU memory {b['peak_gpu_mb']:.0f} MB)" if "peak_gpu_mb" in b else ""))
