"""``dide-data``: dataset preparation.

    dide-data demo --out DIR [--train N --val N --tasks vqa,nlvr2,snli_ve]
    dide-data inspect SHARD.tar ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_demo(args) -> int:
    from .demo import generate_split, write_vocab
    out = Path(args.out)
    for task in args.tasks.split(","):
        for split, n, seed in (("train", args.train, args.seed), ("val", args.val, args.seed + 10_000)):
            d = out / task / split
            generate_split(d, n, seed, task, size=args.size, samples_per_shard=args.per_shard)
            print(f"{d}: {n} samples")
    write_vocab(out / "tokenizer")
    return 0


def cmd_inspect(args) -> int:
    from .pipeline import iter_raw_samples
    for url in args.shards:
        n, members = 0, set()
        try:
            for raw in iter_raw_samples(url):
                n += 1
                members.update(k for k in raw if not k.startswith("__"))
        except Exception as e:  # report, keep going
            print(f"{url}: error after {n} samples: {e}")
            continue
        print(json.dumps({"shard": url, "samples": n, "members": sorted(members)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dide-data", description="dataset preparation")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="write the procedural demo shards")
    d.add_argument("--out", required=True)
    d.add_argument("--train", type=int, default=20_000)
    d.add_argument("--val", type=int, default=2_000)
    d.add_argument("--tasks", default="vqa")
    d.add_argument("--size", type=int, default=32)
    d.add_argument("--per-shard", type=int, default=2_000)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_demo)
    i = sub.add_parser("inspect", help="count samples and members of shards")
    i.add_argument("shards", nargs="+")
    i.set_defaults(fn=cmd_inspect)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
