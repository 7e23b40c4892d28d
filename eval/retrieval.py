"""Image-text retrieval of one model on one evaluation shard set.

    python eval/retrieval.py --checkpoint runs/demo --data "data/digits/test-000000.tar"
    python eval/retrieval.py --checkpoint modx-tiny-s4d --pretrained model.safetensors \
        --data "shards/test-{000000..000003}.tar" --json

--checkpoint: a run directory (its newest checkpoints/phase-K/ export), an exported model
directory, or a model name / JSON config (with --pretrained FILE for local weights).
Prints a table (or one JSON object with --json). Bad input exits with status 2.
"""

from __future__ import annotations

import argparse
import time

from modx.eval.embed import embed_dataset
from modx.eval.load import load_model, model_arguments, script_main
from modx.eval.retrieval import retrieval_metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = model_arguments(__doc__, ("URLS", "eval shards (brace URLs)"))
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--backend", choices=("faiss", "torch"), default="faiss")
    p.add_argument("--ranks", action="store_true", help="also mean / median rank")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    model, preprocess, tokenizer, source = load_model(args.checkpoint, args.pretrained, args.device,
                                                          args.trust_torchscript)
    emb = embed_dataset(
        model, args.data, preprocess=preprocess, tokenizer=tokenizer, batch_size=args.batch_size,
        workers=args.workers, device=args.device, progress=not args.json,
    )  # fmt: skip
    metrics = retrieval_metrics(
        emb.image, emb.text, emb.text_image_ids, ks=args.ks, backend=args.backend, ranks=args.ranks
    )
    return {
        "checkpoint": source,
        "data": args.data,
        "n_images": len(emb.image),
        "n_texts": len(emb.text),
        "metrics": metrics,
        "stats": emb.stats,
        "seconds": round(time.perf_counter() - start, 3),
    }


def format_table(result: dict, ks: list[int]) -> str:
    m = result["metrics"]
    lines = [
        f"model   {result['checkpoint']}",
        f"data    {result['data']}  ({result['n_images']} images, {result['n_texts']} captions)",
        "",
        f"{'':<12}" + "".join(f"{f'R@{k}':>8}" for k in ks),
    ]
    for name, label in (("i2t", "image->text"), ("t2i", "text->image")):
        lines.append(f"{label:<12}" + "".join(f"{m[f'{name}_R@{k}']:>8.2f}" for k in ks))
    lines.append(f"{'mean recall':<12}{m['mean_recall']:>8.2f}")
    if "i2t_mean_rank" in m:
        lines.append(
            f"mean rank   i2t {m['i2t_mean_rank']:.1f}  t2i {m['t2i_mean_rank']:.1f}   "
            f"median rank i2t {m['i2t_median_rank']:.0f}  t2i {m['t2i_median_rank']:.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return script_main("eval/retrieval.py", args, run, lambda result: format_table(result, args.ks))


if __name__ == "__main__":
    raise SystemExit(main())
