#!/usr/bin/env bash
# Renders the status page of the demo daemon in headless Chromium and saves a PNG.
#   bash docs/screenshot.sh [out.png]          (default: docs/status-page.png)
# Needs the Debian package chromium (apt-get install chromium).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$repo/docs/status-page.png}")
cargo build --quiet --manifest-path "$repo/Cargo.toml"
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed "s/127.0.0.1:9736/127.0.0.1:$port/" "$repo/config/demo.toml" > "$work/demo.toml"
cd "$work"
"$repo/target/debug/dbkeeper" run -c demo.toml 2>daemon.log &
pid=$!
for _ in $(seq 100); do curl -sf "127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
sleep 7   # a backup (missed at first start) and a few heartbeats
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$work/chrome" --window-size=1280,820 --hide-scrollbars \
  --screenshot="$out" "http://127.0.0.1:$port/" 2>/dev/null
echo "wrote $out"
