"""`larp-chat`: write videos from a prompt with a LARP-extended LLM, one-shot or in an interactive loop.

    # one-shot: 4 samples of a class, as an mp4 (grid of the 4), a gif, a PNG contact sheet and the raw codes
    larp-chat --model runs/llm/final --base-model HuggingFaceTB/SmolLM2-135M-Instruct --larp runs/tok/final \
        --class-name ApplyEyeMakeup --num-samples 4 --cfg-scale 1.25 --seed 0 \
        --output out.mp4 --gif out.gif --grid out.png --save-codes codes.safetensors
    larp-chat --model runs/llm/merged --larp runs/tok/final --prompt "a person surfing a wave"   # merged checkpoint
    python -m llm_adapters.chat --model ... --larp ...            # no prompt: interactive loop (one prompt a line)

`--model` is a VideoLLM bundle (``video_llm.json``; needs the base model, recorded in the bundle with its GGUF file
name when it came from one, or given with `--base-model` [`--gguf-file`]) or a merged checkpoint (``larp-merge-llm``
output: a plain HF model + ``video_vocab.json``).
`--larp` is a LARP checkpoint folder (default: the one recorded in ``video_vocab.json`` when it is a folder); its
codebook must be the one the LLM was trained on. Class lists (`--class-id`, `/class K`) come from `--classes`
(a text file with one name a line, a JSON list, or a code-shard folder with ``manifest.json``) or from
``class_names.json`` / ``classes.txt`` in the model folder, or the code folder its ``training_args.json`` names.
Videos are decoded by LARP, clamped to [0, 1] and written with `larp_mllm.data.video_io`; several samples are tiled in a
grid in the mp4/gif.
Prompts, class names and REPL lines are data: a control token string in them (``<|video_start|>``, ``<|im_end|>``,
...) is encoded as plain text (`llm_adapters.prompts.PromptEncoder`), and file names made from them go through
`larp_mllm.runtime.files.safe_filename`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from .generate import SamplingConfig, generate_video_codes
from .prompts import class_name_to_text
from .vocab import VOCAB_FILE, VideoVocab

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = ("mp4", "gif", "png", "codes")
HELP = """commands:
  TEXT              generate videos of TEXT
  /class NAME|K     generate videos of a class (by name or index into the class list)
  /cfg X            set the CFG scale (1 = off)          /seed N      set the next seed
  /samples N        samples per prompt                   /temperature X, /top-k K, /top-p P
  /settings         show the settings                    /help        this text
  /quit             leave (also Ctrl-D)"""


# ---- loading ------------------------------------------------------------------------------------------------
@dataclass
class MergedLLM:
    """A merged checkpoint: a plain HF causal LM with its extended tokenizer and the id layout."""

    model: Any
    tokenizer: Any
    vocab: VideoVocab


def resolve_device_dtype(device: str | None, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """'auto' device = CUDA when available; 'auto' dtype = bf16 on CUDA, fp32 elsewhere."""
    dev = torch.device(device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return dev, DTYPES[dtype]


def load_larp(path: str | Path | None, vocab: VideoVocab, device: torch.device) -> Any:
    """The LARP tokenizer (eval, fp32) from a checkpoint folder; checks its codebook against the LLM's."""
    from larp_mllm import LARPTokenizer

    if path is None:
        recorded = Path(vocab.larp_checkpoint) if vocab.larp_checkpoint else None
        if recorded is None or not recorded.is_dir():
            raise ValueError("give --larp (a LARP checkpoint folder); the model records none that exists here "
                             f"({vocab.larp_checkpoint!r})")
        path = recorded
    if not Path(path).is_dir():
        raise FileNotFoundError(f"LARP checkpoint folder not found: {path}")
    larp = LARPTokenizer.from_pretrained(path).to(device).eval()
    if larp.codebook_hash() != vocab.codebook_hash:
        raise ValueError(f"LARP codebook mismatch: the LLM was trained on codebook {vocab.codebook_hash}, the LARP "
                         f"checkpoint {path} has {larp.codebook_hash()}")
    if larp.num_tokens != vocab.num_video_tokens or larp.codebook_size != vocab.codebook_size:
        raise ValueError(f"LARP checkpoint {path} makes {larp.num_tokens} codes of {larp.codebook_size}; the LLM "
                         f"expects {vocab.num_video_tokens} of {vocab.codebook_size}")
    return larp


def load_video_llm(path: str | Path, base_model: str | None = None, gguf_file: str | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A VideoLLM bundle (on top of its base model) or a merged checkpoint, in eval mode on `device`/`dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import CONFIG_FILE, VideoLLM

    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        if base_model is None:  # the recorded base (and its GGUF file name, when it came from one)
            config = json.loads((path / CONFIG_FILE).read_text())
            recorded, recorded_gguf = config.get("base_model", ""), config.get("gguf_file") or None
            gguf_file = gguf_file or recorded_gguf
            source = Path(recorded) / gguf_file if recorded and gguf_file else Path(recorded)
            if not recorded or not source.exists():
                raise ValueError(f"{path} is a VideoLLM bundle: give its base model with --base-model "
                                 f"(recorded: {recorded!r}" + (f", GGUF file {gguf_file!r})" if gguf_file else ")"))
            base_model = recorded
        llm = VideoLLM.from_pretrained(path, base_model, gguf_file=gguf_file, dtype=dtype)
    elif (path / VOCAB_FILE).is_file() and (path / "config.json").is_file():
        vocab = VideoVocab.load(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        vocab.check_tokenizer(tokenizer)
        llm = MergedLLM(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tokenizer, vocab)
    else:
        raise FileNotFoundError(f"expected a VideoLLM bundle (video_llm.json) or a merged checkpoint (config.json + "
                                f"{VOCAB_FILE}) in {path}")
    llm.model.to(device=device, dtype=dtype).eval()
    return llm


def load_class_names(model_dir: str | Path | None, classes: str | Path | None = None) -> list[str] | None:
    """Class names from `classes` (txt / JSON / code-shard folder) or the model folder; None when there are none.

    In the model folder: ``class_names.json`` or ``classes.txt``, else the code folder (``data.code_dir``) named in
    ``training_args.json`` when its ``manifest.json`` is still there.
    """
    if classes is not None:
        source = Path(classes)
        if source.is_dir():
            return _manifest_classes(source)
        if not source.is_file():
            raise FileNotFoundError(f"class list not found: {source}")
        return _read_class_file(source)
    if model_dir is None:
        return None
    for name in ("class_names.json", "classes.txt"):
        if (Path(model_dir) / name).is_file():
            return _read_class_file(Path(model_dir) / name) or None
    args_file = Path(model_dir) / "training_args.json"
    if args_file.is_file():
        code_dir = (json.loads(args_file.read_text()).get("data") or {}).get("code_dir") or ""
        if code_dir and (Path(code_dir) / "manifest.json").is_file():
            return _manifest_classes(Path(code_dir)) or None
    return None


def _manifest_classes(folder: Path) -> list[str]:
    from larp_mllm.data.codes import CodeManifest

    return list(CodeManifest.load(folder).class_names)


def _read_class_file(path: Path) -> list[str]:
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        names = data.get("class_names", []) if isinstance(data, dict) else data
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: expected a JSON list of class names (or {{'class_names': [...]}})")
        return names
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def resolve_class(token: str, class_names: list[str] | None) -> str:
    """A class given by name or index -> its name (checked against the class list when there is one)."""
    token = token.strip()
    if re.fullmatch(r"\d+", token):
        if not class_names:
            raise ValueError(f"class index {token} needs a class list (--classes FILE)")
        if int(token) >= len(class_names):
            raise ValueError(f"class index {token} out of range: {len(class_names)} classes")
        return class_names[int(token)]
    if class_names:
        by_key = {class_name_to_text(n): n for n in class_names}
        if class_name_to_text(token) not in by_key:
            near = [n for n in class_names if class_name_to_text(token)[:4] in class_name_to_text(n)][:5]
            raise ValueError(f"unknown class {token!r}" + (f"; did you mean {near}?" if near else ""))
        return by_key[class_name_to_text(token)]
    return token


# ---- one generation -----------------------------------------------------------------------------------------
@dataclass
class ChatSettings:
    """What the next generation uses; changed by flags and REPL commands."""

    cfg_scale: float = 1.25
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    num_samples: int = 1
    batch_size: int = 16
    fast: bool | str = "auto"
    compile: bool | None = None  # compile the fast decode step (CUDA graphs); None = on CUDA


@dataclass
class ChatResult:
    """Codes (S, N) int64, decoded videos (S, 3, T, H, W) in [0, 1], the seeds used and the written files."""

    prompt: str
    codes: torch.Tensor
    videos: torch.Tensor
    seeds: list[int]
    paths: list[Path] = field(default_factory=list)


@torch.no_grad()
def decode_videos(larp: Any, codes: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """LARP decode of codes (S, N) -> float CPU videos (S, 3, T, H, W) clamped to [0, 1]."""
    device = next(larp.parameters()).device
    out = [larp.decode_codes(codes[i:i + batch_size].to(device)).float().clamp(0, 1).cpu()
           for i in range(0, len(codes), batch_size)]
    return torch.cat(out)


def generate(llm: Any, larp: Any, prompt: str, settings: ChatSettings, progress: bool = True) -> ChatResult:
    """`settings.num_samples` videos of `prompt` (seeds seed, seed + 1, ...)."""
    codes = generate_video_codes(llm, [prompt] * settings.num_samples, cfg_scale=settings.cfg_scale,
                                 temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                                 seed=settings.seed, batch_size=settings.batch_size, fast=settings.fast,
                                 compile=settings.compile, progress=progress)
    seeds = [settings.seed + i for i in range(settings.num_samples)]
    return ChatResult(prompt, codes, decode_videos(larp, codes), seeds)


def write_outputs(result: ChatResult, vocab: VideoVocab, settings: ChatSettings, fps: float, mp4: Path | None = None,
                  gif: Path | None = None, grid: Path | None = None, codes: Path | None = None) -> list[Path]:
    """Write the asked files (mp4/gif tile several samples in a grid); returns and records their paths."""
    from safetensors.torch import save_file

    from larp_mllm.runtime.files import atomic_write
    from larp_mllm.data.video_write import write_video, write_video_grid

    videos = result.videos if len(result.videos) > 1 else result.videos[0]
    paths = [write_video(videos, p, fps=fps) for p in (mp4, gif) if p is not None]
    if grid is not None:
        labels = [f"seed {s}" for s in result.seeds]
        paths.append(write_video_grid(result.videos, grid, labels=labels))
    if codes is not None:
        meta = {"prompt": result.prompt, "seeds": json.dumps(result.seeds), "codebook_hash": vocab.codebook_hash,
                "settings": json.dumps(dataclasses.asdict(settings))}
        tensors = {"codes": result.codes.contiguous()}
        paths.append(atomic_write(codes, lambda tmp: save_file(tensors, str(tmp), metadata=meta)))
    result.paths += paths
    return paths


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "video"


def auto_paths(out_dir: Path, index: int, prompt: str, seed: int, formats: list[str]) -> dict[str, Path]:
    """Files `out_dir/NNN_<prompt words>_sSEED.<ext>`; the prompt (a class name, a chat line) is untrusted text, so
    the name goes through `safe_filename`: it stays one plain file name inside `out_dir`."""
    from larp_mllm.runtime.files import safe_filename

    stem = safe_filename(f"{index:03d}_{_slug(prompt)}_s{seed}")
    suffix = {"mp4": ".mp4", "gif": ".gif", "png": ".png", "codes": ".safetensors"}
    key = {"mp4": "mp4", "gif": "gif", "png": "grid", "codes": "codes"}
    return {key[f]: out_dir / f"{stem}{suffix[f]}" for f in formats}


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
                    changed = dataclasses.replace(settings, **{name: value})
                    SamplingConfig(changed.cfg_scale, changed.temperature, changed.top_k, changed.top_p)  # checks
                    settings = changed
                    print(f"{name} = {value}", file=stdout)
                    continue
                if cmd != "class":
                    raise ValueError(f"unknown command /{cmd} (try /help)")
                if not arg:
                    raise ValueError("usage: /class NAME|K")
                prompt = class_name_to_text(resolve_class(arg, class_names))
            else:
                prompt = line
            result = generate(llm, larp, prompt, settings, progress)
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
    p = argparse.ArgumentParser(prog="larp-chat", description="write videos with a LARP-extended LLM")
    p.add_argument("--model", required=True, help="VideoLLM bundle folder or merged checkpoint folder")
    p.add_argument("--base-model", help="base model folder/hub id of a bundle (default: the recorded one)")
    p.add_argument("--gguf-file", help="GGUF file name inside --base-model")
    p.add_argument("--larp", help="LARP checkpoint folder (default: the one recorded in video_vocab.json)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="the text prompt (caption)")
    what.add_argument("--class-name", help="a class name, e.g. ApplyEyeMakeup")
    what.add_argument("--class-id", type=int, help="a class index into the class list")
    p.add_argument("--classes", help="class list: text file (one a line), JSON list, or code-shard folder")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--cfg-scale", type=float, default=1.25)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward")
    p.add_argument("--fast", default="auto", choices=["auto", "on", "off"], help="static-cache fast path")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="compile the fast path's decode step (CUDA graphs; ~1 min once, pays after a few videos); "
                        "auto: on for the interactive loop on a GPU, off for one-shot runs")
    p.add_argument("--output", help="mp4 file (several samples tiled in a grid)")
    p.add_argument("--gif", help="gif file")
    p.add_argument("--grid", help="PNG contact sheet, one row per sample")
    p.add_argument("--save-codes", help="safetensors file with the codes (S, N)")
    p.add_argument("--out-dir", default="chat_outputs", help="where files go when no path is given / in the REPL")
    p.add_argument("--formats", default="mp4,png", help=f"files written per prompt to --out-dir, from {FORMATS}")
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"--formats takes a comma-separated subset of {FORMATS}, got {args.formats!r}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    choice = {"auto": "auto", "on": True, "off": False}
    settings = ChatSettings(args.cfg_scale, args.temperature, args.top_k, args.top_p, args.seed, args.num_samples,
                            args.batch_size, choice[args.fast])
    class_names = load_class_names(args.model, args.classes)
    prompt = args.prompt
    if args.class_name is not None:
        prompt = class_name_to_text(resolve_class(args.class_name, class_names))
    elif args.class_id is not None:
        prompt = class_name_to_text(resolve_class(str(args.class_id), class_names))
    llm = load_video_llm(args.model, args.base_model, args.gguf_file, device, dtype)
    larp = load_larp(args.larp, llm.vocab, device)
    out_dir = Path(args.out_dir)
    interactive = prompt is None
    if args.compile != "auto" or not interactive:
        settings = dataclasses.replace(settings, compile=args.compile == "on")
    if interactive:
        repl(llm, larp, settings, class_names, out_dir, formats, args.fps, sys.stdin, sys.stdout,
             progress=not args.no_progress)
        return
    result = generate(llm, larp, prompt, settings, progress=not args.no_progress)
    given = {"mp4": args.output, "gif": args.gif, "grid": args.grid, "codes": args.save_codes}
    paths = {k: Path(v) for k, v in given.items() if v}
    if not paths:
        paths = auto_paths(out_dir, 0, prompt, settings.seed, formats)
    for path in write_outputs(result, llm.vocab, settings, args.fps, **paths):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
