#!/usr/bin/env python3
"""Load test: many databases and jobs on short schedules, on a small machine.

    python3 bench/load.py [--databases 50] [--jobs 4] [--minutes 10] [--binary PATH]

Starts one dbkeeper with --databases SQLite databases and --jobs `sql` jobs each
(schedules of 5, 7, 11 and 13 seconds, plus cron every 10 s), max-concurrent-jobs 2,
samples its RSS every 10 s, and at the end checks from /metrics and the run history:

  - no job overlapped itself (job_skipped_total{reason="overlap"} == 0),
  - no run failed,
  - every job ran at least (duration / interval) - 2 times (no missed runs beyond the
    delay the concurrency limit causes),
  - RSS at the end is within 20 % (+2 MiB) of RSS after the first minute.

Exits 1 if any check fails. CI runs it for one minute; the closing note quotes a
10-minute run.
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTERVALS = ["every 5s", "every 7s", "every 11s", "every 13s", "*/10 * * * * *"]
SECONDS = {"every 5s": 5, "every 7s": 7, "every 11s": 11, "every 13s": 13, "*/10 * * * * *": 10}


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--databases", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--binary", default=str(ROOT / "target" / "debug" / "dbkeeper"))
    args = ap.parse_args()
    if not Path(args.binary).exists():
        subprocess.run(["cargo", "build", "--quiet"], cwd=ROOT, check=True)

    work = Path(tempfile.mkdtemp(prefix="dbkeeper-load-"))
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    lines = [f'[daemon]\nstate-dir = "{work}/state"\nlisten = "127.0.0.1:{port}"\nmax-concurrent-jobs = 2\n']
    jobs = {}
    for d in range(args.databases):
        lines.append(f'[[database]]\nname = "db{d}"\nurl = "sqlite://{work}/db{d}.db?mode=rwc"\n')
        for j in range(args.jobs):
            schedule = INTERVALS[(d + j) % len(INTERVALS)]
            jobs[f"db{d}.sql.j{j}"] = SECONDS[schedule]
            lines.append(
                f'[[database.sql]]\nname = "j{j}"\nschedule = "{schedule}"\n'
                f'statement = "CREATE TABLE IF NOT EXISTS beats (job TEXT, at TEXT DEFAULT CURRENT_TIMESTAMP); '
                f"INSERT INTO beats (job) VALUES ('j{j}')\"\n"
            )
    (work / "load.toml").write_text("\n".join(lines))
    log = open(work / "daemon.log", "w")
    proc = subprocess.Popen([args.binary, "run", "-c", str(work / "load.toml")], stderr=log, env={"RUST_LOG": "warn", "PATH": "/usr/bin:/bin"})
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        start = time.monotonic()
        duration = args.minutes * 60
        samples = []
        while time.monotonic() - start < duration:
            time.sleep(min(10, duration - (time.monotonic() - start)))
            samples.append((time.monotonic() - start, rss_kib(proc.pid)))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        cpu = [int(x) for x in Path(f"/proc/{proc.pid}/stat").read_text().split()[13:15]]
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    def value(name, labels):
        pattern = re.compile(r"^" + re.escape(name) + r"\{([^}]*)\} (\S+)$", re.M)
        total = 0.0
        for m in pattern.finditer(metrics):
            if all(l in m.group(1) for l in labels):
                total += float(m.group(2))
        return total

    problems = []
    overlap = value("dbkeeper_job_skipped_total", ['reason="overlap"'])
    failures = value("dbkeeper_job_runs_total", ['result="failure"'])
    successes = value("dbkeeper_job_runs_total", ['result="success"'])
    if overlap:
        problems.append(f"{overlap:.0f} overlap skips")
    if failures:
        problems.append(f"{failures:.0f} failed runs")
    short = []
    for job, interval in jobs.items():
        runs = value("dbkeeper_job_runs_total", [f'job_id="{job}"', 'result="success"'])
        expected = duration / interval - 2
        if runs < expected:
            short.append(f"{job}: {runs:.0f} runs, expected at least {expected:.0f}")
    if short:
        problems.append(f"{len(short)} jobs ran too rarely, e.g. {short[:3]}")
    warm = next((r for t, r in samples if t >= 60), samples[0][1])
    last = samples[-1][1]
    if last > warm * 1.2 + 2048:
        problems.append(f"RSS grew from {warm / 1024:.1f} MiB to {last / 1024:.1f} MiB")
    ticks = sum(cpu) / 100
    print(f"{args.databases} databases x {args.jobs} jobs = {len(jobs)} jobs for {args.minutes:g} min, max-concurrent-jobs 2")
    print(f"  runs: {successes:.0f} succeeded, {failures:.0f} failed, {overlap:.0f} overlap skips")
    print(f"  RSS: {samples[0][1] / 1024:.1f} MiB at {samples[0][0]:.0f}s, {warm / 1024:.1f} MiB after warm-up, "
          f"{last / 1024:.1f} MiB at the end (max {max(r for _, r in samples) / 1024:.1f} MiB)")
    print(f"  CPU: {ticks:.1f} s over {duration:.0f} s ({100 * ticks / duration:.1f}% of one core)")
    if problems:
        print("FAILED: " + "; ".join(problems))
        print(f"(daemon log: {work}/daemon.log)")
        sys.exit(1)
    print("load test: all checks passed")


if __name__ == "__main__":
    main()
