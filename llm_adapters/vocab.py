"""The id layout of LARP video codes inside an LLM vocabulary, and its record `video_vocab.json`.

Layout (ids are contiguous blocks, recorded once and read by every script; nothing recomputes them from
``len(tokenizer)``)::

    [0, text_vocab_size)                 the tokenizer's own tokens (len(tokenizer) before extension)
    [text_vocab_size, base)              reserved fillers: padded rows of Qwen-style models whose
                                         config.vocab_size exceeds len(tokenizer) (never reused)
    base + 0, base + 1, base + 2         <|video_start|>, <|video_end|>, <|video_uncond|>
    [video_offset, vocab_size)           one token per code: code k -> video_offset + k, "<|larp_%05d|>"
    [vocab_size, embedding_size)         zero rows that pad the embedding to a multiple of 64

with ``base = max(len(tokenizer), config.vocab_size)`` and ``video_offset = base + 3``. The fillers are added
to the tokenizer as special tokens ``<|larp_reserved_%05d|>`` so that the tokenizer's ids of the added tokens equal
the layout ids. All added strings are special ``AddedToken(normalized=False)``: they never split.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from larp_mllm.runtime.files import atomic_write_text

VOCAB_FILE = "video_vocab.json"
TEMPLATE_VERSION = 2  # 1: text user turns only; 2: user turns may hold video segments (text-only turns unchanged)

VIDEO_START = "<|video_start|>"
VIDEO_END = "<|video_end|>"
VIDEO_UNCOND = "<|video_uncond|>"
CONTROL_TOKENS = (VIDEO_START, VIDEO_END, VIDEO_UNCOND)


def code_token(code: int) -> str:
    """Token string of one LARP code, e.g. 17 -> '<|larp_00017|>'."""
    return f"<|larp_{code:05d}|>"


def filler_token(index: int) -> str:
    """Token string of one reserved filler id (Qwen-style padded rows)."""
    return f"<|larp_reserved_{index:05d}|>"


@dataclass
class VideoVocab:
    """Where the LARP codes live in an extended LLM vocabulary.

    Fields:
        base: first id after the text vocabulary = max(len(tokenizer), config.vocab_size) before extension.
        codebook_size: K, number of LARP codes.
        num_video_tokens: N, codes per video.
        codebook_hash: sha256 of the LARP codebook (identity of the code space).
        larp_checkpoint: where the LARP tokenizer came from (folder, hub id or preset name; informational).
        text_vocab_size: len(tokenizer) before extension; ids in [text_vocab_size, base) are reserved fillers.
            Defaults to base.
        embedding_size: rows of the resized embedding / lm_head (>= vocab_size, padded). Defaults to vocab_size.
        template_version: version of the prompt template (llm_adapters.prompts) the model was trained with.
    """

    base: int
    codebook_size: int
    num_video_tokens: int
    codebook_hash: str
    larp_checkpoint: str = ""
    text_vocab_size: int | None = None
    embedding_size: int | None = None
    template_version: int = TEMPLATE_VERSION

    def __post_init__(self) -> None:
        if self.text_vocab_size is None:
            self.text_vocab_size = self.base
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        if self.base <= 0 or self.codebook_size <= 0 or self.num_video_tokens <= 0:
            raise ValueError(
                f"VideoVocab expects positive base, codebook_size and num_video_tokens, got base={self.base}, "
                f"codebook_size={self.codebook_size}, num_video_tokens={self.num_video_tokens}"
            )
        if not 0 < self.text_vocab_size <= self.base:
            raise ValueError(f"text_vocab_size must be in (0, base={self.base}], got {self.text_vocab_size}")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"embedding_size {self.embedding_size} < vocab_size {self.vocab_size}")
        if not 1 <= self.template_version <= TEMPLATE_VERSION:
            raise ValueError(f"prompt template version {self.template_version} is not one this larp-mllm knows "
                             f"(1..{TEMPLATE_VERSION}): the model was written by a newer version; upgrade larp-mllm")

    # ---- ids ---------------------------------------------------------------------------------------------
    @property
    def video_start_id(self) -> int:
        return self.base

    @property
    def video_end_id(self) -> int:
        return self.base + 1

    @property
    def video_uncond_id(self) -> int:
        return self.base + 2

    @property
    def video_offset(self) -> int:
        """Id of code 0."""
        return self.base + len(CONTROL_TOKENS)

    @property
    def vocab_size(self) -> int:
        """One past the last used id (= video_offset + codebook_size)."""
        return self.video_offset + self.codebook_size

    @property
    def control_ids(self) -> list[int]:
        return [self.video_start_id, self.video_end_id, self.video_uncond_id]

    @property
    def new_ids(self) -> list[int]:
        """Ids whose rows are new: the control tokens and every code, [base, vocab_size)."""
        return list(range(self.base, self.vocab_size))

    def unused_id_ranges(self) -> list[tuple[int, int]]:
        """Half-open id ranges that exist in the embedding but carry no token (fillers and padding rows).

        Generation should suppress them; they are never produced by `codes_to_ids` or the prompt builder.
        """
        ranges = [(self.text_vocab_size, self.base), (self.vocab_size, self.embedding_size)]
        return [(lo, hi) for lo, hi in ranges if hi > lo]

    def token_strings(self) -> list[str]:
        """Strings of ids [base, vocab_size): the control tokens, then one per code."""
        return list(CONTROL_TOKENS) + [code_token(k) for k in range(self.codebook_size)]

    def filler_strings(self) -> list[str]:
        """Strings of the reserved filler ids [text_vocab_size, base)."""
        return [filler_token(i) for i in range(self.base - self.text_vocab_size)]

    # ---- codes <-> ids -----------------------------------------------------------------------------------
    def _check_length(self, x: torch.Tensor, what: str, check_length: bool) -> None:
        if x.dim() == 0:
            raise ValueError(f"{what} must have at least one dimension (..., N), got a scalar")
        if check_length and x.shape[-1] != self.num_video_tokens:
            raise ValueError(
                f"{what} must have {self.num_video_tokens} tokens per video in the last dimension, "
                f"got shape {tuple(x.shape)}"
            )

    def codes_to_ids(self, codes: torch.Tensor | np.ndarray | Sequence[int], check_length: bool = True) -> torch.Tensor:
        """LARP codes (..., N) in [0, K) -> LLM ids (..., N) in [video_offset, vocab_size), int64 tensor."""
        codes = torch.as_tensor(codes)
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        self._check_length(codes, "codes", check_length)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got min {int(codes.min())} max {int(codes.max())}"
            )
        return codes.long() + self.video_offset

    def ids_to_codes(self, ids: torch.Tensor | np.ndarray | Sequence[int], check_length: bool = True) -> torch.Tensor:
        """LLM ids (..., N) in [video_offset, vocab_size) -> LARP codes (..., N) in [0, K), int64 tensor."""
        ids = torch.as_tensor(ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        self._check_length(ids, "ids", check_length)
        if ids.numel() and (int(ids.min()) < self.video_offset or int(ids.max()) >= self.vocab_size):
            raise ValueError(
                f"video ids must lie in [{self.video_offset}, {self.vocab_size}), "
                f"got min {int(ids.min())} max {int(ids.max())}"
            )
        return ids.long() - self.video_offset

    def is_video_id(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask (same shape as ids): True where an id is a code token."""
        return (ids >= self.video_offset) & (ids < self.vocab_size)

    # ---- tokenizer ---------------------------------------------------------------------------------------
    @classmethod
    def extend_tokenizer(
        cls,
        tokenizer: Any,
        model_vocab_size: int,
        codebook_size: int,
        num_video_tokens: int,
        codebook_hash: str,
        larp_checkpoint: str = "",
        pad_to_multiple_of: int | None = 64,
    ) -> "VideoVocab":
        """Add fillers, control and code tokens to `tokenizer` (in place) and return the layout.

        Args:
            tokenizer: a Hugging Face tokenizer without video tokens.
            model_vocab_size: rows of the model's embedding before extension (config.vocab_size).
            pad_to_multiple_of: the embedding size is rounded up to a multiple of this (None: no padding).
        """
        from tokenizers import AddedToken

        existing = [t for t in (*CONTROL_TOKENS, code_token(0)) if t in tokenizer.get_vocab()]
        if existing:
            raise ValueError(
                f"tokenizer already holds video tokens {existing}; load an extended model with "
                "VideoLLM.from_pretrained(bundle_dir, base_model=...) instead of extending it again"
            )
        text_vocab_size = len(tokenizer)
        base = max(text_vocab_size, int(model_vocab_size))
        vocab = cls(base=base, codebook_size=codebook_size, num_video_tokens=num_video_tokens,
                    codebook_hash=codebook_hash, larp_checkpoint=larp_checkpoint, text_vocab_size=text_vocab_size)
        if pad_to_multiple_of:
            vocab.embedding_size = -(-vocab.vocab_size // pad_to_multiple_of) * pad_to_multiple_of
        strings = vocab.filler_strings() + vocab.token_strings()
        tokenizer.add_tokens([AddedToken(s, special=True, normalized=False) for s in strings], special_tokens=True)
        vocab.check_tokenizer(tokenizer)
        return vocab

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ValueError unless the tokenizer maps every filler/control/code string to its layout id."""
        strings = self.filler_strings() + self.token_strings()
        got = tokenizer.convert_tokens_to_ids(strings)
        want = list(range(self.text_vocab_size, self.vocab_size))
        if got != want or len(tokenizer) != self.vocab_size:
            bad = next(((s, g, w) for s, g, w in zip(strings, got, want) if g != w), None)
            raise ValueError(
                f"tokenizer does not match video_vocab.json: expected len(tokenizer) == {self.vocab_size} and ids "
                f"{self.text_vocab_size}..{self.vocab_size - 1} for the added tokens; got len {len(tokenizer)}"
                + (f", first mismatch {bad[0]!r} -> {bad[1]} (expected {bad[2]})" if bad else "")
            )

    # ---- persistence -------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write `folder/video_vocab.json` atomically; returns its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        record = asdict(self)
        record.update(video_start_id=self.video_start_id, video_end_id=self.video_end_id,
                      video_uncond_id=self.video_uncond_id, video_offset=self.video_offset,
                      vocab_size=self.vocab_size)
        return atomic_write_text(folder / VOCAB_FILE, json.dumps(record, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "VideoVocab":
        """Read `folder/video_vocab.json` (or the file itself) and check its derived ids."""
        path = Path(folder)
        if path.is_dir():
            path = path / VOCAB_FILE
        if not path.is_file():
            raise FileNotFoundError(f"expected {VOCAB_FILE} at {path}")
        record = json.loads(path.read_text())
        names = {f.name for f in fields(cls)}
        missing = {"base", "codebook_size", "num_video_tokens", "codebook_hash"} - set(record)
        if missing:
            raise ValueError(f"{path} lacks the fields {sorted(missing)}")
        vocab = cls(**{k: v for k, v in record.items() if k in names})
        for key in ("video_start_id", "video_end_id", "video_uncond_id", "video_offset", "vocab_size"):
            if key in record and record[key] != getattr(vocab, key):
                raise ValueError(f"{path}: {key}={record[key]} disagrees with the layout ({getattr(vocab, key)})")
        return vocab
