"""Streaming shards from where they live: a real HTTP server on loopback, an S3-compatible
server (moto), ``pipe:``; retries, skips, a stall watchdog and stop signals during a wait;
and, by simulation without processes, what 16 and 128 ranks x 8 workers read."""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import record, tiny_overrides
from http_shards import ServerProcess, ShardServer

from dide_scale.data import pipeline
from dide_scale.data.demo import ANSWERS, generate_split
from dide_scale.data.pipeline import (
    DataStalled,
    ReadPolicy,
    ResumableLoader,
    ShardStream,
    Source,
    SourceUnreadable,
    WdsBatches,
    epoch_pieces,
    expand_sources,
)
from dide_scale.data.transforms import Collate, Geometry, SampleDecoder

GEO = Geometry("vilt", 32, 32, 8)
FAST = ReadPolicy(retries=6, backoff_s=0.2, timeout_s=5.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards of 24 demo samples (sizes.json beside them)."""
    d = tmp_path_factory.mktemp("stream")
    generate_split(d, 96, 3, "vqa", samples_per_shard=24)
    return d


@pytest.fixture()
def server(shards):
    s = ShardServer(shards).start()
    yield s
    s.release()
    s.stop()


def loader(pattern, workers=0, bs=4, resampled=True, policy=FAST, status_dir=None, stall=0.0, interrupt=None,
           open_shards=2):
    dec = SampleDecoder("vqa", GEO, 40_000_000, list(ANSWERS))
    ds = WdsBatches(expand_sources(pattern), dec, Collate("builtin:demo", 16, GEO.max_patches), bs, 0,
                    resampled=resampled, open_shards=open_shards, num_workers=workers, policy=policy,
                    status_dir=status_dir)
    return ResumableLoader(ds, stall_timeout_s=stall, poll_s=0.5, interrupt=interrupt)


def keys(ld, n):
    out = []
    for b in ld:
        out += b["keys"]
        if len(out) >= n:
            return out[:n]
    return out


# -- the same stream from anywhere -------------------------------------------------------------

@pytest.mark.parametrize("resampled", [True, False])
def test_http_shards_give_the_local_stream(shards, server, resampled):
    local = keys(loader(f"{shards}/{{00000..00003}}.tar", resampled=resampled), 64)
    remote = keys(loader(server.url("{00000..00003}.tar"), resampled=resampled), 64)
    assert remote == local and len(set(local)) > 40
    assert expand_sources(server.url("{00000..00003}.tar"))[0].sizes == [24] * 4  # sizes.json read over HTTP


def test_pipe_shards_give_the_local_stream(shards):
    """A pipe: pattern is brace-expanded into one command per shard (the shell that runs it
    does not expand braces: every stream read shard 0), and its sizes.json is read through
    the same command, so its pieces start at the same seeded offsets as local ones: the
    streams are the local ones."""
    pattern = f"pipe:cat {shards}/{{00000..00003}}.tar"
    src = expand_sources(pattern)[0]
    assert src.urls[3] == f"pipe:cat {shards}/00003.tar" and src.sizes == [24] * 4 and len(src.offsets[2]) == 24
    for resampled in (True, False):
        local = keys(loader(f"{shards}/{{00000..00003}}.tar", resampled=resampled), 64)
        assert keys(loader(pattern, resampled=resampled), 64) == local
    with pytest.raises(SourceUnreadable, match="exited with 1"):
        keys(loader(f"pipe:cat {shards}/missing.tar", policy=ReadPolicy(retries=1, backoff_s=0.0)), 4)


def test_s3_shards_through_a_local_s3_server(shards, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    from dide_scale.distributed import free_port
    port = free_port()
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    try:
        for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                     "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="shards")
        for f in sorted(shards.iterdir()):
            s3.upload_file(str(f), "shards", f"vqa/{f.name}")
        local = keys(loader(f"{shards}/{{00000..00003}}.tar"), 48)
        assert keys(loader("s3://shards/vqa/{00000..00003}.tar"), 48) == local
        assert expand_sources("s3://shards/vqa/{00000..00003}.tar")[0].sizes == [24] * 4
    finally:
        srv.stop()


def test_resume_over_http_starts_at_the_samples_byte_offsets(shards, server):
    """A resumed stream re-opens its pieces at their next sample's byte (sizes.json's offsets,
    a range request) instead of reading each shard from its start: the same samples for
    fewer bytes."""
    pattern = server.url("{00000..00003}.tar")
    full = keys(loader(pattern), 60)
    first = loader(pattern)
    head = keys(first, 20)
    state = json.loads(json.dumps(first.state_dict()))
    sent = {}
    for ranged in (True, False):
        again = loader(pattern)
        if not ranged:  # the reader as it was: no offsets, every piece read from the shard's start
            for s in again.ds.sources:
                s.offsets = None
        again.load_state_dict(state)
        before = server.bytes_sent
        resumed = keys(again, 4)  # the first batch after the resume
        sent[ranged] = server.bytes_sent - before
        assert head + resumed + keys(again, 36) == full
    assert sent[True] < sent[False]


def test_a_server_without_range_requests_gives_the_same_stream(shards):
    """A web server that answers range requests with the whole file (Python's http.server
    does): the reader falls back to reading from the start, and the stream is the same."""
    srv = ShardServer(shards, ranges=False).start()
    try:
        pattern = srv.url("{00000..00003}.tar")
        full = keys(loader(f"{shards}/{{00000..00003}}.tar"), 60)
        first = loader(pattern)
        head = keys(first, 20)
        again = loader(pattern)
        again.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + keys(again, 40) == full
    finally:
        srv.stop()


HTTPS_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_streaming import keys, loader
first = loader(sys.argv[2])
head = keys(first, 12)
again = loader(sys.argv[2])
again.load_state_dict(json.loads(json.dumps(first.state_dict())))
print(json.dumps(head + keys(again, 28)))
"""


def test_https_shards_go_through_the_same_reader(shards, tmp_path, monkeypatch):
    """https:// is read by the same fsspec path as http://, s3:// and gs://, with TLS verified
    against the certificates the process trusts: a process that trusts the server's
    certificate gets the local stream, also when resumed part-way; one that does not gets an
    error naming the certificate, not retries."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    srv = ShardServer(shards, tls=(str(cert), str(key))).start()
    try:
        pattern = srv.url("{00000..00003}.tar")
        assert pattern.startswith("https://")
        out = subprocess.run([sys.executable, "-c", HTTPS_CHILD, str(Path(__file__).parent), pattern],
                             env=dict(os.environ, SSL_CERT_FILE=str(cert)), capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout.splitlines()[-1]) == keys(loader(f"{shards}/{{00000..00003}}.tar"), 40)
        assert "sizes.json" in srv.requests and any(name.endswith(".tar") for name in srv.requests)
        from dide_scale.data import remote
        judged, transient = [], remote.transient
        monkeypatch.setattr(remote, "transient", lambda e, url: judged.append(transient(e, url)) or judged[-1])
        with pytest.raises(RuntimeError, match=r"could not read https://.*/sizes.json: .*[Cc]ertificate"):
            expand_sources(pattern)  # this process trusts only the usual authorities
        assert judged == [False]  # the first failure was final: no retries
    finally:
        srv.stop()


def test_a_sizes_json_that_cannot_be_read_fails_naming_it(shards, server, monkeypatch):
    """A sizes.json that exists but keeps failing (503) is an error naming it, after retries:
    before, the rank went on without sample counts, reading differently from the others.
    One that does not exist (404) leaves the counts unknown, as before."""
    import functools

    from dide_scale.data import remote
    monkeypatch.setattr(pipeline, "read_json", functools.partial(remote.read_json, backoff_s=0.01))
    server.status["sizes.json"] = 503
    with pytest.raises(RuntimeError, match=r"could not read http://.*/sizes.json: ClientResponseError: 503"):
        expand_sources(server.url("{00000..00003}.tar"))
    assert server.requests.count("sizes.json") >= 4  # retried (3 times) before giving up
    server.status["sizes.json"] = 404
    assert expand_sources(server.url("{00000..00003}.tar"))[0].sizes is None


# -- failures ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_server_that_dies_mid_run_costs_retries_not_data(shards, tmp_path):
    """The server goes down in the middle of a transfer and comes back two seconds later on
    the same port: the reads are retried from where they stopped, counted, and the stream is
    the one an undisturbed read gives (and the one the local shards give)."""
    local = keys(loader(f"{shards}/{{00000..00003}}.tar"), 80)
    srv = ServerProcess(shards, throttle_s=0.002).start()
    ld = loader(srv.url("{00000..00003}.tar"), workers=1)
    got, t0 = [], time.time()
    try:
        for b in ld:
            got += b["keys"]
            if len(got) == 16:  # mid-run: down for 2 s
                srv.stop()
                time.sleep(2.0)
                srv.start()
            if len(got) >= 80:
                break
    finally:
        srv.stop()
    _, _, retries = ld.counters()
    assert got[:80] == local and retries >= 1
    record("server_dies_mid_run", downtime_s=2.0, retries=retries, samples_lost=0, stream_equal=True,
           seconds=round(time.time() - t0, 1))


def test_a_shard_that_keeps_failing_is_skipped_and_counted(shards, server):
    server.status["00001.tar"] = 404
    ld = loader(server.url("{00000..00003}.tar"), resampled=False)
    got = [k for b in ld for k in b["keys"]]
    skipped, _, _ = ld.counters()
    assert skipped["unreadable_shard"] == 1 and len(got) == 72  # the other three shards in full
    assert not any(k.startswith("00001") for k in got)


def test_a_source_whose_shards_all_fail_ends_the_run_naming_it(shards, server):
    for i in range(4):
        server.status[f"0000{i}.tar"] = 503
    with pytest.raises(SourceUnreadable, match=r"source '.*' \(4 shards\).*0000\d\.tar with ClientResponseError: 503"):
        keys(loader(server.url("{00000..00003}.tar"), policy=ReadPolicy(retries=1, backoff_s=0.05)), 4)


@pytest.mark.slow
def test_a_server_that_never_answers_trips_the_stall_watchdog(shards, server, tmp_path):
    # built (its sizes.json read) while the server still answers
    ld = loader(server.url("{00000..00003}.tar"), workers=1, status_dir=str(tmp_path / "status"), stall=3.0,
                policy=ReadPolicy(retries=1, backoff_s=0.1, timeout_s=60.0))
    server.hang.set()
    t0 = time.time()
    with pytest.raises(DataStalled) as e:
        keys(ld, 4)
    waited = time.time() - t0
    assert "no batch for 3 s" in str(e.value) and server.url("0000") in str(e.value)
    assert waited < 15
    record("server_never_answers", stall_timeout_s=3.0, seconds_to_error=round(waited, 1), names_the_shards=True)


def test_preflight_names_a_remote_source_that_does_not_answer(shards, server, capsys):
    from dide_scale.train import main
    server.status["00000.tar"] = 500
    argv = ["--config", "debug", *tiny_overrides(shards, "/tmp/never", **{
        "data.train_shards": server.url("{00000..00003}.tar"), "data.val_shards": ""})]
    assert main(argv) == 2
    assert f"{server.url('00000.tar')} does not answer (ClientResponseError: 500" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stop_signal_while_waiting_for_data_checkpoints_and_requeues(shards, tmp_path):
    """The server hangs; SIGUSR1 arrives while the rank waits for its next batch: the run
    checkpoints its last complete step and exits 42 at once; relaunched with the server back,
    it ends where an undisturbed run over the local shards ends, with the same losses."""
    from dide_scale.train import REQUEUE_EXIT_CODE, StopSignal, main
    srv = ShardServer(shards).start()
    remote, local = tmp_path / "remote", tmp_path / "local"

    def argv(run, pattern):
        return ["--config", "debug", *tiny_overrides(shards, run, **{
            "data.train_shards": pattern, "data.val_shards": "", "data.num_workers": 1, "train.max_steps": 8,
            "data.open_shards": 2, "data.read_timeout_s": 60.0})]
    assert main(argv(local, f"{shards}/{{00000..00003}}.tar")) == 0

    class StopDuringWait(StopSignal):
        """SIGUSR1 once the server has been hanging for a second."""
        def __init__(self):
            super().__init__()
            self.t_hang = None

        @property
        def received(self):
            if self.t_hang is None and len(srv.requests) >= 2:
                srv.hang.set()
                self.t_hang = time.time()
            return signal.SIGUSR1 if self.t_hang and time.time() - self.t_hang > 1.0 else None

        @received.setter
        def received(self, value):
            pass
    try:
        t0 = time.time()
        stop = StopDuringWait()
        assert main(argv(remote, srv.url("{00000..00003}.tar")), stop=stop) == REQUEUE_EXIT_CODE
        exit_s = time.time() - stop.t_hang
        srv.release()
        latest = (remote / "checkpoints" / "latest").read_text()
        assert main(argv(remote, srv.url("{00000..00003}.tar"))) == 0
    finally:
        srv.release()
        srv.stop()
    def losses(run):
        rows = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss/loss"] for r in rows}
    hist, ref = losses(remote), losses(local)
    assert hist == ref
    assert exit_s < 10
    record("stop_during_data_wait", seconds_hang_to_exit=round(exit_s, 1), checkpoint=latest, losses_equal=True,
           total_s=round(time.time() - t0, 1))


# -- right data at scale, by simulation ---------------------------------------------------------

@pytest.fixture()
def synthetic_shards(monkeypatch):
    """Shards that exist only as sample counts: reading one yields {"__key__": "url#i"}."""
    sizes: dict[str, int] = {}

    def fake(url, timeout_s=None, offset=0):
        for i in range(sizes[url]):
            yield {"__key__": f"{url}#{i}", "__url__": url}
    monkeypatch.setattr(pipeline, "iter_raw_samples", fake)

    def make(n_shards, per_shard, name="src"):
        urls = [f"mem://{name}/{i:05d}.tar" for i in range(n_shards)]
        counts = [per_shard - (i % 7) for i in range(n_shards)]  # uneven, as real shards are
        sizes.update(zip(urls, counts))
        return Source(name, urls, 1.0, counts)
    return make


@pytest.mark.parametrize("n_shards,per_shard,ranks", [(87, 1000, 16), (87, 1000, 128), (444, 1000, 16)])
def test_epoch_mode_gives_every_stream_work_and_every_rank_the_same_samples(synthetic_shards, n_shards, per_shard,
                                                                            ranks):
    """finetune_nlvr2's 87 shards at 16 and 128 ranks x 8 workers, finetune_vqa's 444 at 16: every
    stream reads the same number of samples, no sample twice, and all but fewer than one per
    stream of the epoch."""
    src = synthetic_shards(n_shards, per_shard)
    workers = 8
    total = sum(src.sizes)
    per_rank, seen = collections.Counter(), set()
    for r in range(ranks):
        for w in range(workers):
            stream = ShardStream([src], 0, r, ranks, w, workers, resampled=False, open_shards=4)
            got = [raw["__key__"] for raw, _ in stream]
            per_rank[r] += len(got)
            assert seen.isdisjoint(got)
            seen.update(got)
    assert len(set(per_rank.values())) == 1
    assert total - len(seen) < ranks * workers
    # the pieces of one stream are a pure function of (seed, epoch, stream)
    assert epoch_pieces([src], 0, 3, 5, ranks * workers) == epoch_pieces([src], 0, 3, 5, ranks * workers)


@pytest.mark.parametrize("ranks", [16, 128])
def test_streams_that_open_one_shard_do_not_read_it_in_step(synthetic_shards, ranks, capsys):
    """Step 0's global batch (each rank's first batch of 32 from its first worker) from 500
    shards: with every resampled piece starting at the shard's first sample, streams that pick
    the same shard hand out the same samples; with seeded offsets, almost none repeat."""
    src = synthetic_shards(500, 1000)
    rates = {}
    for offsets in (False, True):
        batch = []
        for r in range(ranks):
            stream = iter(ShardStream([src], 0, r, ranks, 0, 8, resampled=True, open_shards=4, offsets=offsets))
            batch += [next(stream)[0]["__key__"] for _ in range(32)]
        rates[offsets] = 1 - len(set(batch)) / len(batch)
    with capsys.disabled():
        print(f"\n{ranks} ranks x 8 workers, global batch {32 * ranks}: duplicate pairs {rates[False]:.2%} with every "
              f"piece from the shard's start, {rates[True]:.2%} with seeded offsets")
    assert rates[True] < 0.005 and rates[False] > 10 * max(rates[True], 1e-3)
    record(f"duplicates_{ranks}_ranks", before=rates[False], after=rates[True], global_batch=32 * ranks)


def test_resampled_pieces_wrap_round_and_read_every_sample_once(synthetic_shards):
    src = synthetic_shards(1, 50)
    stream = ShardStream([src], 0, 0, 1, 0, 1, resampled=True, open_shards=1)
    start = stream._piece(0)[2]
    assert start > 0  # a seeded offset
    got = [next(iter_)[0]["__key__"] for iter_ in [iter(stream)] for _ in range(50)]
    assert sorted(int(k.split("#")[1]) for k in got) == list(range(50))
    assert got[0].endswith(f"#{start}")
