"""Prompt ids for video generation: the base model's chat template, user = the text, assistant opens a video.

A sequence is ``build_prompt_ids(...)`` (ends with ``<|video_start|>``) + N code ids + ``<|video_end|>`` (+ the
tokenizer's eos when training). The template is versioned by ``vocab.TEMPLATE_VERSION`` (recorded in
video_vocab.json); changing this file's output changes what a trained model expects.
"""
from __future__ import annotations

import re
from typing import Any

from .vocab import VIDEO_UNCOND, VideoVocab

PLAIN_TEMPLATE = "User: {text}\nAssistant:"


def class_name_to_text(name: str) -> str:
    """A dataset class name as plain words: 'ApplyEyeMakeup' -> 'apply eye makeup', 'air_drumming' -> 'air drumming'."""
    words = re.sub(r"[_\-]+", " ", name)
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", words)
    return " ".join(words.lower().split())


def build_prompt_ids(tokenizer: Any, vocab: VideoVocab, text: str | None) -> list[int]:
    """Token ids of a generation prompt, ending with ``vocab.video_start_id``.

    Args:
        tokenizer: the extended tokenizer (holds the video tokens).
        vocab: the layout (only ``video_start_id`` is used).
        text: the user turn (class name or caption); None -> the unconditional prompt ``<|video_uncond|>``.

    Uses the tokenizer's chat template with one user message and the assistant turn opened; a tokenizer without a
    chat template gets ``"User: {text}\\nAssistant:"`` with its usual special tokens (e.g. bos).
    """
    user = VIDEO_UNCOND if text is None else str(text)
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(PLAIN_TEMPLATE.format(text=user), add_special_tokens=True)["input_ids"]
    return [int(i) for i in ids] + [vocab.video_start_id]
