#!/usr/bin/env bash
# Validates mica's CPU-time x TDP estimate against CodeCarbon's (process mode, offline tracker),
# on the same CPU workload, with the same TDP and country. Not run in CI: it needs PyPI.
#
# Method (why it is sound):
# - The workload is `mica energy burn` (hidden subcommand): N busy threads for S seconds inside a
#   mica measurement window; it prints mica's report as JSON.
# - CodeCarbon in tracking_mode="process" counts the CPU time of the tracked Python process and
#   of its children (psutil children(recursive=True)), but only for children alive at each
#   sample: a child first seen at a sample contributes nothing before it, and one that exited
#   before the last sample is lost. So the Python driver starts mica first with --handshake
#   (mica prints `ready` and waits), starts the tracker (its baseline includes the child), tells
#   mica to go, reads mica's JSON once the burn is over, stops the tracker while mica is still
#   alive (idle, waiting for stdin to close), and only then lets mica exit. The Python process
#   itself only waits on a pipe, so CodeCarbon's figure covers the same CPU work as mica's.
# - Both use the same TDP (CodeCarbon force_cpu_power, mica --tdp) and the same country
#   (CodeCarbon country_iso_code, mica --country). CodeCarbon divides by psutil.cpu_count()
#   and mica by the online CPUs: the same number. RAM is CodeCarbon's DIMM model x wall time in
#   both (10 W for a small process on x86); the two windows differ only by the handshake's
#   milliseconds.
# - The ratio printed is mica / CodeCarbon for total energy, CPU energy and emissions; each must
#   be within 0.9-1.1.
#
# Usage: bench/energy_vs_codecarbon.sh [SECONDS] [TDP_W] [COUNTRY]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_BURN="${1:-20}"
TDP="${2:-85}"
COUNTRY="${3:-FRA}"
VENV="${MICA_BENCH_VENV:-target/bench-venv-codecarbon}"

# The workload is a spin loop: its speed does not matter, only that both tools see the same CPU
# time, so the dev build (already there after `cargo test`) will do.
cargo build -p mica-cli >&2
MICA="$PWD/target/debug/mica"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "codecarbon==3.3.2"
fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

"$VENV/bin/python" - "$MICA" "$SECONDS_BURN" "$TDP" "$COUNTRY" "$OUT" <<'PY'
import json, subprocess, sys, logging
from codecarbon import OfflineEmissionsTracker

mica, seconds, tdp, country, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
failed = False
for threads in (1, 2):
    child = subprocess.Popen(
        [mica, "energy", "burn", "--handshake", "--seconds", str(seconds), "--threads", str(threads),
         "--tdp", str(tdp), "--country", country, "--no-nvml"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdout.readline().strip() == "ready"
    tracker = OfflineEmissionsTracker(
        project_name=f"burn-{threads}", country_iso_code=country, tracking_mode="process",
        force_cpu_power=tdp, measure_power_secs=1, output_dir=out, log_level="error",
        allow_multiple_runs=True)
    tracker.start()
    child.stdin.write("go\n"); child.stdin.flush()
    mica_report = json.loads(child.stdout.readline())
    tracker.stop()
    child.stdin.close(); child.wait()
    cc = tracker.final_emissions_data
    mica_kwh = mica_report["energy_wh"] / 1000.0
    mica_cpu_kwh = sum(c["energy_wh"] for c in mica_report["components"] if c["component"] == "cpu") / 1000.0
    mica_kg = mica_report["co2e_g"] / 1000.0
    ratios = {
        "energy": mica_kwh / cc.energy_consumed,
        "cpu_energy": mica_cpu_kwh / cc.cpu_energy,
        "emissions": mica_kg / cc.emissions,
    }
    print(f"threads={threads} seconds={seconds} tdp={tdp}W country={country} cpus={cc.cpu_count}")
    print(f"  mica       [{mica_report['method']}]: energy {mica_kwh*1000:.4f} Wh (cpu {mica_cpu_kwh*1000:.4f} Wh), {mica_kg*1000:.4f} gCO2e, {mica_report['duration_s']:.2f} s")
    print(f"  codecarbon [{cc.tracking_mode}]: energy {cc.energy_consumed*1000:.4f} Wh (cpu {cc.cpu_energy*1000:.4f} Wh, ram {cc.ram_energy*1000:.4f} Wh), {cc.emissions*1000:.4f} gCO2e, {cc.duration:.2f} s")
    for k, r in ratios.items():
        ok = 0.9 <= r <= 1.1
        failed |= not ok
        print(f"  ratio mica/codecarbon {k}: {r:.4f} {'OK' if ok else 'OUT OF RANGE'}")
sys.exit(1 if failed else 0)
PY
