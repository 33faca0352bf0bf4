"""`larp-chat`: write videos from a prompt with a LARP-extended LLM, one-shot or in an interactive loop.

    # one-shot: 4 samples of a class, as an mp4 (grid of the 4), a gif, a PNG contact sheet and the raw codes
    larp-chat --model runs/llm/final --base-model HuggingFaceTB/SmolLM2-135M-Instruct \
        --larp-tokenizer runs/tok/final --class-name ApplyEyeMakeup --num-samples 4 --cfg-scale 1.25 --seed 0 \
        --output out.mp4 --gif out.gif --grid out.png --save-codes codes.safetensors
    larp-chat --model runs/llm/merged --larp-tokenizer runs/tok/final --prompt "a person surfing a wave"  # merged
    larp-chat --model ... --larp-tokenizer ... "a person surfing a wave"       # the prompt as a positional text
    # a video in: continue it (its first 5 frames condition the clip), or answer a question about it in text
    larp-chat --model ... --larp-tokenizer ... --video in.mp4 --continue --num-samples 4 --output cont.mp4
    larp-chat --model ... --larp-tokenizer ... --video clip.mp4 "what is moving, and where to?"  # prints the answer
    python -m llm_adapters.chat --model ... --larp-tokenizer ...   # no prompt: interactive loop (one prompt a line)

`--model` is a VideoLLM bundle (``video_llm.json``; needs the base model, recorded in the bundle with its GGUF file
name when it came from one, or given with `--base-model` [`--gguf-file`]) or a merged checkpoint (``larp-merge-llm``
output: a plain HF model + ``video_vocab.json``).
`--larp-tokenizer` is a LARP checkpoint folder (default: the one recorded in ``video_vocab.json`` when it is a
folder); its codebook must be the one the LLM was trained on. Class lists (`--class-id`, `/class K`) come from
`--classes` (a text file with one name a line, a JSON list, or a code-shard folder with ``manifest.json``) or from
``class_names.json`` / ``classes.txt`` in the model folder, or the code folder its ``training_args.json`` names.
`--video` reads the video's first T frames at the tokenizer's size (as training clips are made; never upscaled) and
tokenizes them: with `--continue` the model writes whole clips from the condition clip (`--condition-frames`, the
rest repeating the last of them; no CFG, as the reference's frame prediction), written as the files of a text
prompt; with a question (or none: "Describe the video.") it answers in text (greedy unless `--temperature` is given;
`--max-new-tokens`). In the REPL, `/video PATH` attaches a video: text lines are then questions about it and
`/continue` writes its continuations.
Loading lives in `llm_adapters.loading`, the per-prompt generation and the files in `llm_adapters.videos`; this
module parses the arguments, runs the loop and prints. Bad inputs end the CLI with one "larp-chat: error: ..." line.
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

import torch
from larp_mllm.data.continuation import DEFAULT_CONDITION_FRAMES

from .generate import SamplingConfig
from .loading import DTYPES, load_class_names, load_larp, load_video_llm, resolve_class, resolve_device_dtype
from .prompts import class_name_to_text
from .tasks import CAPTION_QUESTIONS
from .videos import (FORMATS, ChatSettings, VideoInput, add_sampling_args, answer_about_video,
                     auto_paths, continue_video, generate_videos, load_video_input, sampling_from_args, write_outputs)

HELP = """commands:
  TEXT              generate videos of TEXT; with a video attached, answer TEXT about it (in text)
  /class NAME|K     generate videos of a class (by name or index into the class list)
  /video PATH       attach a video (its first T frames) to the next turns; /video alone detaches it
  /continue         write continuations of the attached video (no CFG; --condition-frames frames condition it)
  /cfg X            set the CFG scale (1 = off)          /seed N      set the next seed
  /samples N        samples per prompt                   /temperature X, /top-k K, /top-p P
  /settings         show the settings                    /help        this text
  /quit             leave (also Ctrl-D)"""


def _continued_name(video: VideoInput) -> str:
    return f"{video.path.stem} continued"


# ---- the interactive loop -----------------------------------------------------------------------------------
def repl(llm: Any, larp: Any, settings: ChatSettings, class_names: list[str] | None, out_dir: Path,
         formats: list[str], fps: float, stdin: TextIO, stdout: TextIO, progress: bool = True,
         condition_frames: int = DEFAULT_CONDITION_FRAMES) -> int:
    """Read prompts/commands from `stdin` until /quit or EOF; returns the number of answered prompts (videos
    written and text answers)."""
    taken = [int(p.name[:3]) for p in out_dir.glob("[0-9][0-9][0-9]_*")] if out_dir.is_dir() else []
    index = max(taken, default=-1) + 1  # never overwrite an earlier session's files
    count = answered = 0
    video: VideoInput | None = None
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
            used = settings  # the settings of this generation (a continuation runs without CFG)
            if line.startswith("/"):
                cmd, _, arg = line[1:].partition(" ")
                cmd, arg = cmd.lower(), arg.strip()
                if cmd in ("quit", "exit", "q"):
                    break
                if cmd == "help":
                    print(HELP, file=stdout)
                    continue
                if cmd == "settings":
                    shown = {**dataclasses.asdict(settings), "video": str(video.path) if video else None,
                             "condition_frames": condition_frames}
                    print(json.dumps(shown), file=stdout)
                    continue
                if cmd == "video":
                    video = load_video_input(larp, arg.strip("'\"")) if arg else None
                    print(f"video = {video.path} ({video.clip.shape[1]} frames, {len(video.codes)} codes)" if video
                          else "video = none", file=stdout, flush=True)
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
                if cmd == "continue":
                    if video is None:
                        raise ValueError("/continue needs a video: attach one with /video PATH")
                    if arg:
                        raise ValueError("/continue takes no text (the instruction is fixed)")
                    used = dataclasses.replace(settings, cfg_scale=1.0)  # frame prediction has no CFG
                    result = continue_video(llm, larp, video, used, condition_frames, progress)
                    prompt = _continued_name(video)
                elif cmd != "class":
                    raise ValueError(f"unknown command /{cmd} (try /help)")
                elif not arg:
                    raise ValueError("usage: /class NAME|K")
                else:
                    prompt = class_name_to_text(resolve_class(arg, class_names))
                    result = generate_videos(llm, larp, prompt, settings, progress)
            elif video is not None:  # a question about the attached video, answered in text
                answer = answer_about_video(llm, video, line, settings, progress)
                print(f"[{video.path.name}] {answer}", file=stdout, flush=True)
                answered += 1
                continue
            else:
                prompt = line
                result = generate_videos(llm, larp, prompt, settings, progress)
            paths = auto_paths(out_dir, index + count, prompt, settings.seed, formats)
            written = write_outputs(result, llm.vocab, used, fps, **paths)
            print(f"[{index + count}] {prompt!r} seeds {result.seeds[0]}..{result.seeds[-1]} -> "
                  + ", ".join(str(p) for p in written), file=stdout, flush=True)
            settings = dataclasses.replace(settings, seed=settings.seed + settings.num_samples)
            count += 1
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=stdout, flush=True)
    return count + answered


# ---- CLI ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The `larp-chat` arguments (one spelling per option across the CLIs: --model, --larp-tokenizer, --output-dir)."""
    p = argparse.ArgumentParser(prog="larp-chat", description="write videos with a LARP-extended LLM, continue a "
                                "video, or answer questions about one")
    p.add_argument("--model", required=True, help="VideoLLM bundle folder or merged checkpoint folder")
    p.add_argument("--base-model", help="base model folder/hub id of a bundle (default: the recorded one)")
    p.add_argument("--gguf-file", help="GGUF file name inside --base-model")
    p.add_argument("--larp-tokenizer", help="LARP checkpoint folder (default: the one recorded in video_vocab.json)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("text", nargs="?", help="the prompt (as --prompt); with --video, a question about the video")
    what.add_argument("--prompt", help="the text prompt (caption); with --video, a question about the video")
    what.add_argument("--class-name", help="a class name, e.g. ApplyEyeMakeup")
    what.add_argument("--class-id", type=int, help="a class index into the class list")
    p.add_argument("--classes", help="class list: text file (one a line), JSON list, or code-shard folder")
    p.add_argument("--video", help="an input video: its first T frames (the tokenizer's clip length) are used")
    p.add_argument("--continue", dest="continue_video", action="store_true",
                   help="write continuations of --video (no CFG) instead of answering about it")
    p.add_argument("--condition-frames", type=int, default=DEFAULT_CONDITION_FRAMES,
                   help="frames of --video that condition a continuation, in [1, T]")
    p.add_argument("--max-new-tokens", type=int, default=64, help="the longest text answer about --video")
    add_sampling_args(p, num_samples=1, seed_help="sample j of a prompt uses seed + j")
    # explicit or not: continuation refuses an explicit CFG scale (default 1 there), text answers are greedy
    # unless a temperature is given
    p.set_defaults(cfg_scale=None, temperature=None)
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


def _check_video_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One parser error for each combination of --video / --continue / prompts / outputs that makes no sense."""
    text = args.text if args.text is not None else args.prompt
    outputs = [f for f, v in (("--output", args.output), ("--gif", args.gif), ("--grid", args.grid),
                              ("--save-codes", args.save_codes)) if v]
    if args.continue_video:
        if args.video is None:
            parser.error("--continue needs --video (the video to continue)")
        if text is not None or args.class_name is not None or args.class_id is not None:
            parser.error("--continue takes no prompt text or class (the instruction is fixed: continue the video)")
        if args.cfg_scale not in (None, 1.0):
            parser.error(f"--continue runs without CFG (as the reference's frame prediction): leave --cfg-scale out "
                         f"or set it to 1, got {args.cfg_scale}")
    elif args.video is not None:
        if args.class_name is not None or args.class_id is not None:
            parser.error("--video takes a question (TEXT or --prompt) or --continue, not a class")
        if outputs:
            parser.error(f"{', '.join(outputs)} write videos; a question about --video is answered in text "
                         "(add --continue to write continuations)")
    if args.video is not None and not Path(args.video).is_file():
        raise SystemExit(f"larp-chat: error: video file not found: {args.video}")


def _load_inputs(args: argparse.Namespace, device: torch.device,
                 dtype: torch.dtype) -> tuple[list[str] | None, str | None, Any, Any, VideoInput | None]:
    """(class names, the prompt text, the LLM, LARP, the --video input) of checked arguments; ValueError or
    FileNotFoundError for a bad folder, class, --condition-frames or video."""
    class_names = load_class_names(args.model, args.classes)
    prompt = args.text if args.text is not None else args.prompt
    if args.class_name is not None:
        prompt = class_name_to_text(resolve_class(args.class_name, class_names))
    elif args.class_id is not None:
        prompt = class_name_to_text(resolve_class(str(args.class_id), class_names))
    llm = load_video_llm(args.model, args.base_model, args.gguf_file, device, dtype)
    larp = load_larp(args.larp_tokenizer, llm.vocab, device)
    frames = larp.video_shape[1]
    if not 1 <= args.condition_frames <= frames:
        raise ValueError(f"--condition-frames must be in [1, T] = [1, {frames}] (the tokenizer's clip length), "
                         f"got {args.condition_frames}")
    video = load_video_input(larp, args.video) if args.video is not None else None
    return class_names, prompt, llm, larp, video


def main(argv: list[str] | None = None) -> None:
    """Load the LLM and LARP, then write the videos of one prompt (TEXT/--prompt/--class-name/--class-id), continue
    or answer about --video, or run the REPL."""
    parser = build_parser()
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or any(f not in FORMATS for f in formats):
        parser.error(f"--formats takes a comma-separated subset of {FORMATS}, got {args.formats!r}")
    if args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")
    _check_video_args(parser, args)
    asking = args.video is not None and not args.continue_video
    default_cfg = 1.0 if args.continue_video else SamplingConfig.cfg_scale
    sampling = {**sampling_from_args(args), "cfg_scale": default_cfg if args.cfg_scale is None else args.cfg_scale,
                "temperature": 1.0 if args.temperature is None else args.temperature}
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    choice = {"auto": "auto", "on": True, "off": False}
    try:
        settings = ChatSettings(**sampling, seed=args.seed, num_samples=args.num_samples, batch_size=args.batch_size,
                                fast=choice[args.fast], max_new_tokens=args.max_new_tokens,
                                answer_temperature=args.temperature if asking and args.temperature is not None else 0.0)
    except ValueError as err:
        parser.error(str(err))
    try:  # bad inputs (a model folder, a class, the video) end with one line, not a traceback
        class_names, prompt, llm, larp, video = _load_inputs(args, device, dtype)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"larp-chat: error: {err}") from None
    out_dir = Path(args.output_dir)
    interactive = prompt is None and args.video is None
    if args.compile != "auto" or not interactive:
        settings = dataclasses.replace(settings, compile=args.compile == "on")
    progress = not args.no_progress
    if interactive:
        repl(llm, larp, settings, class_names, out_dir, formats, args.fps, sys.stdin, sys.stdout, progress=progress,
             condition_frames=args.condition_frames)
        return
    if video is not None:
        if asking:
            print(answer_about_video(llm, video, prompt or CAPTION_QUESTIONS[0], settings, progress), flush=True)
            return
        result = continue_video(llm, larp, video, settings, args.condition_frames, progress)
        prompt = _continued_name(video)
    else:
        result = generate_videos(llm, larp, prompt, settings, progress=progress)
    given = {"mp4": args.output, "gif": args.gif, "grid": args.grid, "codes": args.save_codes}
    paths = {k: Path(v) for k, v in given.items() if v}
    if not paths:
        paths = auto_paths(out_dir, 0, prompt, settings.seed, formats)
    for path in write_outputs(result, llm.vocab, settings, args.fps, **paths):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
