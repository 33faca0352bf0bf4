"""A prompt -> sampled codes -> decoded videos -> files (mp4 / gif / PNG contact sheet / codes): what `larp-chat`
does per prompt, as library functions.

    from llm_adapters.videos import ChatSettings, auto_paths, generate_videos, write_outputs
    settings = ChatSettings(num_samples=4, seed=0)
    result = generate_videos(llm, larp, "apply eye makeup", settings)  # result.videos (4, 3, T, H, W) in [0, 1]
    write_outputs(result, llm.vocab, settings, fps=8, **auto_paths(Path("out"), 0, result.prompt, 0, ["mp4", "png"]))

Videos are clamped to [0, 1] and written with `larp_mllm.data.video_write`; several samples are tiled in a grid in
the mp4/gif. File names made from a prompt go through `larp_mllm.runtime.files.safe_filename` (prompts are data).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .generate import SamplingConfig, generate_video_codes
from .loading import decode_videos
from .vocab import VideoVocab

FORMATS = ("mp4", "gif", "png", "codes")


def add_sampling_args(parser: argparse.ArgumentParser, num_samples: int, seed_help: str) -> None:
    """The sampling options every generating CLI shares (larp-chat, larp-ucf101-bench), one spelling each."""
    parser.add_argument("--num-samples", type=int, default=num_samples)
    parser.add_argument("--cfg-scale", type=float, default=1.25, help="classifier-free guidance (1 = off)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplingConfig fields of parsed `add_sampling_args` options (a dict, for the settings dataclasses)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig)}


@dataclass(frozen=True)
class ChatSettings(SamplingConfig):
    """What the next generation uses (sampling, checked by SamplingConfig); changed by flags and REPL commands."""

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


def generate_videos(llm: Any, larp: Any, prompt: str, settings: ChatSettings, progress: bool = True) -> ChatResult:
    """`settings.num_samples` videos of `prompt` (seeds seed, seed + 1, ...), sampled by `llm`, decoded by `larp`."""
    codes = generate_video_codes(llm, [prompt] * settings.num_samples, cfg_scale=settings.cfg_scale,
                                 temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                                 seed=settings.seed, batch_size=settings.batch_size, fast=settings.fast,
                                 compile=settings.compile, progress=progress)
    seeds = [settings.seed + i for i in range(settings.num_samples)]
    return ChatResult(prompt, codes, decode_videos(larp, codes), seeds)


def write_outputs(result: ChatResult, vocab: VideoVocab, settings: ChatSettings, fps: float, mp4: Path | None = None,
                  gif: Path | None = None, grid: Path | None = None, codes: Path | None = None) -> list[Path]:
    """Write the asked files (mp4/gif at `fps` frames per second tile several samples in a grid; `codes` is a
    safetensors file with the prompt, seeds, codebook hash and settings as metadata); returns and records their
    paths."""
    from safetensors.torch import save_file

    from larp_mllm.data.video_write import write_video, write_video_grid
    from larp_mllm.runtime.files import atomic_write

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
    """Files `out_dir/NNN_<prompt words>_sSEED.<ext>` for `formats` (from FORMATS), keyed as `write_outputs` takes
    them; the prompt (a class name, a chat line) is untrusted text, so the name goes through `safe_filename`: it stays
    one plain file name inside `out_dir`."""
    from larp_mllm.runtime.files import safe_filename

    stem = safe_filename(f"{index:03d}_{_slug(prompt)}_s{seed}")
    suffix = {"mp4": ".mp4", "gif": ".gif", "png": ".png", "codes": ".safetensors"}
    key = {"mp4": "mp4", "gif": "gif", "png": "grid", "codes": "codes"}
    return {key[f]: out_dir / f"{stem}{suffix[f]}" for f in formats}
