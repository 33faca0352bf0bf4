"""`larp-merge-llm`: export one plain HF checkpoint (LoRA merged, video rows materialised) from a VideoLLM bundle.

    larp-merge-llm --model runs/llm/final --base-model PATH_OR_HUB_ID [--gguf-file F.gguf] --output-dir runs/llm/merged
    python -m llm_adapters.merge --model ... --base-model ... --output-dir ...   # same CLI

The bundle is loaded in fp32, merged, and its logits are checked against the unmerged model's before the checkpoint
(weights in `--dtype`, tokenizer, ``video_vocab.json``) is written; the work is `llm_adapters.model.merge_bundle`.
"""
from __future__ import annotations

import argparse

from .loading import DTYPES
from .model import merge_bundle


def build_parser() -> argparse.ArgumentParser:
    """The `larp-merge-llm` arguments (spelled as in the other CLIs: --model, --base-model, --output-dir, --dtype)."""
    p = argparse.ArgumentParser(prog="larp-merge-llm", description=__doc__.splitlines()[0].partition(": ")[2])
    p.add_argument("--model", required=True, help="VideoLLM bundle folder (written by VideoLLM.save_pretrained)")
    p.add_argument("--base-model", required=True, help="the base model's folder or hub id")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --base-model (optional)")
    p.add_argument("--output-dir", required=True, help="output folder for the merged checkpoint")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the saved weights")
    return p


def main(argv: list[str] | None = None) -> None:
    """Merge `--model` on `--base-model` into `--output-dir`."""
    args = build_parser().parse_args(argv)
    out = merge_bundle(args.model, args.base_model, args.output_dir, gguf_file=args.gguf_file,
                       dtype=DTYPES[args.dtype])
    print(f"merged checkpoint written to {out} (logits checked against the unmerged bundle)")


if __name__ == "__main__":
    main()
