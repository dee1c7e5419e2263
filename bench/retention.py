#!/usr/bin/env python3
"""Retention benchmark: dbkeeper's batched deletes against one plain DELETE.

    python3 bench/retention.py [--rows 1000000] [--runs 3]

Builds a table of --rows rows (60 % older than 30 days, indexed on created_at) and,
median of --runs, times deleting the expired rows with
  - `dbkeeper run-job pg.retention.events` with the defaults (first batch 5000 rows,
    then sized to take about batch-time = 50ms, each its own transaction)
  - the same with batch-time = "0s" (every batch 5000 rows: the first release's way)
  - `DELETE FROM events WHERE created_at < now() - interval '30 days'` (one statement)
while a writer updates random rows (expired ones included) in a loop, and prints the
time ratio and the writer's worst wait in each case. Needs PostgreSQL on 127.0.0.1.
"""

import argparse
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "dbkeeper"
PG = os.environ.get("DBKEEPER_BENCH_PG", "postgres://postgres@127.0.0.1:5432")
DB = "dbk_bench_retention"


def psql(sql, db=DB):
    return subprocess.run(["psql", f"{PG}/{db}", "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
                          check=True, text=True, capture_output=True).stdout.strip()


def prepare(rows):
    psql("DROP TABLE IF EXISTS events")
    psql(f"""CREATE TABLE events (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL, kind text, payload text);
             INSERT INTO events (created_at, kind, payload)
               SELECT now() - CASE WHEN g % 10 < 6 THEN interval '31 days' ELSE interval '0 days' END - (g % 29) * interval '1 day',
                      (ARRAY['view','click','buy'])[1 + g % 3], md5(g::text)
               FROM generate_series(1, {rows}) g;
             CREATE INDEX events_created ON events (created_at);""")
    psql("VACUUM ANALYZE events")


class Writer(threading.Thread):
    """Updates random rows through one psql session; records the slowest statement."""

    def __init__(self, rows):
        super().__init__(daemon=True)
        self.rows, self.stop, self.worst, self.count = rows, threading.Event(), 0.0, 0

    def run(self):
        p = subprocess.Popen(["psql", f"{PG}/{DB}", "-qAt"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        n = 0
        while not self.stop.is_set():
            n += 1
            start = time.monotonic()
            p.stdin.write(f"UPDATE events SET payload = payload || '+' WHERE id = {(n * 7919) % self.rows + 1}; SELECT 1;\n")
            p.stdout.readline()
            self.worst = max(self.worst, time.monotonic() - start)
            self.count += 1
        p.stdin.close()
        p.wait()


def timed(action, rows):
    prepare(rows)
    writer = Writer(rows)
    writer.start()
    time.sleep(0.3)
    start = time.monotonic()
    action()
    took = time.monotonic() - start
    writer.stop.set()
    writer.join()
    left = int(psql("SELECT count(*) FROM events WHERE created_at < now() - interval '30 days'"))
    assert left == 0, f"{left} expired rows left"
    return took, writer.worst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    subprocess.run(["psql", f"{PG}/postgres", "-qc", f"DROP DATABASE IF EXISTS {DB}"], check=True, capture_output=True)
    subprocess.run(["psql", f"{PG}/postgres", "-qc", f"CREATE DATABASE {DB}"], check=True, capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="dbk-retention-"))
    cfg = work / "retention.toml"
    cfg.write_text(f"""[daemon]
state-dir = "{work}/state"
listen = "127.0.0.1:0"
[[database]]
name = "pg"
url = "{PG}/{DB}"
[[database.retention]]
table = "events"
column = "created_at"
older-than = "30d"
schedule = "manual"
[[database.retention]]
table = "events"
name = "fixed"
column = "created_at"
older-than = "30d"
batch-time = "0s"
schedule = "manual"
""")
    env = dict(os.environ, RUST_LOG="warn")

    def job(name):
        return lambda: subprocess.run([str(BIN), "run-job", "-c", str(cfg), f"pg.retention.{name}"],
                                      check=True, capture_output=True, env=env)

    dbk, fixed, plain = [], [], []
    for _ in range(args.runs):
        dbk.append(timed(job("events"), args.rows))
        fixed.append(timed(job("fixed"), args.rows))
        plain.append(timed(lambda: psql("DELETE FROM events WHERE created_at < now() - interval '30 days'"), args.rows))
    t_plain = statistics.median(t for t, _ in plain)
    print(f"{args.rows} rows, {int(args.rows * 0.6)} expired, median of {args.runs}; worst writer wait over all runs")
    for label, runs in [("dbkeeper, adaptive batches (default)", dbk),
                        ("dbkeeper, fixed batches of 5000", fixed),
                        ("one plain DELETE ... WHERE", plain)]:
        t, w = statistics.median(t for t, _ in runs), max(w for _, w in runs)
        print(f"  {label:38} {t:6.2f} s  {t / t_plain:5.2f}x   writer's worst wait {w * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
