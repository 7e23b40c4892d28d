"""Spatial disorder between two checkpoints on a probe set (PAPERS.md section 2).

    python eval/disorder.py --old runs/demo/checkpoints/phase-0 \
        --new runs/demo/checkpoints/phase-2 --data "data/digits/test-000000.tar"

The probe is the first --probe images (in sample-key order) with their first caption,
as in the trainer's phase-end evaluation. --old / --new accept what eval/retrieval.py's
--checkpoint accepts. Prints a table (or one JSON object with --json); bad input exits 2.
"""

from __future__ import annotations

import argparse

import torch

from modx.eval.disorder import spatial_disorder
from modx.eval.embed import Embeddings, embed_dataset
from modx.eval.load import load_model, script_main

ROWS = (
    ("rotation_image_deg", "rotation, image (deg, mean)"),
    ("rotation_image_deg_median", "rotation, image (deg, median)"),
    ("rotation_image_deg_p90", "rotation, image (deg, p90)"),
    ("rotation_text_deg", "rotation, text (deg, mean)"),
    ("rotation_text_deg_median", "rotation, text (deg, median)"),
    ("rotation_text_deg_p90", "rotation, text (deg, p90)"),
    ("topology_drift_image_deg", "topology drift, image (deg)"),
    ("topology_drift_text_deg", "topology drift, text (deg)"),
    ("rigid_fraction_image", "rigid fraction, image"),
    ("rigid_fraction_text", "rigid fraction, text"),
    ("deviation_async_deg", "deviation: asynchrony (deg)"),
    ("deviation_relative_rotation_deg", "deviation: relative rotation (deg)"),
    ("alignment_change_deg", "alignment change (deg)"),
    ("alignment_flip_i2t", "alignment flips i2t (fraction)"),
    ("alignment_flip_t2i", "alignment flips t2i (fraction)"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--old", required=True, metavar="CKPT")
    p.add_argument("--new", required=True, metavar="CKPT")
    p.add_argument("--old-pretrained", metavar="FILE")
    p.add_argument("--new-pretrained", metavar="FILE")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="load TorchScript --*-pretrained archives (loading one runs its code)")
    p.add_argument("--data", required=True, metavar="URLS", help="probe shards (brace URLs)")
    p.add_argument("--probe", type=int, default=1000, help="number of image-text pairs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def probe_pairs(emb: Embeddings, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images with their first caption: (n, d), (n, d)."""
    ids = emb.text_image_ids
    first = torch.full((len(emb.image),), len(ids), dtype=torch.long)
    first.scatter_reduce_(0, ids, torch.arange(len(ids)), reduce="amin")
    rows = torch.nonzero(first < len(ids)).flatten()[:n]
    return emb.image[rows], emb.text[first[rows]]


def run(args: argparse.Namespace) -> dict:
    if args.probe < 2:
        raise ValueError(f"--probe must be at least 2, got {args.probe}")
    pairs, sources = [], []
    for ckpt, pretrained in ((args.old, args.old_pretrained), (args.new, args.new_pretrained)):
        model, preprocess, tokenizer, source = load_model(ckpt, pretrained, args.device, args.trust_torchscript)
        emb = embed_dataset(
            model, args.data, preprocess=preprocess, tokenizer=tokenizer,
            batch_size=args.batch_size, workers=args.workers, device=args.device,
            progress=not args.json,
        )  # fmt: skip
        pairs.append(probe_pairs(emb, args.probe))
        sources.append(source)
    (img_old, txt_old), (img_new, txt_new) = pairs
    if img_old.shape != img_new.shape:
        raise ValueError(
            f"the two models embed the probe as {tuple(img_old.shape)} and {tuple(img_new.shape)}: "
            "spatial disorder compares two versions of one architecture"
        )
    metrics = spatial_disorder(img_old.numpy(), txt_old.numpy(), img_new.numpy(), txt_new.numpy())
    return {"old": sources[0], "new": sources[1], "data": args.data, "metrics": metrics}


def format_table(result: dict) -> str:
    m = result["metrics"]
    lines = [
        f"old     {result['old']}",
        f"new     {result['new']}",
        f"probe   {m['n_probe']} pairs of {result['data']} (dim {m['dim']})",
        "",
    ]
    lines += [f"{label:<36}{m[key]:>10.3f}" for key, label in ROWS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return script_main("eval/disorder.py", args, run, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
