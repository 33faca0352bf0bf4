"""`larp-chat`: write videos from a prompt with a LARP-extended LLM, one-shot or in an interactive loop.

    # one-shot: 4 samples of a class, as an mp4 (grid of the 4), a gif, a PNG contact sheet and the raw codes
    larp-chat --model runs/llm/final --base-model HuggingFaceTB/SmolLM2-135M-Instruct \
        --larp-tokenizer runs/tok/final --class-name ApplyEyeMakeup --num-samples 4 --cfg-scale 1.25 --seed 0 \
        --output out.mp4 --gif out.gif --grid out.png --save-codes codes.safetensors
    larp-chat --model runs/llm/merged --larp-tokenizer runs/tok/final --prompt "a person surfing a wave"  # merged
    python -m llm_adapters.chat --model ... --larp-tokenizer ...   # no prompt: interactive loop (one prompt a line)

`--model` is a VideoLLM bundle (``video_llm.json``; needs the base model, recorded in the bundle with its GGUF file
name when it came from one, or given with `--base-model` [`--gguf-file`]) or a merged checkpoint (``larp-merge-llm``
output: a plain HF model + ``video_vocab.json``).
`--larp-tokenizer` is a LARP checkpoint folder (default: the one recorded in ``video_vocab.json`` when it is a
folder); its codebook must be the one the LLM was trained on. Class lists (`--class-id`, `/class K`) come from
`--classes` (a text file with one name a line, a JSON list, or a code-shard folder with ``manifest.json``) or from
``class_names.json`` / ``classes.txt`` in the model folder, or the code folder its ``training_args.json`` names.
Loading lives in `llm_adapters.loading`, the per-prompt generation and the files in `llm_adapters.videos`; this
module parses the arguments, runs the loop and prints.
Prompts, class names and REPL lines are data: a control token string in them (``<|video_start|>``, ``<|im_end|>``,
...) is encoded as plain text (`llm_adapters.prompts.PromptEncoder`), and file names made from them go through
`larp_mllm.runtime.files.safe_filename`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from .loading import DTYPES, load_class_names, load_larp, load_video_llm, resolve_class, resolve_device_dtype
from .prompts import class_name_to_text
from .videos import (FORMATS, ChatSettings, add_sampling_args, auto_paths, generate_videos, sampling_from_args,
                     write_outputs)

HELP = """commands:
  TEXT              generate videos of TEXT
  /class NAME|K     generate videos of a class (by name or index into the class list)
  /cfg X            set the CFG scale (1 = off)          /seed N      set the next seed
  /samples N        samples per prompt                   /temperature X, /top-k K, /top-p P
  /settings         show the settings                    /help        this text
  /quit             leave (also Ctrl-D)"""


# ---- the interactive loop -----------------------------------------------------------------------------------
def repl(llm: Any, larp: Any, settings: ChatSettings, class_names: list[str] | None, out_dir: Path,
         formats: list[str], fps: float, stdin: TextIO, stdout: TextIO, progress: bool = True) -> int:
    """Read prompts/commands from `stdin` until /quit or EOF; returns the number of generations."""
    taken = [int(p.name[:3]) for p in out_dir.glob("[0-9][0-9][0-9]_*")] if out_dir.is_dir() else []
    index = max(taken, default=-1) + 1  # never overwrite an earlier session's files
    count = 0
    interactive = stdin.isatty()
    print(f"larp-chat: type a prompt, or /help. Files go to {out_dir}/", file=stdout)
    while True:
        if interactive:
            print(">>> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                cmd, _, arg = line[1:].partition(" ")
                cmd, arg = cmd.lower(), arg.strip()
                if cmd in ("quit", "exit", "q"):
                    break
                if cmd == "help":
                    print(HELP, file=stdout)
                    continue
                if cmd == "settings":
                    print(json.dumps(dataclasses.asdict(settings)), file=stdout)
                    continue
                setters = {"cfg": ("cfg_scale", float), "seed": ("seed", int), "samples": ("num_samples", int),
                           "temperature": ("temperature", float), "top-k": ("top_k", int), "top-p": ("top_p", float)}
                if cmd in setters:
                    name, kind = setters[cmd]
                    value = kind(arg)
                    if name == "num_samples" and value < 1:
                        raise ValueError("samples must be >= 1")
                    settings = dataclasses.replace(settings, **{name: value})  # checked by SamplingConfig
                    print(f"{name} = {value}", file=stdout)
                    continue
                if cmd != "class":
                    raise ValueError(f"unknown command /{cmd} (try /help)")
                if not arg:
                    raise ValueError("usage: /class NAME|K")
                prompt = class_name_to_text(resolve_class(arg, class_names))
            else:
                prompt = line
            result = generate_videos(llm, larp, prompt, settings, progress)
            paths = auto_paths(out_dir, index + count, prompt, settings.seed, formats)
            written = write_outputs(result, llm.vocab, settings, fps, **paths)
            print(f"[{index + count}] {prompt!r} seeds {result.seeds[0]}..{result.seeds[-1]} -> "
                  + ", ".join(str(p) for p in written), file=stdout, flush=True)
            settings = dataclasses.replace(settings, seed=settings.seed + settings.num_samples)
            count += 1
        except ValueError as err:
            print(f"error: {err}", file=stdout, flush=True)
    return count


# ---- CLI ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The `larp-chat` arguments (one spelling per option across the CLIs: --model, --larp-tokenizer, --output-dir)."""
    p = argparse.ArgumentParser(prog="larp-chat", description="write videos with a LARP-extended LLM")
    p.add_argument("--model", required=True, help="VideoLLM bundle folder or merged checkpoint folder")
    p.add_argument("--base-model", help="base model folder/hub id of a bundle (default: the recorded one)")
    p.add_argument("--gguf-file", help="GGUF file name inside --base-model")
    p.add_argument("--larp-tokenizer", help="LARP checkpoint folder (default: the one recorded in video_vocab.json)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="the text prompt (caption)")
    what.add_argument("--class-name", help="a class name, e.g. ApplyEyeMakeup")
    what.add_argument("--class-id", type=int, help="a class index into the class list")
    p.add_argument("--classes", help="class list: text file (one a line), JSON list, or code-shard folder")
    add_sampling_args(p, num_samples=1, seed_help="sample j of a prompt uses seed + j")
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward")
    p.add_argument("--fast", default="auto", choices=["auto", "on", "off"], help="static-cache fast path")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="compile the fast path's decode step (CUDA graphs; ~1 min once, pays after a few videos); "
                        "auto: on for the interactive loop on a GPU, off for one-shot runs")
    p.add_argument("--output", help="mp4 file (several samples tiled in a grid)")
    p.add_argument("--gif", help="gif file")
    p.add_argument("--grid", help="PNG contact sheet, one row per sample")
    p.add_argument("--save-codes", help="safetensors file with the codes (S, N)")
    p.add_argument("--output-dir", default="chat_outputs", help="where files go when no path is given / in the REPL")
    p.add_argument("--formats", default="mp4,png", help=f"files written per prompt to --output-dir, from {FORMATS}")
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    """Load the LLM and LARP, then write the videos of one prompt (--prompt/--class-name/--class-id) or run the REPL."""
    args = build_parser().parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"--formats takes a comma-separated subset of {FORMATS}, got {args.formats!r}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    choice = {"auto": "auto", "on": True, "off": False}
    settings = ChatSettings(**sampling_from_args(args), seed=args.seed, num_samples=args.num_samples,
                            batch_size=args.batch_size, fast=choice[args.fast])
    class_names = load_class_names(args.model, args.classes)
    prompt = args.prompt
    if args.class_name is not None:
        prompt = class_name_to_text(resolve_class(args.class_name, class_names))
    elif args.class_id is not None:
        prompt = class_name_to_text(resolve_class(str(args.class_id), class_names))
    llm = load_video_llm(args.model, args.base_model, args.gguf_file, device, dtype)
    larp = load_larp(args.larp_tokenizer, llm.vocab, device)
    out_dir = Path(args.output_dir)
    interactive = prompt is None
    if args.compile != "auto" or not interactive:
        settings = dataclasses.replace(settings, compile=args.compile == "on")
    if interactive:
        repl(llm, larp, settings, class_names, out_dir, formats, args.fps, sys.stdin, sys.stdout,
             progress=not args.no_progress)
        return
    result = generate_videos(llm, larp, prompt, settings, progress=not args.no_progress)
    given = {"mp4": args.output, "gif": args.gif, "grid": args.grid, "codes": args.save_codes}
    paths = {k: Path(v) for k, v in given.items() if v}
    if not paths:
        paths = auto_paths(out_dir, 0, prompt, settings.seed, formats)
    for path in write_outputs(result, llm.vocab, settings, args.fps, **paths):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
