#!/usr/bin/env python
"""Serve a run's TensorBoard on localhost and screenshot it with headless Chromium.

    python tools/tb_screenshot.py RUN_DIR docs/tensorboard_scalars.png [--page scalars|images]

Needs Debian's chromium (`apt-get install chromium`).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import urllib.request

from dide_scale.distributed import free_port


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("logdir")
    ap.add_argument("out")
    ap.add_argument("--page", default="scalars", help="TensorBoard plugin tab (scalars, images, text)")
    ap.add_argument("--size", default="1600,1200")
    args = ap.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("chromium not found (apt-get install chromium)", file=sys.stderr)
        return 2
    port = free_port()
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--host", "127.0.0.1",
                           "--port", str(port), "--reload_interval", "0"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(3)  # let TensorBoard finish loading the event files
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--window-size={args.size}", "--virtual-time-budget=20000",
               f"--user-data-dir=/tmp/tb_shot_{port}", f"--screenshot={args.out}", f"{url}#{args.page}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    finally:
        tb.terminate()
        tb.wait()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
