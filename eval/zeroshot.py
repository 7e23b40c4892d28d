"""Zero-shot classification of one model on a CLIP_benchmark webdataset directory.

    python eval/zeroshot.py --checkpoint runs/demo --data data/digits-zs
    python eval/zeroshot.py --checkpoint ViT-B-32 --pretrained open_clip_model.safetensors \
        --data wds_cifar10 --json

--data: a directory in CLIP_benchmark's layout (classnames.txt,
zeroshot_classification_templates.txt with {c}, test/nshards.txt, test/0.tar ... with
KEY.cls labels and webp/png/jpg images). --checkpoint: a run directory (its newest
checkpoints/phase-K/ export), an exported model directory, or a model name / JSON config
(with --pretrained FILE for local weights). Prints a table (or one JSON object with --json,
the metrics under "metrics"). Bad input exits with status 2.
"""

from __future__ import annotations

import argparse
import time

from modx.eval.load import load_model, model_arguments, script_main
from modx.eval.zeroshot import evaluate_zeroshot, json_metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return model_arguments(__doc__, ("ROOT", "CLIP_benchmark dataset directory")).parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    model, preprocess, tokenizer, source = load_model(args.checkpoint, args.pretrained, args.device,
                                                          args.trust_torchscript)
    result = evaluate_zeroshot(
        model, args.data, preprocess=preprocess, tokenizer=tokenizer, batch_size=args.batch_size,
        workers=args.workers, device=args.device, progress=not args.json,
    )  # fmt: skip
    stats = result.pop("stats")
    return {
        "checkpoint": source,
        "data": args.data,
        "n_images": result.pop("n_images"),
        "n_classes": result.pop("n_classes"),
        "metrics": json_metrics(result),  # acc5 null with fewer than 5 classes
        "stats": stats,
        "seconds": round(time.perf_counter() - start, 3),
    }


def format_table(result: dict) -> str:
    m = result["metrics"]
    return "\n".join([
        f"model   {result['checkpoint']}",
        f"data    {result['data']}  ({result['n_images']} images, {result['n_classes']} classes)",
        "",
        f"{'top-1 accuracy':<24}{m['acc1']:>8.2f}",
        f"{'top-5 accuracy':<24}{'-' if m['acc5'] is None else format(m['acc5'], '.2f'):>8}"
        + ("  (fewer than 5 classes)" if m["acc5"] is None else ""),
        f"{'mean per-class recall':<24}{m['mean_per_class_recall']:>8.2f}",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return script_main("eval/zeroshot.py", args, run, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
