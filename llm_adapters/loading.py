"""Load what stage 2 runs on: a trained LLM folder, the LARP tokenizer it was trained on, and its class list.

    from llm_adapters import decode_videos, generate_video_codes, load_larp, load_video_llm, resolve_device_dtype
    device, dtype = resolve_device_dtype("auto")                       # CUDA + bf16 when there is a GPU, else CPU fp32
    llm = load_video_llm("runs/llm/final", device=device, dtype=dtype)  # a VideoLLM bundle or a merged checkpoint
    larp = load_larp("runs/tok/final", llm.vocab, device)               # its codebook is checked against the LLM's
    videos = decode_videos(larp, generate_video_codes(llm, ["apply eye makeup"]))  # (1, 3, T, H, W) in [0, 1]
    codes = tokenize_videos(larp, videos)                               # (1, N) int64, deterministic VQ

An LLM folder is a VideoLLM bundle (``video_llm.json``; it needs its base model: the recorded one, with its GGUF file
name when it came from one, or the one given) or a merged checkpoint (``larp-merge-llm`` output: a plain HF model +
``video_vocab.json``). The LLM and the LARP tokenizer may also be Hub repo ids (``owner/name``, read through
huggingface_hub's cache; a local folder of that name wins), and so may the recorded base model and LARP checkpoint.
Class lists come from a text file (one name a line), a JSON list, a code-shard folder (``manifest.json``), or the
model folder (``class_names.json`` written by ``larp-train-llm``, ``classes.txt``, or the code folder its
``training_args.json`` names).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .prompts import class_name_to_text
from .vocab import VOCAB_FILE, VideoVocab

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# written into the model folder by larp-train-llm, read here: its arguments (data.code_dir) and the class list
ARGS_FILE = "training_args.json"
CLASSES_FILE = "class_names.json"


@dataclass
class MergedLLM:
    """A merged checkpoint: a plain HF causal LM with its extended tokenizer and the id layout."""

    model: Any
    tokenizer: Any
    vocab: VideoVocab


def resolve_device_dtype(device: str | None, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """'auto' device = CUDA when available; 'auto' dtype = bf16 on CUDA, fp32 elsewhere; else a key of DTYPES."""
    dev = torch.device(device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return dev, DTYPES[dtype]


# ---- the LLM and LARP ---------------------------------------------------------------------------------------
def load_video_llm(path: str | Path, base_model: str | None = None, gguf_file: str | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A VideoLLM bundle (on top of its base model) or a merged checkpoint (`MergedLLM`), in eval mode on
    `device`/`dtype`; both have `.model`, `.tokenizer` and `.vocab`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from larp_mllm.runtime.hub import SAFE_PATTERNS, is_hub_id, resolve_folder

    from .model import CONFIG_FILE, VideoLLM

    path = resolve_folder(path, allow_patterns=SAFE_PATTERNS, what="LLM")
    if (path / CONFIG_FILE).is_file():
        if base_model is None:  # the recorded base (and its GGUF file name, when it came from one)
            config = json.loads((path / CONFIG_FILE).read_text())
            recorded, recorded_gguf = config.get("base_model", ""), config.get("gguf_file") or None
            gguf_file = gguf_file or recorded_gguf
            source = Path(recorded) / gguf_file if recorded and gguf_file else Path(recorded)
            if not recorded or not (source.exists() or is_hub_id(recorded)):
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


def load_larp(path: str | Path | None, vocab: VideoVocab, device: torch.device) -> Any:
    """The LARP tokenizer (eval, fp32) from a checkpoint folder or Hub repo id (None: the one recorded in `vocab`);
    checks that its codebook, code count and codebook size are the LLM's."""
    from larp_mllm import LARPTokenizer
    from larp_mllm.runtime.hub import is_hub_id

    if path is None:
        recorded = vocab.larp_checkpoint
        if not recorded or not (Path(recorded).is_dir() or is_hub_id(recorded)):
            raise ValueError("give --larp-tokenizer (a LARP checkpoint folder or Hub id); the model records none "
                             f"that exists here ({vocab.larp_checkpoint!r})")
        path = recorded
    larp = LARPTokenizer.from_pretrained(path).to(device).eval()
    if larp.codebook_hash() != vocab.codebook_hash:
        raise ValueError(f"LARP codebook mismatch: the LLM was trained on codebook {vocab.codebook_hash}, the LARP "
                         f"checkpoint {path} has {larp.codebook_hash()}")
    if larp.num_tokens != vocab.num_video_tokens or larp.codebook_size != vocab.codebook_size:
        raise ValueError(f"LARP checkpoint {path} makes {larp.num_tokens} codes of {larp.codebook_size}; the LLM "
                         f"expects {vocab.num_video_tokens} of {vocab.codebook_size}")
    return larp


@torch.no_grad()
def decode_videos(larp: Any, codes: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """LARP decode of codes (S, N) int64 -> float CPU videos (S, 3, T, H, W) clamped to [0, 1]."""
    device = next(larp.parameters()).device
    out = [larp.decode_codes(codes[i:i + batch_size].to(device)).float().clamp(0, 1).cpu()
           for i in range(0, len(codes), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def tokenize_videos(larp: Any, videos: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """LARP tokenize (deterministic VQ) of videos (S, 3, T, H, W) float in [0, 1] -> CPU codes (S, N) int64."""
    device = next(larp.parameters()).device
    out = [larp.tokenize(videos[i:i + batch_size].to(device), deterministic=True).cpu()
           for i in range(0, len(videos), batch_size)]
    return torch.cat(out)


# ---- class lists --------------------------------------------------------------------------------------------
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
    for name in (CLASSES_FILE, "classes.txt"):
        if (Path(model_dir) / name).is_file():
            return _read_class_file(Path(model_dir) / name) or None
    args_file = Path(model_dir) / ARGS_FILE
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
    """A class given by name (any spelling with the same words) or index -> its name, checked against the class list
    when there is one."""
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
