"""One LoRA for every direction: text-to-video, continuation, video-to-text and plain text, mixed by ratios.

Examples (ids; ``prompts.PromptEncoder`` renders the chat template; ``V(c)`` = ``<|video_start|> c <|video_end|>``)::

    text_to_video   user: caption / class words          assistant: V(codes)              loss: codes + end
    continuation    user: V(condition codes) + CONTINUE   assistant: V(codes)              loss: codes + end
    video_to_text   user: V(codes) + a question           assistant: caption + eos         loss: caption + eos
    text            a plain text row (loss on every token), or a chat row (loss on the answer + eos)

The condition codes are those of the clip's first frames with the last of them repeated to the clip length
(``larp_mllm.data.continuation``, made at extraction: ``larp-extract-codes --condition-frames 5``); the model writes
the codes of the whole clip, as the LARP reference's frame prediction does (sampled without CFG).

`MixedTaskDataset` keeps one example per code-folder row per epoch, as `VideoCodeDataset` does: row i of epoch e is
a task drawn with the configured ratios from ``(seed, epoch, i)``, made from video i (a text task takes a text row
drawn from the same seed). Everything is a pure function of (seed, epoch, index), so a resumed run sees the same
examples.

    mix = TaskMix(text_to_video=0.5, continuation=0.2, video_to_text=0.2, text=0.1)
    dataset = MixedTaskDataset(codes, tokenizer, vocab, mix, text_rows=load_text_rows("chat.jsonl"))
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from larp_mllm.data.codes import CodeSet

from .data import IGNORE_INDEX, VideoCodeDataset, VideoExample, example_texts
from .prompts import Part, PromptEncoder, VideoSegment
from .vocab import VideoVocab

TASKS = ("text_to_video", "continuation", "video_to_text", "text")
CONTINUE_INSTRUCTION = "Continue this video."
CAPTION_QUESTIONS = ("Describe the video.", "What is moving, and where to?", "What happens in this video?")


def continuation_prompt(condition_codes: torch.Tensor) -> list[Part]:
    """The user turn asking for the whole clip from the codes of its condition clip ((N,) codes)."""
    return [VideoSegment(torch.as_tensor(condition_codes)), CONTINUE_INSTRUCTION]


def question_prompt(codes: torch.Tensor, question: str) -> list[Part]:
    """The user turn of a question about a video ((N,) codes): the video first, then the text."""
    return [VideoSegment(torch.as_tensor(codes)), question]


@dataclass(frozen=True)
class TaskMix:
    """Shares of the tasks in the training stream (normalised over the tasks with a share > 0)."""

    text_to_video: float = 1.0
    continuation: float = 0.0
    video_to_text: float = 0.0
    text: float = 0.0

    def __post_init__(self) -> None:
        shares = asdict(self)
        bad = {k: v for k, v in shares.items() if not (v >= 0.0 and np.isfinite(v))}
        if bad or sum(shares.values()) <= 0:
            raise ValueError(f"task shares must be >= 0 with a positive sum, got {shares}")

    @property
    def shares(self) -> np.ndarray:
        """(len(TASKS),) probabilities in TASKS order."""
        raw = np.array([getattr(self, t) for t in TASKS], dtype=np.float64)
        return raw / raw.sum()

    @property
    def only_text_to_video(self) -> bool:
        return all(getattr(self, t) == 0 for t in TASKS[1:])


@dataclass(frozen=True)
class TextRow:
    """A plain-text training row: `text` alone (loss on every token) or a chat row `prompt` -> `text`."""

    text: str
    prompt: str | None = None


def load_text_rows(path: str | os.PathLike) -> list[TextRow]:
    """Rows of a JSONL file: ``{"text": ...}`` (plain text) or ``{"prompt": ..., "response": ...}`` (chat)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text data {path} not found (expected a JSONL file of {{'text': ...}} or "
                                "{'prompt': ..., 'response': ...} rows)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip():
            rows.append(TextRow(row["text"]))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            rows.append(TextRow(row["response"], row["prompt"]))
        else:
            raise ValueError(f"{path}:{number}: expected {{'text': str}} or {{'prompt': str, 'response': str}}, got "
                             f"{line[:80]!r}")
    if not rows:
        raise ValueError(f"{path} holds no text rows")
    return rows


class MixedTaskDataset(Dataset):
    """Examples of every task of `mix` over a `CodeSet` (+ text rows), one per code row per epoch.

    Args:
        codes: the code folder's contents; continuation needs its condition codes (``cond_codes``).
        tokenizer / vocab: the extended tokenizer and its layout.
        mix: the task shares.
        text_rows: rows of the "text" task (`load_text_rows`); needed when its share is > 0.
        prompt_source: "class" or "caption": the text-to-video prompt and the video-to-text answer.
        cond_dropout / flip_prob: of the text-to-video examples (`VideoCodeDataset`).
        seed: seed of every draw. max_length: the longest allowed sequence (checked up front for every task).
        max_text_tokens: text rows are cut to this many tokens.
    """

    def __init__(self, codes: CodeSet, tokenizer: Any, vocab: VideoVocab, mix: TaskMix,
                 text_rows: Sequence[TextRow] | None = None, prompt_source: str = "class", cond_dropout: float = 0.1,
                 flip_prob: float = 0.5, seed: int = 0, max_length: int | None = None, max_text_tokens: int = 256):
        self.video = VideoCodeDataset(codes, tokenizer, vocab, prompt_source, cond_dropout, flip_prob, seed,
                                      max_length=None, add_eos=True)
        self.codes, self.vocab, self.mix, self.seed = codes, vocab, mix, int(seed)
        self.encode = PromptEncoder(tokenizer, vocab)
        self.eos = int(tokenizer.eos_token_id)
        self.text_rows = list(text_rows or [])
        if mix.continuation > 0 and getattr(codes, "cond_codes", None) is None:
            raise ValueError("the continuation task needs condition codes: extract the codes with "
                             "larp-extract-codes --condition-frames 5, or set its share to 0")
        if mix.text > 0 and not self.text_rows:
            raise ValueError("the text task has a share > 0 but no text rows were given (text_data: a JSONL file)")
        self.answers = example_texts(codes, prompt_source)
        self._answer_ids = {t: self.encode.text_ids(t) + [self.eos] for t in set(self.answers)}
        self._questions = [self.encode.text_ids(q) for q in CAPTION_QUESTIONS]
        self._text = [self._text_ids(row, max_text_tokens) for row in self.text_rows]
        self.max_sequence_length = self._longest()
        if max_length is not None and self.max_sequence_length > max_length:
            raise ValueError(f"the longest example is {self.max_sequence_length} tokens but the context holds "
                             f"{max_length} positions; shorten the captions / text rows or use a longer context")

    def __len__(self) -> int:
        return len(self.codes)

    def set_epoch(self, epoch: int) -> None:
        self.video.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.video.epoch

    def task_of(self, index: int, epoch: int | None = None) -> tuple[str, int]:
        """(task, draw) of example `index`: the task and a second draw (question or text row index)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch, int(index), 1])  # a stream apart from the video draws
        task = TASKS[int(rng.choice(len(TASKS), p=self.mix.shares))]
        return task, int(rng.integers(1 << 30))

    def __getitem__(self, index: int) -> VideoExample:
        task, draw = self.task_of(index)
        if task == "text_to_video":
            example = self.video[index]
            return VideoExample(example.input_ids, example.labels, example.conditional, example.flipped, task)
        if task == "continuation":
            prompt = self.encode(continuation_prompt(self.codes.cond_codes[index]))
            target = self.vocab.codes_to_ids(self.codes.codes[index]).tolist() + [self.vocab.video_end_id]
            return _example(prompt, target, [self.eos], task)
        if task == "video_to_text":
            question = CAPTION_QUESTIONS[draw % len(CAPTION_QUESTIONS)]
            prompt = self.encode.turn_ids(question_prompt(self.codes.codes[index], question))
            return _example(prompt, self._answer_ids[self.answers[index]], [], task)
        prompt, target = self._text[draw % len(self._text)]
        return _example(prompt, target, [], task)

    # ---- internals ----
    def _text_ids(self, row: TextRow, max_tokens: int) -> tuple[list[int], list[int]]:
        """(prompt ids without loss, target ids) of a text row, cut to `max_tokens` in all."""
        if row.prompt is None:
            ids = [int(i) for i in self.encode.tokenizer(row.text, add_special_tokens=True)["input_ids"]]
            ids = [i for i in ids if not i >= self.vocab.text_vocab_size]  # plain text never holds video ids
            return ids[:1], ids[1:max_tokens]  # the first token has no target of its own
        prompt = self.encode.turn_ids(row.prompt)
        return prompt, (self.encode.text_ids(row.text) + [self.eos])[:max(1, max_tokens - len(prompt))]

    def _longest(self) -> int:
        n = self.vocab.num_video_tokens
        lengths = [self.video.max_sequence_length]
        if self.mix.continuation > 0:
            lengths.append(len(self.encode(continuation_prompt(self.codes.cond_codes[0]))) + n + 2)
        if self.mix.video_to_text > 0:
            longest_question = max(len(q) for q in self._questions)
            longest_answer = max(len(a) for a in self._answer_ids.values())
            frame = len(self.encode.turn_ids(question_prompt(self.codes.codes[0], "")))
            lengths.append(frame + longest_question + longest_answer)
        if self.mix.text > 0:
            lengths.append(max(len(p) + len(t) for p, t in self._text))
        return max(lengths)


def _example(prompt: list[int], target: list[int], tail: list[int], task: str) -> VideoExample:
    """prompt (no loss) + target (loss) + tail (no loss) as one example."""
    input_ids = prompt + target + tail
    labels = [IGNORE_INDEX] * len(prompt) + target + [IGNORE_INDEX] * len(tail)
    return VideoExample(torch.tensor(input_ids), torch.tensor(labels), True, False, task)
