#!/usr/bin/env python3
"""Backup benchmark: dbkeeper against the pipelines people run today, same data, same run.

    python3 bench/backup.py [--size-mb 400] [--runs 3] [--small-mb 100]

Builds a release binary, creates (or reuses) a PostgreSQL database and a SQLite file of
realistic rows (jsonb, text, timestamps, numbers) of about --size-mb, then times, median
of --runs:

  PostgreSQL  dbkeeper run-job <db>.backup (defaults: zstd 3, encrypted, verify=read)
              the same with verify=none, and with compression=gzip (level 6 and 4)
              pg_dump -Fc            (what most people run)
              pg_dump -Fc -Z0 > file (the floor: no compression at all)
              pg_dump -Fc -Z0 | gzip -6 | openssl enc (the cron-script pipeline)
  SQLite      dbkeeper run-job <db>.backup (defaults)
              sqlite3 .backup + gzip -6 + openssl enc
  Reading     dbkeeper backup verify (SHA-256 + decrypt + decompress): MB/s of plaintext
  Restore     dbkeeper restore --create (decrypt to a private file, pg_restore -j <cores>
              into a scratch database, rename swap), pg_restore -d of the pg_dump -Fc
              file, and pg_restore -j <cores> of it, each into a new database

(`--restore-only` takes one dbkeeper backup and one pg_dump -Fc, then times only the
restores: `python3 bench/backup.py --restore-only --size-mb 50 --runs 1` is a quick check.)

and prints times, sizes, ratios and peak RSS (dbkeeper's at two database sizes).
Needs PostgreSQL on 127.0.0.1 (user postgres), pg_dump, sqlite3, gzip, openssl.
"""

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "dbkeeper"
PG = os.environ.get("DBKEEPER_BENCH_PG", "postgres://postgres@127.0.0.1:5432")

WORDS = (
    "the quick brown fox jumps over lazy dog order invoice customer payment refund shipped "
    "delivered pending cancelled warehouse berlin paris tokyo account premium trial basic "
    "session login failed succeeded timeout retry cart checkout discount voucher"
).split()


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, text=True, capture_output=True, **kw).stdout


def psql(db, sql):
    return sh(["psql", f"{PG}/{db}", "-v", "ON_ERROR_STOP=1", "-qAtc", sql]).strip()


def timed(cmd, env=None):
    """Runs a shell command under GNU time; returns (seconds, peak RSS MiB)."""
    out = subprocess.run(
        ["/usr/bin/time", "-f", "%e %M", "bash", "-c", cmd],
        text=True,
        capture_output=True,
        env=env,
    )
    if out.returncode != 0:
        sys.exit(f"command failed: {cmd}\n{out.stderr}")
    secs, rss_kib = out.stderr.strip().splitlines()[-1].split()
    return float(secs), int(rss_kib) / 1024


PG_ROW_SQL = """
INSERT INTO events (created_at, user_id, kind, payload, note, amount)
SELECT timestamptz '2026-01-01' - (i || ' seconds')::interval,
       (random() * 100000)::int,
       (ARRAY['login','logout','purchase','view','search','refund'])[1 + (random() * 5)::int],
       jsonb_build_object(
         'ip', (random()*255)::int || '.' || (random()*255)::int || '.' || (random()*255)::int || '.' || (random()*255)::int,
         'agent', (ARRAY['Mozilla/5.0 (X11; Linux x86_64)', 'Mozilla/5.0 (Windows NT 10.0; Win64; x64)', 'curl/8.5.0', 'okhttp/4.12'])[1 + (random() * 3)::int],
         'session', md5(random()::text),
         'items', jsonb_build_array((random() * 1000)::int, (random() * 1000)::int, (random() * 1000)::int),
         'ok', random() > 0.1),
       CASE WHEN random() < 0.8 THEN
         (SELECT string_agg(w[1 + (random() * {nw})::int], ' ') FROM generate_series(1, 6 + i % 9), (SELECT ARRAY[{words}] AS w) ws)
       END,
       round((random() * 1000)::numeric, 2)
FROM generate_series({start}, {end}) i;
"""


def ensure_pg(name, size_mb):
    exists = sh(["psql", f"{PG}/postgres", "-qAtc", f"SELECT count(*) FROM pg_database WHERE datname = '{name}'"]).strip()
    if exists == "1" and int(psql(name, "SELECT pg_database_size(current_database())")) >= size_mb * 0.95 * 2**20:
        return
    sh(["psql", f"{PG}/postgres", "-qc", f"DROP DATABASE IF EXISTS {name}"])
    sh(["psql", f"{PG}/postgres", "-qc", f"CREATE DATABASE {name}"])
    psql(name, """CREATE TABLE events (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL,
                  user_id int NOT NULL, kind text NOT NULL, payload jsonb NOT NULL, note text, amount numeric(12,2));
                  CREATE INDEX events_user ON events (user_id);""")
    words = ",".join(f"'{w}'" for w in WORDS)
    start, batch = 1, 200_000
    while int(psql(name, "SELECT pg_database_size(current_database())")) < size_mb * 2**20:
        psql(name, PG_ROW_SQL.format(start=start, end=start + batch - 1, words=words, nw=len(WORDS) - 1))
        start += batch
    psql(name, "VACUUM ANALYZE events")


def ensure_sqlite(path, size_mb):
    if path.exists() and path.stat().st_size >= size_mb * 0.95 * 2**20:
        return
    path.unlink(missing_ok=True)
    rng = random.Random(42)
    con = sqlite3.connect(path)
    con.execute("""CREATE TABLE events (id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, user_id INTEGER NOT NULL,
                   kind TEXT NOT NULL, payload TEXT NOT NULL, note TEXT, amount REAL)""")
    con.execute("CREATE INDEX events_user ON events (user_id)")
    kinds = ["login", "logout", "purchase", "view", "search", "refund"]
    agents = ["Mozilla/5.0 (X11; Linux x86_64)", "curl/8.5.0", "okhttp/4.12"]
    i = 0
    while path.stat().st_size < size_mb * 2**20:
        rows = []
        for _ in range(100_000):
            i += 1
            payload = (
                '{"ip":"%d.%d.%d.%d","agent":"%s","session":"%032x","items":[%d,%d],"ok":%s}'
                % (*(rng.randrange(256) for _ in range(4)), rng.choice(agents), rng.getrandbits(128),
                   rng.randrange(1000), rng.randrange(1000), "true" if rng.random() > 0.1 else "false")
            )
            note = " ".join(rng.choice(WORDS) for _ in range(6 + i % 9)) if rng.random() < 0.8 else None
            rows.append((f"2026-01-01T00:00:00Z-{i}", rng.randrange(100000), rng.choice(kinds), payload, note,
                         round(rng.random() * 1000, 2)))
        con.executemany("INSERT INTO events (created_at, user_id, kind, payload, note, amount) VALUES (?,?,?,?,?,?)", rows)
        con.commit()
    con.close()


def median_run(cmd, runs, env=None, before=None):
    results = []
    for _ in range(runs):
        if before:
            before()
        results.append(timed(cmd, env))
    return statistics.median(r[0] for r in results), max(r[1] for r in results)


def newest_archive(dest):
    return max(Path(dest).rglob("*.dbk"), key=lambda p: p.stat().st_mtime)


def write_config(work, pg_name, lite, variant=""):
    """A config with one PostgreSQL and one SQLite database, both backed up with the
    defaults, or with the settings of `variant`."""
    cfg = work / f"bench{variant and '-' + variant}.toml"
    settings = {
        "noverify": 'verify = "none"',
        "gzip6": 'compression = "gzip"\nlevel = 6',
        "gzip4": 'compression = "gzip"\nlevel = 4',
    }.get(variant, "")
    databases = "".join(
        f"""
[[database]]
name = "{name}"
url = "{url}"
[database.backup]
schedule = "manual"
destination = "{work}/backups"
encryption-key-file = "{work}/bench.key"
keep = {{ last = 1 }}
{settings}
"""
        for name, url in [("pg", f"{PG}/{pg_name}"), ("lite", f"sqlite://{lite}")]
    )
    cfg.write_text(f'[daemon]\nstate-dir = "{work}/state"\nlisten = "127.0.0.1:0"\n{databases}')
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=400)
    ap.add_argument("--small-mb", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp/dbkeeper-bench")
    ap.add_argument("--restore-only", action="store_true", help="time only the restores")
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / "backups", ignore_errors=True)
    out.mkdir()
    key = work / "bench.key"
    if not key.exists():
        sh([str(BIN), "key", "generate", "-o", str(key)])
    pass_file = work / "openssl.pass"
    pass_file.write_text("correct horse battery staple\n")

    print(f"preparing data (~{args.size_mb} MB and ~{args.small_mb} MB) …", flush=True)
    big_pg, small_pg = f"dbk_bench_{args.size_mb}", f"dbk_bench_{args.small_mb}"
    ensure_pg(big_pg, args.size_mb)
    if not args.restore_only:
        ensure_pg(small_pg, args.small_mb)
    big_lite, small_lite = work / f"bench-{args.size_mb}.db", work / f"bench-{args.small_mb}.db"
    if not args.restore_only:
        ensure_sqlite(big_lite, args.size_mb)
        ensure_sqlite(small_lite, args.small_mb)
    else:
        big_lite.touch()
    pg_size = int(psql(big_pg, "SELECT pg_database_size(current_database())"))
    print(f"PostgreSQL database {pg_size / 2**20:.0f} MiB, SQLite file {big_lite.stat().st_size / 2**20:.0f} MiB, "
          f"{os.cpu_count()} cores, median of {args.runs}\n", flush=True)

    cfg = write_config(work, big_pg, big_lite)
    cfg_nv = write_config(work, big_pg, big_lite, "noverify")
    cfg_gz6 = write_config(work, big_pg, big_lite, "gzip6")
    cfg_gz4 = write_config(work, big_pg, big_lite, "gzip4")
    cfg_small = write_config(work, small_pg, small_lite, "small")
    env = dict(os.environ, RUST_LOG="warn")
    url = f"{PG}/{big_pg}"
    rows = []

    def row(name, secs, rss, size):
        rows.append((name, secs, rss, size))
        print(f"  {name:<52} {secs:7.2f} s  {size / 2**20:8.1f} MiB  peak RSS {rss:6.1f} MiB", flush=True)

    if args.restore_only:
        sh(f"RUST_LOG=warn {BIN} run-job -c {cfg} pg.backup")
        sh(f"pg_dump -Fc -f {out}/fc.dump {url}")
        restore_section(args, cfg, out, env)
        return

    print("PostgreSQL")
    t, m = median_run(f"{BIN} run-job -c {cfg} pg.backup", args.runs, env)
    dbk_pg_size = newest_archive(work / "backups" / "pg").stat().st_size
    row("dbkeeper (defaults: zstd 3, encrypted, verify=read)", t, m, dbk_pg_size)
    dbk_pg = t
    t, m = median_run(f"{BIN} run-job -c {cfg_nv} pg.backup", args.runs, env)
    row("dbkeeper (zstd 3, encrypted, verify=none)", t, m, newest_archive(work / "backups" / "pg").stat().st_size)
    dbk_pg_nv = t
    t, m = median_run(f"{BIN} run-job -c {cfg_gz6} pg.backup", args.runs, env)
    row("dbkeeper (gzip 6, encrypted, verify=read)", t, m, newest_archive(work / "backups" / "pg").stat().st_size)
    t, m = median_run(f"{BIN} run-job -c {cfg_gz4} pg.backup", args.runs, env)
    row("dbkeeper (gzip 4, encrypted, verify=read)", t, m, newest_archive(work / "backups" / "pg").stat().st_size)
    t, m = median_run(f"pg_dump -Fc -f {out}/fc.dump {url}", args.runs)
    fc_size = (out / "fc.dump").stat().st_size
    row("pg_dump -Fc", t, m, fc_size)
    fc = t
    t, m = median_run(f"pg_dump -Fc -Z0 -f {out}/z0.dump {url}", args.runs)
    row("pg_dump -Fc -Z0 (floor)", t, m, (out / "z0.dump").stat().st_size)
    floor = t
    t, m = median_run(
        f"set -o pipefail; pg_dump -Fc -Z0 {url} | gzip -6 | openssl enc -aes-256-cbc -pbkdf2 -pass file:{pass_file} > {out}/pipe.enc",
        args.runs,
    )
    row("pg_dump -Fc -Z0 | gzip -6 | openssl enc", t, m, (out / "pipe.enc").stat().st_size)
    pipe = t

    print("SQLite")
    t, m = median_run(f"{BIN} run-job -c {cfg} lite.backup", args.runs, env)
    dbk_lite_size = newest_archive(work / "backups" / "lite").stat().st_size
    row("dbkeeper (defaults: zstd 3, encrypted, verify=read)", t, m, dbk_lite_size)
    dbk_lite = t
    t, m = median_run(
        f"set -o pipefail; rm -f {out}/copy.db; sqlite3 {big_lite} '.backup {out}/copy.db' && "
        f"gzip -6 -c {out}/copy.db | openssl enc -aes-256-cbc -pbkdf2 -pass file:{pass_file} > {out}/lite.enc",
        args.runs,
    )
    row("sqlite3 .backup + gzip -6 + openssl enc", t, m, (out / "lite.enc").stat().st_size)
    lite_pipe = t

    print("Reading back")
    raw = pg_size
    manifest = next((work / "backups" / "pg").glob("*.manifest.json")).read_text()
    import json

    raw = json.loads(manifest)["raw_bytes"]
    t, m = median_run(f"{BIN} backup verify -c {cfg} pg", args.runs, env)
    print(f"  dbkeeper backup verify (sha256+decrypt+decompress) {t:.2f} s for {raw / 2**20:.0f} MiB plaintext "
          f"= {raw / 2**20 / t:.0f} MiB/s, peak RSS {m:.1f} MiB")
    read_speed = raw / 2**20 / t

    print(f"Peak RSS at two sizes (~{args.small_mb} MB and ~{args.size_mb} MB)")
    _, m_small = median_run(f"{BIN} run-job -c {cfg_small} pg.backup", 1, env)
    _, m_small_lite = median_run(f"{BIN} run-job -c {cfg_small} lite.backup", 1, env)
    m_big = max(r[2] for r in rows if r[0].startswith("dbkeeper"))
    print(f"  dbkeeper PostgreSQL backup: {m_small:.1f} MiB (small)   SQLite: {m_small_lite:.1f} MiB (small)   "
          f"largest at full size: {m_big:.1f} MiB")

    print("\nRatios (targets in brackets)")
    print(f"  dbkeeper PG time / pg_dump -Fc time        {dbk_pg / fc:5.2f}  [<= 0.60]")
    print(f"  dbkeeper PG size / pg_dump -Fc size        {dbk_pg_size / fc_size:5.2f}  [<= 1.10]")
    print(f"  dbkeeper PG time / pg_dump -Fc -Z0 time    {dbk_pg / floor:5.2f}  [<= 1.30]")
    print(f"    (verify=none: {dbk_pg_nv / fc:.2f} of -Fc, {dbk_pg_nv / floor:.2f} of the floor)")
    print(f"  dbkeeper PG time / pg_dump|gzip|openssl    {dbk_pg / pipe:5.2f}")
    print(f"  dbkeeper SQLite time / .backup+gzip+openssl {dbk_lite / lite_pipe:5.2f}  [<= 0.50]")
    print(f"  decrypt+decompress speed                   {read_speed:5.0f} MiB/s  [>= 300 MB/s]")
    print(f"  peak RSS                                   {max(m_big, m_small, m_small_lite):5.1f} MiB  [<= 64 MiB]")
    print()
    restore_section(args, cfg, out, env)


def restore_section(args, cfg, out, env):
    """Times restoring the same data three ways, each into a database that does not
    exist yet (dropped, then a CHECKPOINT, before every run, so no run pays for the
    previous one's dirty pages), in turns (one of each per round, so a burst of load
    elsewhere on the machine hits all three alike), and prints the medians side by side."""
    target = "dbk_bench_restore"
    target_url = f"{PG}/{target}"
    cores = os.cpu_count() or 1

    def fresh_start():
        sh(["psql", f"{PG}/postgres", "-qc", f"DROP DATABASE IF EXISTS {target} WITH (FORCE)"])
        sh(["psql", f"{PG}/postgres", "-qc", "CHECKPOINT"])

    create = f"psql {PG}/postgres -qc 'CREATE DATABASE {target}' && "
    ways = [
        ("dbkeeper restore --create", f"{BIN} restore -c {cfg} pg --to {target_url} --create", env),
        ("pg_restore -d (pg_dump -Fc file)", f"{create}pg_restore -d {target_url} {out}/fc.dump", None),
        (f"pg_restore -j {cores} -d (pg_dump -Fc file)",
         f"{create}pg_restore -j {cores} -d {target_url} {out}/fc.dump", None),
    ]
    times = {name: [] for name, _, _ in ways}
    peak = 0.0
    rows = 0
    print(f"Restore (same data, into a new database, median of {args.runs}, runs in turns)")
    for _ in range(args.runs):
        for name, cmd, run_env in ways:
            fresh_start()
            secs, rss = timed(cmd, run_env)
            times[name].append(secs)
            if name.startswith("dbkeeper"):
                peak = max(peak, rss)
                rows = int(psql(target, "SELECT count(*) FROM events"))
    fresh_start()
    dbk, one, par = (statistics.median(times[name]) for name, _, _ in ways)
    print(f"  {ways[0][0]:<40} {dbk:7.2f} s  peak RSS {peak:6.1f} MiB")
    print(f"  {ways[1][0]:<40} {one:7.2f} s")
    print(f"  {ways[2][0]:<40} {par:7.2f} s")
    print(f"  ({rows} rows restored by dbkeeper; all runs: "
          + "; ".join(f"{n.split(' (')[0]} " + " ".join(f"{t:.2f}" for t in ts) for n, ts in times.items()) + ")")
    print(f"  dbkeeper restore time / pg_restore -j {cores} time  {dbk / par:5.2f}  [<= 1.00]")
    print(f"  dbkeeper restore time / pg_restore -d time    {dbk / one:5.2f}")


if __name__ == "__main__":
    main()
