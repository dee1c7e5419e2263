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

  S3          (when moto is importable, or with --s3 alone) against a local moto server
              started for the run: dbkeeper run-job <db>.backup to a local folder, the
              same to s3://<bucket>/bench only, and pg_dump -Fc piped into boto3
              upload_fileobj (what an `aws s3 cp - s3://…` cron job does), in turns.
              `--s3` times only this section; `--no-s3` leaves it out.

and prints times, sizes, ratios and peak RSS (dbkeeper's at two database sizes).
Needs PostgreSQL on 127.0.0.1 (user postgres), pg_dump, sqlite3, gzip, openssl; for S3,
python3 with `moto[server]` and boto3 (.ci/run installs them).
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
import time
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
    encryption = f'encryption-key-file = "{work}/bench.key"'
    if variant == "recipients":
        # The data key wrapped for an age recipient instead of the key file.
        recipient = (work / "bench-age.txt").read_text().split("public key: ")[1].split()[0]
        encryption = f'recipients = ["{recipient}"]'
    databases = "".join(
        f"""
[[database]]
name = "{name}"
url = "{url}"
[database.backup]
schedule = "manual"
destination = "{work}/backups"
{encryption}
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
    ap.add_argument("--s3", action="store_true", help="time only the S3 section (needs moto[server])")
    ap.add_argument("--no-s3", action="store_true", help="leave the S3 section out of the full run")
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

    big_pg, small_pg = f"dbk_bench_{args.size_mb}", f"dbk_bench_{args.small_mb}"
    if args.s3:
        if not moto_available():
            sys.exit("--s3 needs moto[server] and boto3: pip install 'moto[server]' (see .ci/run)")
        print(f"preparing data (~{args.size_mb} MB) …", flush=True)
        ensure_pg(big_pg, args.size_mb)
        s3_section(args, work, big_pg, out, dict(os.environ, RUST_LOG="warn"))
        return
    print(f"preparing data (~{args.size_mb} MB and ~{args.small_mb} MB) …", flush=True)
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
    cfg_rcpt = None
    if shutil.which("age-keygen"):
        identity = work / "bench-age.txt"
        identity.unlink(missing_ok=True)
        sh(["age-keygen", "-o", str(identity)])
        cfg_rcpt = write_config(work, big_pg, big_lite, "recipients")
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

    def recipients_row(db):
        """The default backup of `db` with the data key wrapped for an age recipient
        instead of the key file: its time, or None without age-keygen."""
        if not cfg_rcpt:
            return None
        t, m = median_run(f"{BIN} run-job -c {cfg_rcpt} {db}.backup", args.runs, env)
        row("dbkeeper (defaults, age recipient instead of key)", t, m,
            newest_archive(work / "backups" / db).stat().st_size)
        return t

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
    dbk_pg_rcpt = recipients_row("pg")
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
    dbk_lite_rcpt = recipients_row("lite")
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
    if dbk_pg_rcpt:
        print(f"  age recipient time / key file time         {dbk_pg_rcpt / dbk_pg:5.2f} (PostgreSQL), "
              f"{dbk_lite_rcpt / dbk_lite:.2f} (SQLite)  [~1.00: one X25519 operation per backup]")
    else:
        print("  age recipient vs key file: skipped (age-keygen is not installed: apt-get install age)")
    print(f"  decrypt+decompress speed                   {read_speed:5.0f} MiB/s  [>= 300 MB/s]")
    print(f"  peak RSS                                   {max(m_big, m_small, m_small_lite):5.1f} MiB  [<= 64 MiB]")
    print()
    restore_section(args, cfg, out, env)
    print()
    if args.no_s3:
        pass
    elif moto_available():
        s3_section(args, work, big_pg, out, env)
    else:
        print("S3: skipped (moto is not installed: pip install 'moto[server]', see .ci/run)")


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


def moto_available():
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


class Moto:
    """A moto S3 server on a free loopback port with one bucket, for the length of a
    `with` block. It keeps objects in memory (large ones spill to temporary files)."""

    def __init__(self, logdir, bucket="dbk-bench"):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self.log = Path(logdir) / "moto.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        import urllib.request

        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    sys.exit(f"moto did not start; its log:\n{self.log.read_text()[-2000:]}")
                time.sleep(0.05)
        self.client().create_bucket(Bucket=bucket)

    def env(self):
        return {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
            config=Config(proxies={}),
        )

    def objects(self, prefix):
        """{key: size} under prefix."""
        found = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            found.update((o["Key"], o["Size"]) for o in page.get("Contents", []))
        return found

    def close(self):
        self.proc.kill()
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pg_config(work, name, pg_name, destination, settings=""):
    """A config with the big PostgreSQL database only, backed up with the defaults
    (zstd 3, encrypted, verify=read) or `settings` to `destination` (a TOML value)."""
    cfg = work / f"bench-{name}.toml"
    cfg.write_text(f"""[daemon]
state-dir = "{work}/state-{name}"
listen = "127.0.0.1:0"

[[database]]
name = "pg"
url = "{PG}/{pg_name}"
[database.backup]
schedule = "manual"
destination = {destination}
{encryption}
keep = {{ last = 1 }}
{settings}
""")
    return cfg


def s3_section(args, work, big_pg, out, env):
    """dbkeeper to a local folder, dbkeeper to S3 (moto on this machine), and
    pg_dump -Fc | boto3 upload_fileobj, on the same database, in turns."""
    print(f"S3 (moto on 127.0.0.1, same data, median of {args.runs}, runs in turns)")
    with Moto(out) as moto:
        local_dir = work / "backups-s3cmp"
        shutil.rmtree(local_dir, ignore_errors=True)
        cfg_local = pg_config(work, "local", big_pg, f'"{local_dir}"')
        s3_url = f"s3://{moto.bucket}/bench"
        s3_prefix = {"s3": "bench/", "s3nv": "bench-nv/"}

        def s3_dest(prefix):
            return (f'{{ url = "s3://{moto.bucket}/{prefix.rstrip("/")}", endpoint = "{moto.endpoint}", '
                    'region = "us-east-1", allow-http = true }')

        cfg_s3 = pg_config(work, "s3", big_pg, s3_dest(s3_prefix["s3"]))
        cfg_s3nv = pg_config(work, "s3nv", big_pg, s3_dest(s3_prefix["s3nv"]), 'verify = "none"')
        s3_env = dict(env, **moto.env())
        upload = out / "upload_fileobj.py"
        upload.write_text(f"""import sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url="{moto.endpoint}", aws_access_key_id="test", aws_secret_access_key="test",
                  region_name="us-east-1", config=Config(proxies={{}}))
s3.upload_fileobj(sys.stdin.buffer, "{moto.bucket}", sys.argv[1])
""")
        dump_key = f"pgdump/{big_pg}.dump"

        # A dbkeeper without S3 destinations rejects the table form; one that takes the
        # config but writes somewhere else is caught after the first run below.
        check = subprocess.run([str(BIN), "check", "-c", str(cfg_s3)], text=True, capture_output=True,
                               env=s3_env, cwd=out)
        s3_ok = check.returncode == 0
        if not s3_ok:
            print("  dbkeeper → S3: SKIPPED, this dbkeeper rejects the S3 destination config "
                  "(S3 destinations not in this build yet?):")
            print("    " + "\n    ".join((check.stderr or check.stdout).strip().splitlines()[-6:]))

        ways = [("local", f"{BIN} run-job -c {cfg_local} pg.backup", env)]
        if s3_ok:
            ways.append(("s3", f"{BIN} run-job -c {cfg_s3} pg.backup", s3_env))
            ways.append(("s3nv", f"{BIN} run-job -c {cfg_s3nv} pg.backup", s3_env))
        ways.append((
            "upload",
            f"set -o pipefail; pg_dump -Fc {PG}/{big_pg} | {sys.executable} {upload} {dump_key}",
            None,
        ))
        times = {name: [] for name, _, _ in ways}
        rss = {name: 0.0 for name, _, _ in ways}
        for _ in range(args.runs):
            for name, cmd, run_env in list(ways):
                if name in s3_prefix and not s3_ok:
                    continue
                if name in s3_prefix:
                    out_run = subprocess.run(["/usr/bin/time", "-f", "%e %M", "bash", "-c", cmd], text=True,
                                             capture_output=True, env=run_env, cwd=out)
                    prefix = s3_prefix[name]
                    archives = {k: v for k, v in moto.objects(prefix).items() if k.endswith(".dbk")}
                    if out_run.returncode != 0 or not archives:
                        s3_ok = False
                        why = ("it failed:\n    " + "\n    ".join(out_run.stderr.strip().splitlines()[-6:])
                               if out_run.returncode != 0 else
                               f"it succeeded but no .dbk object is under s3://{moto.bucket}/{prefix} "
                               "(it wrote somewhere else)")
                        print(f"  dbkeeper → S3: SKIPPED, {why}")
                        continue
                    secs, kib = out_run.stderr.strip().splitlines()[-1].split()
                    secs, peak = float(secs), int(kib) / 1024
                else:
                    secs, peak = timed(cmd, run_env)
                times[name].append(secs)
                rss[name] = max(rss[name], peak)

        local_size = newest_archive(local_dir / "pg").stat().st_size
        sizes = {"local": local_size}
        for name, prefix in s3_prefix.items():
            sizes[name] = max((v for k, v in moto.objects(prefix).items() if k.endswith(".dbk")), default=0)
        sizes["upload"] = moto.objects(dump_key).get(dump_key, 0)
        labels = {
            "local": "dbkeeper → local folder (defaults, verify=read)",
            "s3": f"dbkeeper → {s3_url} only",
            "s3nv": "  the same with verify=none",
            "upload": "pg_dump -Fc | boto3 upload_fileobj",
        }
        base = statistics.median(times["local"])
        print(f"  {'':<48} {'seconds':>8} {'÷ local':>8} {'size MiB':>9} {'peak RSS':>9}")
        for name in labels:
            if not times.get(name):
                print(f"  {labels[name]:<48} {'skipped':>8}")
                continue
            t = statistics.median(times[name])
            print(f"  {labels[name]:<48} {t:8.2f} {t / base:8.2f} {sizes[name] / 2**20:9.1f} {rss[name]:7.1f} MiB")
        print("  (peak RSS: the largest single process of the command; moto runs on this machine, so "
              "its CPU time competes with every S3 row)")
        if times.get("s3"):
            t = statistics.median(times["s3"])
            print(f"  dbkeeper S3 time / local time              {t / base:5.2f}  [<= 1.20]")
            print(f"  dbkeeper S3 peak RSS                       {rss['s3']:5.1f} MiB  [<= 64 MiB]")
        print("  (all runs: " + "; ".join(f"{n} " + " ".join(f"{x:.2f}" for x in ts) for n, ts in times.items())
              + ")")
        print()


if __name__ == "__main__":
    main()
