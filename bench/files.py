#!/usr/bin/env python3
"""Directory backup benchmark: memory and time of a `[[files]]` backup of ~1 GB.

    python3 bench/files.py [--size-mb 1024] [--debug] [--keep]

Builds a tree of --size-mb of files under a temporary directory (a few large files of
incompressible bytes, many small text files in nested folders, links), then times,
under GNU time:

  dbkeeper run-job files.backup   (defaults: zstd 3, encrypted, verify=read, which
                                   decrypts and parses the whole tar as it is written)
  dbkeeper restore files --to DIR (authenticates the whole archive, extracts beside
                                   DIR, swaps it in)
  tar -cf - | zstd -3 | openssl enc (the cron-script pipeline, for comparison)

and prints seconds, stored size and dbkeeper's peak RSS (target: <= 64 MiB whatever
the tree's size: the tar is streamed through a bounded pipe, never held).
Uses target/release/dbkeeper (built if missing) or, with --debug, target/debug.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd):
    """Runs a shell command under GNU time; returns (seconds, peak RSS MiB)."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", "bash", "-c", cmd], text=True, capture_output=True)
    if out.returncode != 0:
        sys.exit(f"command failed: {cmd}\n{out.stderr}")
    secs, rss_kib = out.stderr.strip().splitlines()[-1].split()
    return float(secs), int(rss_kib) / 1024


def build_tree(root: Path, size_mb: int):
    """~size_mb MiB: 80% in 64 MiB files of random bytes, the rest as small files."""
    rnd = random.Random(7)
    big = size_mb * 8 // 10
    for i in range(max(1, big // 64)):
        with open(root / f"blob-{i}.bin", "wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
    small_total = (size_mb - big) << 20
    words = b"alpha beta gamma delta upload invoice order storage thumbnail cache".split()
    written, n = 0, 0
    while written < small_total:
        d = root / f"uploads/{n % 37:02d}/{n % 11:02d}"
        d.mkdir(parents=True, exist_ok=True)
        body = b" ".join(rnd.choice(words) for _ in range(rnd.randint(100, 4000)))
        (d / f"file-{n}.txt").write_bytes(body)
        written += len(body)
        n += 1
    (root / "latest").symlink_to("uploads/00/00")
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--debug", action="store_true", help="use target/debug/dbkeeper")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    profile = "debug" if args.debug else "release"
    binary = ROOT / "target" / profile / "dbkeeper"
    if not binary.exists():
        subprocess.run(["cargo", "build"] + ([] if args.debug else ["--release"]), cwd=ROOT, check=True)
    work = Path(tempfile.mkdtemp(prefix="dbkeeper-bench-files-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    tree = work / "tree"
    tree.mkdir()
    small = build_tree(tree, args.size_mb)
    total = int(subprocess.run(["du", "-sb", str(tree)], capture_output=True, text=True, check=True).stdout.split()[0])
    print(f"tree: {total / 2**20:.0f} MiB, {small} small files ({profile} binary)", flush=True)
    key = work / "k"
    subprocess.run([binary, "key", "generate", "-o", key], check=True, capture_output=True)
    config = work / "dbkeeper.toml"
    config.write_text(
        f'[daemon]\nstate-dir = "{work}/state"\n\n'
        f'[[files]]\nname = "files"\npath = "{tree}"\n'
        f'[files.backup]\nschedule = "manual"\ndestination = "{work}/backups"\n'
        f'encryption-key-file = "{key}"\n'
    )
    secs, rss = timed(f"{binary} run-job -c {config} files.backup > /dev/null 2>&1")
    stored = sum(p.stat().st_size for p in (work / "backups" / "files").glob("*.dbk"))
    print(f"  dbkeeper backup     {secs:7.2f} s  {stored / 2**20:8.1f} MiB  peak RSS {rss:6.1f} MiB", flush=True)
    secs_r, rss_r = timed(f"{binary} restore -c {config} files --to {work}/restored > /dev/null 2>&1")
    print(f"  dbkeeper restore    {secs_r:7.2f} s  {'':8}      peak RSS {rss_r:6.1f} MiB", flush=True)
    secs_t, _ = timed(
        f"tar -C {tree} -cf - . | zstd -3 -q -T0 | openssl enc -aes-256-cbc -pbkdf2 -pass pass:x > {work}/script.tar.zst.enc"
    )
    script = (work / "script.tar.zst.enc").stat().st_size
    print(f"  tar | zstd | openssl {secs_t:6.2f} s  {script / 2**20:8.1f} MiB", flush=True)
    peak = max(rss, rss_r)
    print(f"  peak RSS {peak:.1f} MiB  [<= 64 MiB]  {'ok' if peak <= 64 else 'OVER'}")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)], check=True)


if __name__ == "__main__":
    main()
