#!/usr/bin/env bash
# Measures the idle daemon: resident memory and CPU use over a quiet window.
#   bash bench/idle.sh [seconds]        (default 60)
# Starts a release build on a SQLite and (if reachable) a PostgreSQL database with
# jobs scheduled far apart, lets it settle, then samples /proc.
set -euo pipefail
cd "$(dirname "$0")/.."
window=${1:-60}
cargo build --release --quiet
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pg=""
if pg_isready -h 127.0.0.1 -q 2>/dev/null; then
  pg=$'[[database]]\nname = "pg"\nurl = "postgres://postgres@127.0.0.1/postgres"\n[[database.sql]]\nname = "analyze"\nstatement = "ANALYZE"\nschedule = "@daily"\n'
fi
cat > "$work/idle.toml" <<TOML
[daemon]
state-dir = "$work/state"
listen = "127.0.0.1:$port"

[[database]]
name = "lite"
url = "sqlite://$work/lite.db?mode=rwc"
[[database.sql]]
name = "optimize"
statement = "PRAGMA optimize"
schedule = "@hourly"
[[database.sql]]
name = "vacuum"
statement = "VACUUM"
schedule = "0 0 3 * * *"
$pg
TOML
./target/release/dbkeeper run -c "$work/idle.toml" 2>"$work/log" &
pid=$!
for _ in $(seq 50); do curl -sf "127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
sleep 5   # let start-up work (probes, pools) settle
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)
t0=$(ticks); s0=$(date +%s.%N)
# scrape /metrics once per 15 s, like Prometheus would
end=$((SECONDS + window))
while (( SECONDS < end )); do curl -sf "127.0.0.1:$port/metrics" >/dev/null; sleep 15; done
t1=$(ticks); s1=$(date +%s.%N)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
threads=$(awk '/Threads/ {print $2}' "/proc/$pid/status")
python3 - "$t0" "$t1" "$s0" "$s1" "$hz" "$rss" "$hwm" "$threads" <<'PY'
import sys
t0, t1, s0, s1, hz, rss, hwm, threads = map(float, sys.argv[1:])
cpu = (t1 - t0) / hz
wall = s1 - s0
print(f"idle window      {wall:8.1f} s")
print(f"CPU time         {cpu:8.2f} s  ({100 * cpu / wall:.2f}% of one core)")
print(f"RSS now          {rss / 1024:8.1f} MiB")
print(f"RSS peak (HWM)   {hwm / 1024:8.1f} MiB")
print(f"threads          {int(threads):8d}")
PY
