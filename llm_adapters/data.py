"""Training examples for the LLM stage: (prompt, codes) pairs read from code shards, formatted as chat turns.

One example (ids; ``prompts.PromptEncoder`` renders the base model's chat template, or a plain one)::

    input_ids = [chat prompt ... <|video_start|>] + [N code ids] + [<|video_end|>] (+ [eos])
    labels    = [-100 ...               -100    ] + [N code ids] + [<|video_end|>] (+ [-100])

The user text is the class name as words (``"ApplyEyeMakeup"`` -> ``"apply eye makeup"``) or the caption
(``prompt_source``). With probability ``cond_dropout`` it is replaced by the unconditional prompt
``<|video_uncond|>`` (for classifier-free guidance); with probability ``flip_prob`` the horizontally flipped twin's
codes are used when the shards carry them. Both draws are a pure function of (seed, epoch, example index), so a
resumed run sees the same examples as an uninterrupted one; the trainer calls ``set_epoch`` at each epoch start.

    codes = load_code_shards("runs/codes/ucf101_train")
    dataset = VideoCodeDataset(codes, video_llm.tokenizer, video_llm.vocab, max_length=2048)
    batch = VideoCollator(pad_id=0)([dataset[0], dataset[1]])   # input_ids / attention_mask / labels (B, L)

Checks run in the constructor, before any training: no examples, codes of another codebook than the vocabulary's
(both hashes named), a different N or K, missing class names / captions, and sequences longer than the context.
A damaged code folder (a listed shard missing, cut or holding codes outside the codebook) never reaches it:
``load_code_shards`` refuses it with one ``CodeFolderError`` naming the file; no training data is skipped silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from larp_mllm.data.codes import CodeSet

from .prompts import PromptEncoder, class_name_to_text
from .vocab import VideoVocab

IGNORE_INDEX = -100
PROMPT_SOURCES = ("class", "caption")


@dataclass
class VideoExample:
    """One tokenised example. input_ids / labels: (L,) int64; labels are IGNORE_INDEX outside the answer."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    conditional: bool  # False when the prompt was dropped to <|video_uncond|>
    flipped: bool  # True when the horizontally flipped twin's codes were used
    task: str = "text_to_video"  # llm_adapters.tasks.TASKS


def check_code_set(codes: CodeSet, codebook_hash: str, num_video_tokens: int, codebook_size: int,
                   source: str = "the VideoVocab") -> None:
    """Raise ValueError unless `codes` holds examples of the code space described by the other arguments.

    Args:
        codes: a loaded code folder.
        codebook_hash / num_video_tokens / codebook_size: what the model expects (from its `VideoVocab`).
        source: where the expectation comes from, for the error message (e.g. the LARP checkpoint folder).
    """
    if len(codes) == 0:
        raise ValueError(
            "the code shards hold no examples (0 codes): rerun larp-extract-codes on a dataset with readable videos"
        )
    if codes.codebook_hash != codebook_hash:
        raise ValueError(
            f"codebook mismatch: the code shards were extracted with codebook {codes.codebook_hash} "
            f"(LARP checkpoint {codes.larp_checkpoint or 'unnamed'}), but {source} has codebook {codebook_hash}; "
            "extract the codes again with the same LARP tokenizer the LLM is trained with"
        )
    if codes.num_tokens != num_video_tokens or codes.codebook_size != codebook_size:
        raise ValueError(
            f"the code shards hold {codes.num_tokens} tokens per video from {codes.codebook_size} codes, "
            f"but {source} expects {num_video_tokens} tokens from {codebook_size} codes"
        )


def example_texts(codes: CodeSet, prompt_source: str) -> list[str]:
    """The user text of every example: class names as words ("class") or captions ("caption")."""
    if prompt_source not in PROMPT_SOURCES:
        raise ValueError(f"prompt_source must be one of {PROMPT_SOURCES}, got {prompt_source!r}")
    if prompt_source == "caption":
        empty = [i for i, c in enumerate(codes.captions) if not c.strip()]
        if empty:
            raise ValueError(
                f"prompt_source='caption' but {len(empty)} of {len(codes)} examples have no caption "
                f"(first: example {empty[0]}); use prompt_source='class' or extract codes from a caption CSV"
            )
        return [c.strip() for c in codes.captions]
    labels = codes.labels.tolist()
    bad = [i for i, y in enumerate(labels) if not 0 <= y < len(codes.class_names)]
    if bad:
        raise ValueError(
            f"prompt_source='class' but {len(bad)} of {len(codes)} examples have no class (label {labels[bad[0]]} "
            f"of example {bad[0]}, {len(codes.class_names)} class names); use prompt_source='caption'"
        )
    words = [class_name_to_text(name) for name in codes.class_names]
    return [words[y] for y in labels]


class VideoCodeDataset(Dataset):
    """(prompt -> codes) examples over a `CodeSet`, with seeded condition dropout and flip twins.

    Args:
        codes: the code folder's contents (`load_code_shards`).
        tokenizer: the extended tokenizer (holds the video tokens).
        vocab: the id layout; its codebook hash must equal the shards'.
        prompt_source: "class" (class name as words) or "caption".
        cond_dropout: probability of the unconditional prompt, per example per epoch.
        flip_prob: probability of the flipped twin's codes when the shards have them (0: never).
        seed: seed of the per-example draws.
        max_length: the longest allowed sequence (the model's context, or less); None: no limit.
        add_eos: append the tokenizer's eos after <|video_end|> (closes the assistant turn; not a loss target).
    """

    def __init__(self, codes: CodeSet, tokenizer: Any, vocab: VideoVocab, prompt_source: str = "class",
                 cond_dropout: float = 0.1, flip_prob: float = 0.5, seed: int = 0, max_length: int | None = None,
                 add_eos: bool = True):
        if not 0.0 <= cond_dropout <= 1.0 or not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"cond_dropout and flip_prob must lie in [0, 1], got {cond_dropout}, {flip_prob}")
        check_code_set(codes, vocab.codebook_hash, vocab.num_video_tokens, vocab.codebook_size)
        self.codes, self.vocab = codes, vocab
        self.cond_dropout, self.seed = float(cond_dropout), int(seed)
        self.flip_prob = float(flip_prob) if codes.flip_codes is not None else 0.0
        self.epoch = 0
        texts = example_texts(codes, prompt_source)
        unique = sorted(set(texts))
        encode = PromptEncoder(tokenizer, vocab)  # class names / captions are data: control strings stay text
        self._prompts: dict[str | None, list[int]] = {t: encode(t) for t in unique}
        self._prompts[None] = encode(None)
        self._texts = texts
        eos = tokenizer.eos_token_id
        if add_eos and eos is None:
            raise ValueError("add_eos=True but the tokenizer has no eos token; set add_eos=False")
        self._tail = [vocab.video_end_id] + ([int(eos)] if add_eos else [])
        longest_text = max(self._prompts, key=lambda t: len(self._prompts[t]))
        self.max_sequence_length = len(self._prompts[longest_text]) + vocab.num_video_tokens + len(self._tail)
        if max_length is not None and self.max_sequence_length > max_length:
            raise ValueError(
                f"the longest example is {self.max_sequence_length} tokens (prompt "
                f"{len(self._prompts[longest_text])} + {vocab.num_video_tokens} video tokens + {len(self._tail)}; "
                f"prompt text {longest_text!r:.80}) but the context holds {max_length} positions; shorten the "
                "captions or use a base model with a longer context"
            )

    def __len__(self) -> int:
        return len(self.codes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the dropout / flip draws (the trainer calls this at each epoch start)."""
        self.epoch = int(epoch)

    def draws(self, index: int, epoch: int | None = None) -> tuple[bool, bool]:
        """(conditional, flipped) of example `index` in `epoch` (default: the current one); pure in its inputs."""
        epoch = self.epoch if epoch is None else int(epoch)
        u = np.random.default_rng([self.seed, epoch, int(index)]).random(2)  # (2,) uniforms in [0, 1)
        return bool(u[0] >= self.cond_dropout), bool(u[1] < self.flip_prob)

    def __getitem__(self, index: int) -> VideoExample:
        conditional, flipped = self.draws(index)
        source = self.codes.flip_codes if flipped else self.codes.codes
        prompt = self._prompts[self._texts[index] if conditional else None]
        video = self.vocab.codes_to_ids(source[index]).tolist()  # (N,) ids
        target = video + self._tail[:1]
        input_ids = prompt + target + self._tail[1:]
        labels = [IGNORE_INDEX] * len(prompt) + target + [IGNORE_INDEX] * len(self._tail[1:])
        return VideoExample(torch.tensor(input_ids), torch.tensor(labels), conditional, flipped)


@dataclass
class VideoCollator:
    """Right-pads `VideoExample`s into the dict a HF causal LM takes as keyword arguments.

    Returns ``{"input_ids": (B, L) int64, "attention_mask": (B, L) int64, "labels": (B, L) int64}`` with pad
    positions holding `pad_id` / 0 / IGNORE_INDEX; L is rounded up to `pad_to_multiple_of` when given.
    """

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[VideoExample]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("VideoCollator got an empty batch")
        length = max(len(e.input_ids) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(examples)
        input_ids = torch.full((batch, length), int(self.pad_id), dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)  # (B, L)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            input_ids[row, :n] = example.input_ids
            attention_mask[row, :n] = 1
            labels[row, :n] = example.labels
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos, else 0 (masked out either way)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
