#!/usr/bin/env bash
# Renders a mica HTML report in headless Chromium and saves a full-page screenshot, so a
# person (or CI) can check that the headline table and the inline SVG plots render without
# any network access.
#
#   bench/report_screenshot.sh runs/demo/report.html [out.png]
#
# Exits 0 with a message (and no screenshot) when Chromium is not installed
# (Debian: apt-get install chromium), 1 when the page does not render.
set -euo pipefail

report="${1:?usage: bench/report_screenshot.sh REPORT.html [OUT.png]}"
out="${2:-${report%.html}.png}"
if [[ ! -f "$report" ]]; then
    echo "error: $report: no such report" >&2
    exit 1
fi
browser=""
for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then browser="$b"; break; fi
done
if [[ -z "$browser" ]]; then
    echo "skipped: no headless Chromium found (Debian: apt-get install chromium)"
    exit 0
fi
abs="$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
# No background connections: this machine (and CI) has no general network.
quiet="--no-first-run --disable-background-networking --disable-component-update --disable-sync --disable-quic"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
# The report must not need the network: block every host so a stray link would show up as a
# missing element rather than silently load.
"$browser" --headless=new --no-sandbox --disable-gpu --hide-scrollbars $quiet \
    --user-data-dir="$profile" --host-resolver-rules="MAP * ~NOTFOUND" \
    --window-size=1280,4000 --screenshot="$out" "file://$abs" >/dev/null 2>&1 || true
if [[ ! -s "$out" ]]; then
    echo "error: Chromium produced no screenshot of $report" >&2
    exit 1
fi
# The DOM as Chromium parsed it: the table and the figures must be there.
dom="$("$browser" --headless=new --no-sandbox --disable-gpu $quiet --user-data-dir="$profile" \
    --dump-dom "file://$abs" 2>/dev/null || true)"
tables=$(grep -o '<table class="headline"' <<<"$dom" | wc -l)
svgs=$(grep -o '<svg' <<<"$dom" | wc -l)
if [[ "$tables" -lt 1 || "$svgs" -lt 3 ]]; then
    echo "error: $report rendered without its headline table or figures (tables=$tables, svg=$svgs)" >&2
    exit 1
fi
echo "screenshot: $out (headline table present, $svgs inline figures)"
