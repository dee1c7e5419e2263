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

    python3 bench/load.py --replicas 3 [--databases 50] [--jobs 4] [--minutes 10]

Replicas (README: "Replicas"): starts N dbkeepers with one configuration, coordinated
through a fresh PostgreSQL database ($DBKEEPER_TEST_PG, default
postgres://postgres@127.0.0.1:5432; dropped at the end), and checks from the claims
table and every replica's /metrics:

  - no double run: each replica's successful runs of a job equal its won claims, and
    the claims table holds one row per (job, fire time) with the replicas' runs summed
    equal to its successful claims,
  - no missed run: every fire time of every job between the first minute and the last
    15 s has a successful claim,
  - prints CPU and RSS per replica.
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


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_healthy(port):
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return
        except OSError:
            time.sleep(0.1)


def psql(url, sql):
    out = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def metric_sum(metrics, name, labels):
    pattern = re.compile(r"^" + re.escape(name) + r"\{([^}]*)\} (\S+)$", re.M)
    return sum(float(m.group(2)) for m in pattern.finditer(metrics) if all(l in m.group(1) for l in labels))


def replicas_main(args):
    """3 replicas x (databases x jobs) jobs through one coordination database."""
    import os
    server = os.environ.get("DBKEEPER_TEST_PG", "postgres://postgres@127.0.0.1:5432")
    coord = f"dbk_bench_coord_{os.getpid()}"
    psql(f"{server}/postgres", f"CREATE DATABASE {coord}")
    work = Path(tempfile.mkdtemp(prefix="dbkeeper-replicas-"))
    jobs = {}
    body = []
    for d in range(args.databases):
        body.append(f'[[database]]\nname = "db{d}"\nurl = "sqlite://{work}/db{d}.db?mode=rwc"\n')
        for j in range(args.jobs):
            schedule = INTERVALS[(d + j) % len(INTERVALS)]
            jobs[f"db{d}.sql.j{j}"] = SECONDS[schedule]
            body.append(f'[[database.sql]]\nname = "j{j}"\nschedule = "{schedule}"\nstatement = "SELECT 1"\n')
    procs = []
    try:
        for r in range(args.replicas):
            port = free_port()
            (work / f"r{r}.toml").write_text(
                f'[daemon]\nstate-dir = "{work}/state{r}"\nlisten = "127.0.0.1:{port}"\nmax-concurrent-jobs = 2\n'
                f'cluster = "bench"\ncoordination = "{server}/{coord}"\n\n' + "\n".join(body))
            log = open(work / f"r{r}.log", "w")
            proc = subprocess.Popen([args.binary, "run", "-c", str(work / f"r{r}.toml")], stderr=log,
                                    env={"RUST_LOG": "warn", "PATH": "/usr/bin:/bin"})
            procs.append((proc, port))
        for _, port in procs:
            wait_healthy(port)
        duration = args.minutes * 60
        started = time.time()
        samples = {i: [] for i in range(len(procs))}
        while time.time() - started < duration:
            time.sleep(min(10, duration - (time.time() - started)))
            for i, (proc, _) in enumerate(procs):
                samples[i].append(rss_kib(proc.pid))
        ended = time.time()
        # Let the last runs record their results.
        time.sleep(3)
        scrapes = [urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode() for _, port in procs]
        cpus = [sum(int(x) for x in Path(f"/proc/{proc.pid}/stat").read_text().split()[13:15]) / 100 for proc, _ in procs]
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            proc.wait(timeout=60)
    url = f"{server}/{coord}"
    try:
        problems = []
        won_rows = psql(url, "SELECT job, replica, count(*) FROM dbkeeper.claims WHERE result = 'success' GROUP BY 1, 2")
        claimed = {}
        for line in won_rows.splitlines():
            job, _replica, n = line.split("|")
            claimed[job] = claimed.get(job, 0) + int(n)
        failures = sum(metric_sum(m, "dbkeeper_job_runs_total", ['result="failure"']) for m in scrapes)
        if failures:
            problems.append(f"{failures:.0f} failed runs")
        doubles = []
        for job in jobs:
            runs = sum(metric_sum(m, "dbkeeper_job_runs_total", [f'job_id="{job}"', 'result="success"']) for m in scrapes)
            won = sum(metric_sum(m, "dbkeeper_job_claims_total", [f'job_id="{job}"', 'result="won"']) for m in scrapes)
            if runs != won or runs > claimed.get(job, 0) + 0.5:
                doubles.append(f"{job}: {runs:.0f} runs, {won:.0f} won claims, {claimed.get(job, 0)} successful claims")
        if doubles:
            problems.append(f"{len(doubles)} jobs ran more often than claimed, e.g. {doubles[:3]}")
        # Missed: every fire time in [start + 60 s, end - 15 s] has a successful claim.
        lo, hi = started + 60, ended - 15
        rows = psql(url, f"SELECT job, extract(epoch FROM fire_at)::bigint FROM dbkeeper.claims "
                         f"WHERE result = 'success' AND fire_at BETWEEN to_timestamp({lo}) AND to_timestamp({hi})")
        have = {}
        for line in rows.splitlines():
            job, at = line.split("|")
            have.setdefault(job, set()).add(int(at))
        missed = []
        for job, interval in jobs.items():
            expected = {t for t in range(int(lo) + 1, int(hi)) if t % interval == 0}
            lost = expected - have.get(job, set())
            if lost:
                missed.append(f"{job}: {len(lost)} of {len(expected)}")
        if missed:
            problems.append(f"{len(missed)} jobs missed fire times, e.g. {missed[:3]}")
        total = sum(claimed.values())
        lost_claims = sum(metric_sum(m, "dbkeeper_job_claims_total", ['result="lost"']) for m in scrapes)
        print(f"{args.replicas} replicas x {len(jobs)} jobs for {args.minutes:g} min, max-concurrent-jobs 2 each")
        print(f"  runs: {total} successful claims, {failures:.0f} failed, {lost_claims:.0f} lost claims")
        for i, (proc, _) in enumerate(procs):
            won = metric_sum(scrapes[i], "dbkeeper_job_claims_total", ['result="won"'])
            rss = samples[i]
            print(f"  replica {i}: {won:.0f} runs, CPU {cpus[i]:.1f} s ({100 * cpus[i] / duration:.1f}% of one core), "
                  f"RSS {rss[0] / 1024:.1f} MiB first sample, {rss[-1] / 1024:.1f} MiB at the end (max {max(rss) / 1024:.1f} MiB)")
    finally:
        psql(f"{server}/postgres", f"DROP DATABASE IF EXISTS {coord} WITH (FORCE)")
    if problems:
        print("FAILED: " + "; ".join(problems))
        print(f"(logs: {work}/r*.log)")
        sys.exit(1)
    print("replicas load test: all checks passed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--databases", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--binary", default=str(ROOT / "target" / "debug" / "dbkeeper"))
    args = ap.parse_args()
    if not Path(args.binary).exists():
        subprocess.run(["cargo", "build", "--quiet"], cwd=ROOT, check=True)
    if args.replicas > 1:
        return replicas_main(args)

    work = Path(tempfile.mkdtemp(prefix="dbkeeper-load-"))
    port = free_port()
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
        wait_healthy(port)
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
        return metric_sum(metrics, name, labels)

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
