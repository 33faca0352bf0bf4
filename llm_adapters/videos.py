"""A prompt -> sampled codes -> decoded videos -> files (mp4 / gif / PNG contact sheet / codes), and a video in ->
a text answer or continued clips: what `larp-chat` does per prompt, as library functions.

    from llm_adapters.videos import ChatSettings, auto_paths, generate_videos, write_outputs
    settings = ChatSettings(num_samples=4, seed=0)
    result = generate_videos(llm, larp, "apply eye makeup", settings)  # result.videos (4, 3, T, H, W) in [0, 1]
    write_outputs(result, llm.vocab, settings, fps=8, **auto_paths(Path("out"), 0, result.prompt, 0, ["mp4", "png"]))

    video = load_video_input(larp, "clip.mp4")              # its first T frames, as training clips are made, + codes
    answer_about_video(llm, video, "What is moving, and where to?", settings)    # -> "a red circle moving right ..."
    result = continue_video(llm, larp, video, ChatSettings(cfg_scale=1.0))      # result.videos (S, 3, T, H, W)

Videos are clamped to [0, 1] and written with `larp_mllm.data.video_write`; several samples are tiled in a grid in
the mp4/gif. File names made from a prompt go through `larp_mllm.runtime.files.safe_filename` (prompts are data).
An input video is read with `larp_mllm.data.video_io` as `ClipDataset` reads training clips (frames [0, T), the
short side resized to the tokenizer's size, center crop) and tokenized with deterministic VQ; videos with fewer
than T frames or frames smaller than the tokenizer's input (never upscaled) are refused.
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

from larp_mllm.data.continuation import DEFAULT_CONDITION_FRAMES, condition_clip

from .answers import continue_video_codes, generate_text
from .generate import SamplingConfig, generate_video_codes
from .loading import decode_videos, tokenize_videos
from .tasks import CONTINUE_INSTRUCTION, question_prompt
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
    answer_temperature: float = 0.0  # text answers about a video: 0 = greedy (top_p applies when > 0)
    max_new_tokens: int = 64  # the longest text answer, in tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"num_samples, batch_size and max_new_tokens must be >= 1, got {self.num_samples}, "
                             f"{self.batch_size}, {self.max_new_tokens}")
        if not self.answer_temperature >= 0:
            raise ValueError(f"the answer temperature must be >= 0, got {self.answer_temperature}")


@dataclass
class ChatResult:
    """Codes (S, N) int64, decoded videos (S, 3, T, H, W) in [0, 1], the seeds used and the written files; for a
    continuation also the input video, the condition frames and the condition clip's codes (N,)."""

    prompt: str
    codes: torch.Tensor
    videos: torch.Tensor
    seeds: list[int]
    paths: list[Path] = field(default_factory=list)
    task: str = "text_to_video"  # or "continuation" (llm_adapters.tasks.TASKS)
    source_video: Path | None = None
    condition_frames: int | None = None
    condition_codes: torch.Tensor | None = None


@dataclass(frozen=True)
class VideoInput:
    """A video given to the LLM: its file, the clip (3, T, H, W) in [0, 1] at the tokenizer's size and its codes
    (N,) int64 (deterministic VQ)."""

    path: Path
    clip: torch.Tensor
    codes: torch.Tensor


def read_clip(path: str | Path, video_shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Frames [0, T) of the video at `path` as `ClipDataset` makes training clips: short side resized to the
    tokenizer's size (antialiased), center crop; float (3, T, H, W) in [0, 1] for `video_shape` = (3, T, H, W).

    FileNotFoundError for a missing file; ValueError (naming the file) when it cannot be decoded, has fewer than T
    frames, or frames whose short side is below the tokenizer's size (videos are not upscaled).
    """
    from larp_mllm.data.video_io import VideoReader

    _, frames, height, width = video_shape
    size = height
    if height != width:
        raise ValueError(f"expected a tokenizer of square frames, got {height}x{width}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        with VideoReader(path) as reader:
            first = reader.read(0, 1)  # (3, 1, H0, W0): the decoded frame size
            h0, w0 = first.shape[-2:]
            clip = reader.read(0, frames, size) if min(h0, w0) >= size else None  # (3, t, size, size), t <= T
    except Exception as err:  # noqa: BLE001 - not a video, corrupt, no video stream, a format no decoder reads
        lines = str(err).strip().splitlines()
        why = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
        raise ValueError(f"{path}: could not be decoded as a video ({why})") from err
    if clip is None:
        raise ValueError(f"{path}: frames are {w0}x{h0} (W x H), smaller than the tokenizer's input size "
                         f"{size}x{size}; videos are not upscaled, give one whose short side is >= {size}")
    if clip.shape[1] < frames:
        raise ValueError(f"{path}: found {clip.shape[1]} frames, the tokenizer needs {frames} (its clip length)")
    return clip


def load_video_input(larp: Any, path: str | Path) -> VideoInput:
    """Read (`read_clip`) and tokenize (deterministic VQ) the video at `path` for `larp`."""
    clip = read_clip(path, larp.video_shape)  # (3, T, H, W)
    return VideoInput(Path(path), clip, tokenize_videos(larp, clip[None])[0])


def answer_about_video(llm: Any, video: VideoInput, question: str, settings: ChatSettings,
                       progress: bool = True) -> str:
    """The LLM's text answer to `question` about `video` (greedy unless `settings.answer_temperature` > 0)."""
    if not question.strip():
        raise ValueError("the question about the video is empty")
    return generate_text(llm, [question_prompt(video.codes, question)], max_new_tokens=settings.max_new_tokens,
                         temperature=settings.answer_temperature, top_p=settings.top_p, seed=settings.seed,
                         progress=progress)[0]


def continue_video(llm: Any, larp: Any, video: VideoInput, settings: ChatSettings, condition_frames: int | None = None,
                   progress: bool = True) -> ChatResult:
    """`settings.num_samples` continuations of `video` (seeds seed, seed + 1, ...): the codes of whole clips written
    from the codes of its condition clip (its first `condition_frames` frames, the last repeated; default 5), decoded
    by `larp`. Without CFG, as the reference's frame prediction: `settings.cfg_scale` must be 1."""
    if settings.cfg_scale != 1.0:
        raise ValueError(f"continuation runs without CFG (as the reference's frame prediction): the CFG scale must "
                         f"be 1, got {settings.cfg_scale}")
    frames = video.clip.shape[1]
    k = DEFAULT_CONDITION_FRAMES if condition_frames is None else condition_frames
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= frames:
        raise ValueError(f"condition frames must be in [1, T] = [1, {frames}] (the tokenizer's clip length), "
                         f"got {k!r}")
    cond_codes = tokenize_videos(larp, condition_clip(video.clip, k)[None])  # (1, N)
    codes = continue_video_codes(llm, cond_codes.expand(settings.num_samples, -1), temperature=settings.temperature,
                                 top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed,
                                 batch_size=settings.batch_size, fast=settings.fast, progress=progress)  # (S, N)
    seeds = [settings.seed + i for i in range(settings.num_samples)]
    return ChatResult(CONTINUE_INSTRUCTION, codes, decode_videos(larp, codes), seeds, task="continuation",
                      source_video=video.path, condition_frames=k, condition_codes=cond_codes[0])


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
    safetensors file with the prompt, task, seeds, codebook hash and settings as metadata, and for a continuation
    the input video's path, the condition frames and a `condition_codes` (N,) tensor); returns and records their
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
        meta = {"prompt": result.prompt, "task": result.task, "seeds": json.dumps(result.seeds),
                "codebook_hash": vocab.codebook_hash, "settings": json.dumps(dataclasses.asdict(settings))}
        tensors = {"codes": result.codes.contiguous()}
        if result.source_video is not None:
            meta["video"] = str(result.source_video)
        if result.condition_frames is not None:
            meta["condition_frames"] = str(result.condition_frames)
        if result.condition_codes is not None:
            tensors["condition_codes"] = result.condition_codes.contiguous()
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
