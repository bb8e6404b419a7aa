#!/usr/bin/env python
"""Data-loader throughput: our webdataset reader vs OpenCLIP's training pipeline, same run.

Both pipelines read the same shards, decode JPEGs to 384 px on the shorter side, tokenise
captions and batch in DataLoader worker processes; the main process only consumes batches.  For each worker
count, the pipelines are run one after the other, in an order that alternates between
repeats, each measured over a fixed window after a warm-up; the median over repeats is
reported.  Two speeds per run:

* images/s (wall clock) and images/s per worker (workers = the cores they may use);
* images per worker CPU-second (CPU time of the worker processes during the window), which
  does not depend on what else the machine is running: the number to compare on a shared box.

Pipelines:

* ``ours``: ``WdsBatches`` + ``ResumableLoader`` with ``SampleDecoder('itm')`` and ``Collate``
  as shipped: header check, full JPEG decode, ViLT's aspect-preserving geometry (shorter side
  384, longer at most 639) with torch's uint8 antialiased bicubic (transformers'
  ``ViltImageProcessor`` kernel), patches packed into a static 228-slot sequence in shared
  memory.  Variants: ``+ jpeg_draft`` (``data.jpeg_draft=true``: libjpeg's reduced-scale
  decode first), and ``stretch 384x640`` (``data.image_resize=stretch``, the old geometry).
* ``openclip``: ``open_clip_train.data.get_wds_dataset`` (resampled shards, its shuffle
  buffer, ``wds.decode('pilrgb')``) with ``open_clip.image_transform(384, is_train=True)``
  (RandomResizedCrop(scale 0.9-1) bicubic, ToTensor, Normalize) and its BPE tokenizer;
  needs ``pip install open-clip-torch pandas`` (not the [training] extra: it pins
  webdataset<=0.2.86), and one patch for webdataset>=0.2.96 (``_patch_openclip_eof``).

Without ``--shards``, a CC3M-like shard set is synthesised (photo-like JPEGs: colour fields,
shapes, texture and noise; 333-1024 px sides; quality 90; 4:2:0) with ``ShardWriter``.

    python tools/bench_data.py --out docs/bench_data_result.md   # synthetic shards, ~2.5 min
    python tools/bench_data.py --http --out docs/bench_stream_result.md   # + the same shards over loopback HTTP
    python tools/bench_data.py --shards '/data/cc3m/{00000..00331}.tar' --workers 1 2 4
"""
from __future__ import annotations

import argparse
import gc
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace

import numpy as np

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
warnings.filterwarnings("ignore", message="The given buffer is not writable")

# CC3M-like sizes (w, h): mostly 4:3 / 3:2 landscape, some portrait
SIZES = [(500, 375), (640, 480), (800, 600), (1024, 768), (500, 333), (640, 427), (768, 1024), (375, 500),
         (1000, 667), (900, 600), (1024, 683), (600, 800)]
_NOUNS = ("dog", "beach", "city", "woman", "man", "car", "tree", "house", "mountain", "river", "child", "street",
          "cake", "flower", "bird", "boat", "table", "garden", "sunset", "building")
_ADJS = ("red", "old", "small", "beautiful", "large", "modern", "happy", "wooden", "green", "empty")
_TEMPL = ("a {a} {n} standing next to a {n2} in the {n3}", "portrait of a {a} {n} with a {n2}",
          "{a} {n} on the {n2} at {n3} time", "person walking with a {n} near the {a} {n2}",
          "the {a} {n} and a {a2} {n2} by the {n3}, stock photo")


# --- synthetic shards ------------------------------------------------------------------------
def photo(rng: np.random.Generator, w: int, h: int, noise: np.ndarray):
    """A photo-like RGB image: smooth colour fields, flat shapes, mid-frequency texture and
    sensor-like noise (about 2 bits/pixel at JPEG quality 90, like web photos)."""
    from PIL import Image, ImageDraw
    base = rng.integers(0, 256, (int(rng.integers(2, 5)), int(rng.integers(2, 5)), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        k = int(rng.integers(3))
        if k == 0:
            d.ellipse([x0, y0, x1, y1], fill=c)
        elif k == 1:
            d.rectangle([x0, y0, x1, y1], fill=c)
        else:
            d.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=c)
    tex = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    oy, ox = int(rng.integers(0, noise.shape[0] - h)), int(rng.integers(0, noise.shape[1] - w))
    a = (np.asarray(img, dtype=np.int16) + ((np.asarray(tex, dtype=np.int16) - 128) // 6)[..., None]
         + noise[oy:oy + h, ox:ox + w])
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def caption(rng: np.random.Generator) -> str:
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    return pick(_TEMPL).format(a=pick(_ADJS), a2=pick(_ADJS), n=pick(_NOUNS), n2=pick(_NOUNS), n3=pick(_NOUNS))


def build_shards(out_dir: str, n: int, per_shard: int, quality: int, subsampling: str, seed: int = 0) -> dict:
    """Synthesise ``n`` samples into ``out_dir`` (img2dataset layout); returns stats."""
    from dide_scale.data.shards import ShardWriter, sample, shard_pattern
    rng = np.random.default_rng(seed)
    side = max(max(s) for s in SIZES) + 8
    noise = (rng.integers(-7, 8, (side, side, 1), dtype=np.int16)
             + rng.integers(-3, 4, (side, side, 3), dtype=np.int16))
    sub = {"420": 2, "422": 1, "444": 0}[subsampling]
    nbytes = npix = 0
    t0 = time.perf_counter()
    with ShardWriter(out_dir, per_shard) as sw:
        for i in range(n):
            w, h = SIZES[int(rng.integers(len(SIZES)))]
            buf = io.BytesIO()
            photo(rng, w, h, noise).save(buf, format="JPEG", quality=quality, subsampling=sub)
            data = buf.getvalue()
            nbytes, npix = nbytes + len(data), npix + w * h
            sw.write(sample(f"{i:08d}", data, caption(rng)))
    return {"pattern": shard_pattern(out_dir), "images": n, "mean_kb": nbytes / n / 1e3,
            "bpp": 8 * nbytes / npix, "mean_mpix": npix / n / 1e6, "seconds": time.perf_counter() - t0}


def shard_stats(pattern: str, limit: int = 200) -> dict:
    """Image count (sizes.json when present) and size statistics of the first samples."""
    import json

    from PIL import Image

    from dide_scale.data.pipeline import expand_sources, iter_raw_samples
    urls = [u for s in expand_sources(pattern) for u in s.urls]
    sizes_f = os.path.join(os.path.dirname(urls[0]), "sizes.json")
    count = None
    if os.path.exists(sizes_f):
        sz = json.load(open(sizes_f))
        count = sum(int(sz.get(os.path.basename(u), 0)) for u in urls)
    nbytes = npix = k = 0
    for u in urls:
        for raw in iter_raw_samples(u):
            if "jpg" not in raw:
                continue
            im = Image.open(io.BytesIO(raw["jpg"]))
            nbytes, npix, k = nbytes + len(raw["jpg"]), npix + im.width * im.height, k + 1
            if k >= limit:
                break
        if k >= limit:
            break
    return {"pattern": pattern, "images": count, "shards": len(urls), "mean_kb": nbytes / max(k, 1) / 1e3,
            "bpp": 8 * nbytes / max(npix, 1), "mean_mpix": npix / max(k, 1) / 1e6}


# --- pipelines --------------------------------------------------------------------------------
class Run:
    """One started loader: an iterator of batches and a way to stop its workers."""

    def __init__(self, it, stop):
        self.it, self.stop = it, stop


def start_ours(pattern: str, variant: str, workers: int, bs: int, tokenizer: str, max_len: int,
               open_shards: int = 4) -> Run:
    """``variant``: 'vilt' (as shipped), 'vilt+draft' (data.jpeg_draft), 'stretch' (384x640)."""
    from dide_scale.data.pipeline import ResumableLoader, WdsBatches, expand_sources
    from dide_scale.data.transforms import Collate, Geometry, SampleDecoder
    geo = Geometry("stretch", 384, 640, 32) if variant == "stretch" else Geometry("vilt", 384, 639, 32)
    dec = SampleDecoder("itm", geo, draft=variant == "vilt+draft")
    col = Collate(tokenizer, max_len, geo.max_patches)
    ds = WdsBatches(expand_sources(pattern), dec, col, bs, seed=0, resampled=True,
                    open_shards=open_shards, num_workers=workers)
    gen = iter(ResumableLoader(ds, pin_memory=False, repeat=True))
    return Run(((len(b["keys"]), int(b["patch_valid"].sum()) * 32 * 32) for b in gen), gen.close)


def serve_over_http(pattern: str):
    """The shards' directory served by ``python -m http.server`` on loopback (its own process, as
    a real server is); returns (process, the same pattern as http:// URLs)."""
    import subprocess

    from dide_scale.distributed import free_port
    d = os.path.dirname(pattern)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", d],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import urllib.request
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/sizes.json", timeout=1).read()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/{os.path.basename(pattern)}"


def skip_costs(pattern: str, http_pattern: str) -> list[tuple[str, int, float]]:
    """Seconds to re-open the first shard and reach its last sample (what resuming a stream
    in a shard's last sample costs), local vs HTTP."""
    from dide_scale.data.pipeline import expand_sources, read_piece
    out = []
    for where, pat in (("local disk", pattern), ("loopback HTTP", http_pattern)):
        src = expand_sources(pat)[0]
        n = src.sizes[0] - 1 if src.sizes else 0
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            next(read_piece(src.urls[0], 0, n, None, None))
            times.append(time.perf_counter() - t0)
        out.append((where, n, statistics.median(times)))
    return out


def _patch_openclip_eof(ocd) -> None:
    """webdataset >= 0.2.96 ends every shard with an EOF marker ``{}`` that OpenCLIP's
    ``group_by_keys_nothrow`` cannot handle (KeyError 'fname'; webdataset#384, open_clip#935;
    OpenCLIP's [training] extra pins webdataset<=0.2.86, this project needs >=0.2.90).
    The upstream-suggested fix: ``tar_file_expander(..., eof_value=None)``, i.e. the old
    behaviour; everything else in OpenCLIP's pipeline is unchanged."""
    import inspect

    from webdataset.tariterators import tar_file_expander, url_opener
    if "eof_value" not in inspect.signature(tar_file_expander).parameters or getattr(ocd, "_bench_patched", False):
        return

    def tarfile_to_samples_nothrow(src, handler=ocd.log_and_continue):
        streams = url_opener(src, handler=handler)
        files = tar_file_expander(streams, handler=handler, eof_value=None)
        return ocd.group_by_keys_nothrow(files, handler=handler)
    ocd.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow
    ocd._bench_patched = True


def start_openclip(pattern: str, size: int, workers: int, bs: int, is_train: bool = True) -> Run:
    import open_clip
    import open_clip_train.data as ocd
    _patch_openclip_eof(ocd)
    args = SimpleNamespace(train_data=pattern, val_data=None, dataset_resampled=True, train_num_samples=10 ** 9,
                           train_data_upsampling_factors=None, seed=0, batch_size=bs, world_size=1,
                           workers=workers, val_num_samples=None)
    pre = open_clip.image_transform(size, is_train=is_train)
    info = ocd.get_wds_dataset(args, pre, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    from torch.utils.data import DataLoader
    # wds.WebLoader is a DataPipeline around a torch DataLoader (persistent workers): iterate
    # that DataLoader directly (same batches) so its workers can be shut down afterwards
    loader = info.dataloader
    loader = next((p for p in getattr(loader, "pipeline", []) if isinstance(p, DataLoader)), loader)
    it = iter(loader)

    def stop():
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        loader._iterator = None
    return Run(((len(images), images[0].numel() // 3 * len(images)) for images, _ in it), stop)


# --- measurement ------------------------------------------------------------------------------
def _children_cpu(proc) -> float:
    tot = 0.0
    for c in proc.children(recursive=True):
        try:
            t = c.cpu_times()
            tot += t.user + t.system
        except Exception:  # exited meanwhile
            pass
    return tot


def measure(start, workers: int, warmup_s: float, window_s: float) -> dict:
    import psutil
    me = psutil.Process()
    t_start = time.perf_counter()
    run = start()
    try:
        n_warm = 0
        t_first = None
        for _ in run.it:  # warm-up: worker start, tokenizer load, shard opens, OpenCLIP's shuffle fill
            t_first = t_first or time.perf_counter()
            n_warm += 1
            if time.perf_counter() - t_start >= warmup_s and n_warm >= 2 * max(1, workers):
                break
        first = time.perf_counter() - t_start
        c0, m0, t0 = _children_cpu(me), time.process_time(), time.perf_counter()
        images = batches = pixels = 0
        for n, px in run.it:
            images += n
            pixels += px
            batches += 1
            if time.perf_counter() - t0 >= window_s and batches >= 2 * max(1, workers):
                break
        dt = time.perf_counter() - t0
        wcpu = _children_cpu(me) - c0 if workers else time.process_time() - m0
        mcpu = time.process_time() - m0
    finally:
        run.stop()
        for c in psutil.Process().children(recursive=True):  # let no worker run into the next measurement
            try:
                c.wait(timeout=10)
            except Exception:
                pass
        gc.collect()
    return {"images": images, "seconds": dt, "ips": images / dt, "out_kpix": pixels / max(images, 1) / 1e3,
            "worker_cpu": wcpu, "main_cpu": mcpu,
            "ips_per_cpu": images / wcpu if wcpu > 0 else float("nan"), "warmup": first,
            "first_batch": t_first - t_start, "total": time.perf_counter() - t_start}


# --- report -----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> str:
    import open_clip
    import PIL
    import torch
    import torchvision
    import webdataset
    from PIL import features
    jpeg = features.version("jpg") or "?"
    turbo = " (libjpeg-turbo)" if features.check_feature("libjpeg_turbo") else ""
    return (f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"Pillow {PIL.__version__} with libjpeg {jpeg}{turbo}, numpy {np.__version__}, "
            f"webdataset {webdataset.__version__}, open-clip-torch {open_clip.__version__}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default=None, help="existing shards (brace pattern); default: synthesise a set")
    ap.add_argument("--images", type=int, default=600, help="synthetic images to write")
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--subsampling", choices=["420", "422", "444"], default="420",
                    help="chroma subsampling of the synthetic JPEGs (web photos: mostly 4:2:0)")
    ap.add_argument("--keep", default=None, help="write the synthetic shards here and keep them (reused if present)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=32,
                    help="images per batch (32, the figure of BENCHMARKS section 2)")
    ap.add_argument("--size", type=int, default=384, help="OpenCLIP's square output size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.2, help="seconds per run before the window")
    ap.add_argument("--window", type=float, default=2.5, help="measured seconds per run")
    ap.add_argument("--tokenizer", default="builtin:demo", help="our Collate's tokenizer (offline default)")
    ap.add_argument("--max-text-len", type=int, default=40)
    ap.add_argument("--openclip-transform", choices=["train", "val"], default="train")
    ap.add_argument("--variants", nargs="+", default=["vilt", "vilt+draft", "stretch"],
                    choices=["vilt", "vilt+draft", "stretch"], help="our decoder settings to measure")
    ap.add_argument("--http", action="store_true",
                    help="also read the same shards from a loopback HTTP server (`python -m http.server`), and "
                         "measure what a resume's skip within a shard costs, local vs HTTP")
    ap.add_argument("--no-openclip", dest="openclip", action="store_false", help="skip OpenCLIP's pipeline")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    load0 = os.getloadavg()
    tmp = None
    if args.shards:
        info = shard_stats(args.shards)
        shard_note = f"`{args.shards}`: {info['shards']} shards, {info['images'] or '?'} images"
    else:
        d = args.keep or tempfile.mkdtemp(prefix="dide_bench_data_")
        tmp = None if args.keep else d
        from dide_scale.data.shards import read_sizes, shard_pattern
        if args.keep and sum(read_sizes(d).values()) == args.images:
            info = shard_stats(shard_pattern(d))
            info["images"] = args.images
        else:
            info = build_shards(d, args.images, args.per_shard, args.quality, args.subsampling)
            print(f"synthesised {info['images']} images in {info['seconds']:.1f} s -> {info['pattern']}",
                  file=sys.stderr)
        shard_note = (f"synthetic, {info['images']} photo-like JPEGs (quality {args.quality}, "
                      f"{args.subsampling[0]}:{args.subsampling[1]}:{args.subsampling[2]}, sides 333-1024 px)"
                      f" in {-(-info['images'] // args.per_shard)} shards, written with `ShardWriter`")
    pattern = info["pattern"]
    S = args.size
    pipes = []  # (key, label, output size, worker counts, factory(workers))
    is_train = args.openclip_transform == "train"
    if args.openclip:
        pipes.append(("openclip", f"OpenCLIP `get_wds_dataset` + `image_transform({S}, is_train={is_train})`",
                      f"{S}x{S}", args.workers, lambda w: start_openclip(pattern, S, w, args.batch_size, is_train)))

    labels = {"vilt": "ours as shipped: ViLT geometry 384/639, full decode, bicubic",
              "vilt+draft": "ours + `data.jpeg_draft=true`", "stretch": "ours, `data.image_resize=stretch` 384x640"}
    for v in args.variants:
        pipes.append((v, labels[v], "384 shorter, <= 639" if v != "stretch" else "384x640", args.workers,
                      (lambda v: lambda w: start_ours(pattern, v, w, args.batch_size, args.tokenizer,
                                                      args.max_text_len))(v)))
    server = None
    if args.http:
        server, http_pattern = serve_over_http(pattern)
        pipes.append(("vilt_http", "ours as shipped, the same shards from a loopback HTTP server",
                      "384 shorter, <= 639", args.workers,
                      lambda w: start_ours(http_pattern, "vilt", w, args.batch_size, args.tokenizer,
                                           args.max_text_len)))
    results: dict[tuple[str, int], list[dict]] = {}
    for rep in range(args.repeats):
        for w in args.workers:
            todo = [p for p in pipes if w in p[3]]
            if rep % 2:  # alternate the order between repeats
                todo = todo[::-1]
            for key, _, _, _, factory in todo:
                r = measure(lambda: factory(w), w, args.warmup, args.window)
                results.setdefault((key, w), []).append(r)
                print(f"rep {rep} workers {w} {key:12s} {r['ips']:7.1f} img/s  {r['ips_per_cpu']:7.1f} img/cpu-s "
                      f"(window {r['seconds']:.1f} s, {r['images']} images; first batch after "
                      f"{r['first_batch']:.1f} s, run {r['total']:.1f} s)", file=sys.stderr)
    load1 = os.getloadavg()
    skips = skip_costs(pattern, http_pattern) if args.http else None
    if server is not None:
        server.kill()
        server.wait()

    med = {k: {m: statistics.median(r[m] for r in v) for m in ("ips", "ips_per_cpu", "out_kpix")}
           for k, v in results.items()}
    rng_ = {k: (min(r["ips"] for r in v), max(r["ips"] for r in v)) for k, v in results.items()}
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    lines = [
        "### Data pipeline throughput: ours vs OpenCLIP (`tools/bench_data.py`)",
        "",
        f"- Machine: {cpu_model()}, {cores} cores available ({os.cpu_count()} online); "
        f"load average {load0[0]:.1f} before, {load1[0]:.1f} after",
        f"- Versions: {versions()}",
        f"- Shards: {shard_note}; mean {info['mean_kb']:.0f} KB, {info['mean_mpix']:.2f} Mpixel, "
        f"{info['bpp']:.2f} bits/pixel",
        f"- Settings: batch {args.batch_size}, workers {args.workers} (one core each), resampled shard streams; "
        f"each run: {args.warmup:g} s warm-up, then a {args.window:g} s window; {args.repeats} repeats, "
        "pipelines alternated, median (min-max of images/s)",
        f"- OpenCLIP: `open_clip_train.data.get_wds_dataset(dataset_resampled=True)` (shuffle buffer, "
        f"`wds.decode('pilrgb')`), `open_clip.image_transform({S}, is_train={args.openclip_transform == 'train'})` "
        "(train: RandomResizedCrop(scale 0.9-1.0, bicubic) + ToTensor + Normalize, float32 out), "
        "`get_tokenizer('ViT-B-32')` (BPE, 77 tokens); webdataset>=0.2.96 needs `eof_value=None` in its "
        "`tarfile_to_samples_nothrow` (patched here, webdataset#384)",
        f"- Ours: `WdsBatches` + `ResumableLoader`, `SampleDecoder('itm', Geometry(...))` (header check, decode, "
        f"torch uint8 antialiased bicubic resize, patches packed in shared memory), "
        f"`Collate('{args.tokenizer}', {args.max_text_len}, 228)`, open_shards 4, uint8 out (each model normalises "
        "on its device)",
        "- images/s per worker = images/s / workers; images per worker CPU-s = images / CPU time of the worker "
        "processes in the window (independent of other load on the machine)",
        "",
        "| pipeline | output | mean output kpixels | workers | images/s | images/s per worker | images per worker "
        "CPU-s | ours / OpenCLIP (per worker; per CPU-s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label, out, wl, _ in pipes:
        for w in wl:
            m = med[(key, w)]
            lo, hi = rng_[(key, w)]
            oc = med.get(("openclip", w))
            ratio = ("-" if key == "openclip" or oc is None else
                     f"{m['ips'] / oc['ips']:.2f}x; {m['ips_per_cpu'] / oc['ips_per_cpu']:.2f}x")
            lines.append(f"| {label} | {out} | {m['out_kpix']:.0f} | {w} | {m['ips']:.0f} ({lo:.0f}-{hi:.0f}) | "
                         f"{m['ips'] / max(w, 1):.0f} | {m['ips_per_cpu']:.0f} | {ratio} |")
    if skips:
        lines += ["", "What a resume costs: re-opening a shard and skipping the samples already read (read through, "
                  "not decoded), median of 5, one run:", "",
                  "| shard read from | samples skipped | seconds | ms per skipped sample |", "|---|---:|---:|---:|"]
        for where, n, sec in skips:
            lines.append(f"| {where} | {n} | {sec:.3f} | {1000 * sec / max(n, 1):.2f} |")
    lines += ["", f"Total benchmark time {time.perf_counter() - t_all:.0f} s."]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
