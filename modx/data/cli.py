"""Command lines: ``modx-shards`` (build shards) and ``modx-data`` (check, builtin).

Bad input (missing file, no shards matched, wrong columns) exits with status 2 and one
line ``PROG: error: MESSAGE`` on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

from modx.data.builtin import BUILTINS, build_builtin, ensure_builtin_splits
from modx.data.sources import folder_records, records_to_samples, split_of, table_records
from modx.data.stats import SkipStats
from modx.data.urls import DataError
from modx.data.writer import write_shards


def _run(prog: str, main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return main(args)
    except (DataError, FileNotFoundError, NotADirectoryError, PermissionError) as exn:
        message = exn.args[0] if isinstance(exn, DataError) else str(exn)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- modx-shards


def _shards_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modx-shards",
        description="Write img2dataset-layout WebDataset shards (KEY.{jpg,png,webp}, KEY.txt, "
        "KEY.json) plus sizes.json from a CSV/TSV/JSONL table (columns image and caption or "
        "captions), a folder of images with sidecar .txt captions, or a built-in dataset.",
    )
    p.add_argument("input", nargs="?", help="table (.csv/.tsv/.jsonl) or image folder")
    p.add_argument("--builtin", choices=sorted(BUILTINS), help="write a built-in dataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--num-shards", type=int, default=4, help="train shards (--builtin only)")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="fraction of keys (hashed with --seed) written to test-*.tar "
        "(default 0.1 for --builtin, else 0)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="fraction of keys written to val-*.tar, disjoint from train and test "
        "(default 0.1 for --builtin, else 0)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-root", help="base of relative image paths (default: table folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _brace_of(paths: list[str]) -> str:
    if len(paths) == 1:
        return paths[0]
    first, last = (os.path.basename(p) for p in (paths[0], paths[-1]))
    prefix = first.rsplit("-", 1)[0]
    return os.path.join(
        os.path.dirname(paths[0]), f"{prefix}-{{{first[-10:-4]}..{last[-10:-4]}}}.tar"
    )


def _shards(args: argparse.Namespace) -> int:
    if (args.input is None) == (args.builtin is None):
        raise DataError("give exactly one of INPUT (table or folder) or --builtin NAME")
    if args.shard_size < 1 or args.num_shards < 1:
        raise DataError("--shard-size and --num-shards must be >= 1")
    default = 0.1 if args.builtin else 0.0
    fraction = args.test_fraction if args.test_fraction is not None else default
    val = args.val_fraction if args.val_fraction is not None else default
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"--test-fraction must be in [0, 1), got {fraction}")
    if not 0.0 <= val < 1.0 - fraction:
        raise DataError(f"--val-fraction must be in [0, 1 - test fraction), got {val}")
    if args.builtin:
        splits = build_builtin(
            args.builtin,
            args.out,
            num_shards=args.num_shards,
            test_fraction=fraction,
            val_fraction=val,
            seed=args.seed,
            progress=not args.quiet,
        )
        print(json.dumps({k: v for k, v in splits._asdict().items() if v is not None}))
        return 0
    if os.path.isdir(args.input):
        records = list(folder_records(args.input))
    elif os.path.isfile(args.input):
        records = list(table_records(args.input, args.image_root))
    else:
        raise DataError(f"{args.input}: no such file or folder")
    if not records:
        raise DataError(f"{args.input}: no rows")
    stats = SkipStats()
    splits = {"train": [], "val": [], "test": []}
    for rec in records:
        splits[split_of(rec[0], fraction, args.seed, val)].append(rec)
    bar = tqdm(total=len(records), desc="modx-shards", unit="img", disable=args.quiet)
    out = {}
    for name, recs in splits.items():
        if not recs:
            continue
        samples = records_to_samples(_progress(recs, bar), stats)
        paths = write_shards(samples, args.out, name, args.shard_size)
        if paths:
            out[name] = _brace_of(paths)
    bar.close()
    if stats.samples == 0:
        raise DataError(f"{args.input}: no usable rows ({stats.as_dict()['reasons']})")
    print(json.dumps({**out, **stats.as_dict()}))
    return 0


def _progress(items: Iterable, bar: tqdm) -> Iterator:
    for item in items:
        bar.update(1)
        yield item


def shards_main(argv: Sequence[str] | None = None) -> int:
    args = _shards_parser().parse_args(argv)
    return _run("modx-shards", _shards, args)


# ---------------------------------------------------------------- modx-data


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _drop(_image) -> None:
    return None


def _check(args: argparse.Namespace) -> int:
    from modx.data.loader import make_loader

    loader = make_loader(
        args.urls,
        mode="eval",
        batch_size=256,
        preprocess=_drop,  # decode (to catch bad images), keep nothing
        tokenizer=None,
        workers=args.workers,
        rank=0,
        world_size=1,
        captions="all",
    )
    total = loader.num_batches
    for _ in tqdm(
        loader, total=total, desc="modx-data check", unit="batch", disable=args.json or args.quiet
    ):
        pass
    result = loader.stats.as_dict()
    if args.json:
        print(json.dumps(result))
    else:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(result["reasons"].items()))
        print(
            f"samples: {result['samples']}  skipped: {result['skipped']}"
            + (f"  ({reasons})" if reasons else "")
        )
    return 1 if args.strict and result["skipped"] else 0


def _builtin(args: argparse.Namespace) -> int:
    for name in args.names or sorted(BUILTINS):
        if name not in BUILTINS:
            raise DataError(f"unknown built-in dataset {name!r}; choose from {sorted(BUILTINS)}")
        splits = ensure_builtin_splits(name, args.root)
        print(json.dumps({"name": name, "train": splits.train, "val": splits.val, "eval": splits.test}))
    return 0


def _data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modx-data", description="Inspect and prepare shard data.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="stream shards and count good and skipped samples")
    c.add_argument("urls", help="shard spec, e.g. 'data/a/train-{000000..000009}.tar::b/*.tar'")
    c.add_argument("--json", action="store_true", help='print {"samples", "skipped", "reasons"}')
    c.add_argument("--workers", type=_count, default=2, help="reader processes (0: none)")
    c.add_argument("--strict", action="store_true", help="exit 1 when anything was skipped")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_check)
    b = sub.add_parser("builtin", help="build built-in datasets if missing; print their URLs")
    b.add_argument("names", nargs="*", help=f"any of {sorted(BUILTINS)} (default: all)")
    b.add_argument("--root", default="data")
    b.set_defaults(func=_builtin)
    return p


def data_main(argv: Sequence[str] | None = None) -> int:
    args = _data_parser().parse_args(argv)
    return _run("modx-data", args.func, args)
