#!/usr/bin/env python
"""Bytes a resume reads from a remote shard server, before and after range reads.

A stream's position is (shard, sample) per open piece; resuming re-opens each piece at its
next sample.  Before range reads, every re-opened piece read its shard from the first byte
and skipped the samples before (read, not decoded); with each sample's byte offset in
``sizes.json`` it starts at that sample's byte instead.  Resampled pieces start at seeded
samples, so the same holds for every piece a stream opens in steady state: the second
figure is the bytes read per byte of the samples used, over a long read.

The shards (random payloads of photo-like sizes, since only bytes are counted) are served
by a loopback HTTP server in a process of its own that answers range requests as web
servers and object stores do and counts the bytes it sends.  ``before`` is the same reader
with the offsets taken away (every piece read from its shard's start), ``after`` as shipped.
Bytes do not depend on the machine's load; the seconds do (one run, alternated).

    python tools/bench_resume.py                      # 4 shards x 1000 samples x ~64 KB, 8 streams
    python tools/bench_resume.py --streams 32 --open-shards 4 --drawn 300
"""
from __future__ import annotations

import argparse
import functools
import http.server
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np


# -- the server -----------------------------------------------------------------------------------
class _Handler(http.server.SimpleHTTPRequestHandler):
    sent = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self._answer(body=False)

    def do_GET(self):  # noqa: N802
        if self.path == "/__bytes__":
            data = str(_Handler.sent).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        start, end = 0, size
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m:
            start, end = int(m.group(1)), min(size, int(m.group(2)) + 1 if m.group(2) else size)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start
            try:
                while left > 0:
                    chunk = f.read(min(left, 1 << 16))
                    self.wfile.write(chunk)
                    left -= len(chunk)
                    with _Handler.lock:
                        _Handler.sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass


def serve(directory: str, port: int) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_Handler, directory=directory))
    httpd.daemon_threads = True
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()


class Server:
    """The shard directory served by ``serve`` in a process of its own."""

    def __init__(self, directory: Path):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(directory)], stdout=subprocess.PIPE,
                                     text=True)
        self.port = int(self.proc.stdout.readline())

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def sent(self) -> int:
        return int(urllib.request.urlopen(self.url("__bytes__"), timeout=10).read())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


# -- shards -----------------------------------------------------------------------------------
def make_shards(d: Path, shards: int, per_shard: int, mean_kb: float, seed: int = 0) -> None:
    """Samples of photo-like sizes (a log-normal JPEG member around ``mean_kb``, a caption, a
    JSON record), written by the project's ShardWriter (sizes.json with sample offsets)."""
    from dide_scale.data.shards import ShardWriter, sample
    rng = np.random.default_rng(seed)
    with ShardWriter(d, per_shard) as w:
        for i in range(shards * per_shard):
            n = int(mean_kb * 1024 * rng.lognormal(0.0, 0.5) / np.exp(0.125))  # mean ~ mean_kb
            w.write(sample(f"{i:09d}", rng.bytes(n), f"caption {i}", {"n": n}))


# -- the reads --------------------------------------------------------------------------------
def streams(pattern: str, n: int, open_shards: int, ranged: bool, states: list | None = None):
    """``n`` resampled streams (4 workers per rank), with or without the shards' offsets."""
    from dide_scale.data.pipeline import ShardStream, expand_sources
    sources = expand_sources(pattern)
    if not ranged:
        for s in sources:
            s.offsets = None
    workers = 4
    ranks = max(1, n // workers)
    return [ShardStream(sources, 0, i // workers, ranks, i % workers, workers, resampled=True,
                        open_shards=open_shards, state=None if states is None else states[i]) for i in range(n)]


def sample_bytes(raw: dict) -> int:
    return sum(len(v) for k, v in raw.items() if not k.startswith("__"))


def close(stream) -> None:
    for slot in stream.slots:
        slot["iter"].close()


def resume_cost(srv: Server, pattern: str, n: int, open_shards: int, drawn: int, ranged: bool) -> dict:
    """Read ``drawn`` samples on each of ``n`` streams, save their positions, then resume every
    stream and read until each of its re-opened pieces has given a sample: bytes the server
    sent for the resume, and seconds."""
    first = streams(pattern, n, open_shards, ranged)
    states = []
    for s in first:
        it = iter(s)
        for _ in range(drawn):
            next(it)
        states.append(s.state())
        close(s)
    before, t0 = srv.sent(), time.perf_counter()
    again = streams(pattern, n, open_shards, ranged, states)
    used = 0
    for s in again:
        it = iter(s)
        while not s.slots or not all(slot["got"] for slot in s.slots):
            used += sample_bytes(next(it)[0])
        close(s)
    return {"bytes": srv.sent() - before, "seconds": time.perf_counter() - t0, "used": used}


def steady_cost(srv: Server, pattern: str, pieces: int, ranged: bool) -> dict:
    """Bytes sent per byte of the samples used, on one stream reading one piece at a time for
    ``pieces`` whole pieces (each a pass over a shard from a seeded sample, round to it)."""
    s = streams(pattern, 1, 1, ranged)[0]
    size = s.sources[0].sizes[0]
    before, t0 = srv.sent(), time.perf_counter()
    used, it = 0, iter(s)
    for _ in range(pieces * size):
        used += sample_bytes(next(it)[0])
    close(s)
    return {"bytes": srv.sent() - before, "seconds": time.perf_counter() - t0, "used": used}


def mb(x: float) -> str:
    return f"{x / 2 ** 20:,.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--kb", type=float, default=64.0, help="mean sample size in KB (default 64)")
    ap.add_argument("--streams", type=int, default=8, help="streams = ranks x 4 workers (default 8)")
    ap.add_argument("--open-shards", type=int, default=4, help="pieces each stream reads at once (data.open_shards)")
    ap.add_argument("--drawn", type=int, default=200, help="samples each stream reads before it is saved")
    ap.add_argument("--pieces", type=int, default=3, help="whole pieces read for the steady-state figure")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, 0)
        return 0
    from dide_scale.data import remote
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "shards"
        make_shards(d, args.shards, args.per_shard, args.kb)
        total = sum(f.stat().st_size for f in d.glob("*.tar"))
        srv = Server(d)
        try:
            pattern = srv.url(f"{{00000..{args.shards - 1:05d}}}.tar")
            res = {}
            for ranged in (False, True, False, True):  # alternated; bytes repeat exactly, seconds do not
                res.setdefault(ranged, []).append(
                    (resume_cost(srv, pattern, args.streams, args.open_shards, args.drawn, ranged),
                     steady_cost(srv, pattern, args.pieces, ranged)))
        finally:
            srv.stop()
    shard_mb = total / args.shards
    print(f"# bench_resume: {args.shards} shards x {args.per_shard} samples (mean {args.kb:g} KB; "
          f"{mb(shard_mb)} MB per shard), {args.streams} streams x data.open_shards={args.open_shards}, "
          f"resumed after {args.drawn} samples each; remote block {mb(remote.BLOCK_BYTES)} MB; loopback HTTP with "
          f"range requests; {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    print("| reader | bytes read per resume (all streams) | per stream | x the bytes of the samples read | "
          f"steady state ({args.pieces} whole pieces): bytes read per byte used | seconds per resume (runs) |")
    print("|---|---:|---:|---:|---:|---|")
    for ranged, name in ((False, "before: every piece read from its shard's start"),
                         (True, "after: range reads from the samples' offsets")):
        runs = res[ranged]
        r, s = runs[0]
        assert all(x[0]["bytes"] == r["bytes"] and x[1]["bytes"] == s["bytes"] for x in runs), "bytes differ"
        secs = ", ".join(f"{x[0]['seconds']:.2f}" for x in runs)
        print(f"| {name} | {mb(r['bytes'])} MB | {mb(r['bytes'] / args.streams)} MB | {r['bytes'] / r['used']:,.0f} | "
              f"{s['bytes'] / s['used']:.2f} | {secs} |")
    before, after = res[False][0][0]["bytes"], res[True][0][0]["bytes"]
    print(f"\nbytes per resume: {before / after:.1f}x fewer with range reads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
