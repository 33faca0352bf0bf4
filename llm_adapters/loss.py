"""The stage-2 training loss, without full-vocabulary logits at the video positions.

    video_loss = VideoLoss(video_llm.model, video_llm.vocab)          # mode "video_rows" (default) or "full"
    terms, outputs = video_loss(model, batch)     # ONE forward; batch: input_ids / attention_mask / labels (B, L)
    (terms.loss_sum / terms.num_targets).backward()                    # the trainer normalises as the HF Trainer does

Every position predicts the next label (the shift of HF causal LMs); its target falls in one of two kinds:

- video targets, a code id or ``<|video_end|>``: with "video_rows" they are scored over the video rows only
  (`video_row_ids`: ``<|video_end|>`` and the K code rows), i.e. the full-vocabulary cross-entropy restricted to
  those rows and renormalised (logsumexp over the rows). The constrained sampler (llm_adapters.generate) draws the
  codes from the same rows (the K codes, then ``<|video_end|>`` forced), so text rows never compete with them. The
  head computes just these R = K + 1 rows: logits (B, L, R) instead of (B, L, V), V ~ 160k for Qwen2.5.
- text targets, any other id (none in class-to-video; text answers later): full-vocabulary cross-entropy from the
  hidden states the head received, in chunks of `TEXT_CHUNK` positions, each recomputed in backward (activation
  checkpointing), so the full-vocabulary logits of at most one chunk exist at a time. The model's post-head transform
  (Gemma soft-capping, Cohere / Granite scales; ``llm_adapters.generate.logit_transform``) is applied to them.
  `row_scoring_error` measures both narrow paths against the model's own logits, for any model; `VideoLoss` checks
  the transform once, on the first batch that has text targets.

"full" scores every target over the model's full-vocabulary logits (the loss before, = HF's ForCausalLMLoss).

How the head scores rows (`score_rows`): the model's own forward still calls the head, so ZeRO-3 gathers its
parameters through module hooks and the model's post-head transforms still apply. A `HybridHead` (codebook adapter)
computes only the asked rows, and recomputes its video logits in backward (so that the loss part keeps just the
(B * L, R) log-probabilities of the cross-entropy for backward). Any other head (the "rows" adapter: peft trainable tokens on a resized lm_head; a
materialised model) falls back to a forward hook that keeps the asked columns of its output: the full logits then
exist for a moment in the forward, but nothing keeps them for backward (a linear layer saves its input and weight).

The trainer's logged figures (`LossTerms.code_loss_sum`, `code_correct`, `num_codes`: CE and top-1 accuracy on the
code targets, end token excluded, over the rows the loss scores) come from the same logits as the loss.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapter import HybridHead, hf_model
from .data import IGNORE_INDEX
from .generate import logit_transform
from .vocab import VideoVocab

VIDEO_LOSSES = ("video_rows", "full")
TEXT_CHUNK = 256  # text-target positions per full-vocabulary chunk: 256 x 160k fp32 logits = 160 MB


def video_row_ids(vocab: VideoVocab) -> torch.Tensor:
    """The ids video targets are scored over, ascending: (K + 1,) int64, ``<|video_end|>`` then the K code ids."""
    return torch.tensor([vocab.video_end_id, *range(vocab.video_offset, vocab.vocab_size)])


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, L) -> the target of each position's logits (B, L): labels[:, t + 1], IGNORE_INDEX at the end."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


@dataclass
class LossTerms:
    """Sums over one micro-batch (the trainer divides `loss_sum` by the targets of the accumulated batch)."""

    loss_sum: torch.Tensor  # () fp32 with grad: cross-entropy summed over every target
    num_targets: torch.Tensor  # () int64: positions with a target (labels != -100 after the shift)
    code_loss_sum: torch.Tensor  # () fp32, detached: the part of loss_sum on code targets (end token excluded)
    code_correct: torch.Tensor  # () int64: code targets that are the argmax of the scored rows
    num_codes: torch.Tensor  # () int64: code targets

    def code_stats(self) -> torch.Tensor:
        """(3,) fp32 [code CE sum, correct, count]: adds up over micro-batches and ranks."""
        return torch.stack([self.code_loss_sum.float(), self.code_correct.float(), self.num_codes.float()])


@dataclass
class RowScoring:
    """What `score_rows` yields: the scored ids (R,) and the head's last input hidden (B, L, h) (None before)."""

    ids: torch.Tensor
    hidden: torch.Tensor | None = None


@contextlib.contextmanager
def score_rows(head: nn.Module, ids: torch.Tensor) -> Iterator[RowScoring]:
    """While active, `head` (the model's output embedding) returns logits (..., R) over `ids` (R,) only, and its
    input is recorded in the yielded `RowScoring`. A HybridHead computes only those rows (they must be new ids, in
    [base, vocab_size)); any other head computes all rows and keeps the asked columns (a forward hook)."""
    hybrid = isinstance(head, HybridHead)
    if hybrid:
        if int(ids.min()) < head.base or int(ids.max()) >= head.vocab_size:
            raise ValueError(f"HybridHead scores rows of the new ids [{head.base}, {head.vocab_size}) only")
        head.scored_rows = ids.to(head.fill.device)
    scoring = RowScoring(ids)

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        scoring.hidden = args[0]
        return None if hybrid else output.index_select(-1, ids.to(output.device))  # (..., R)

    handle = head.register_forward_hook(record)
    try:
        yield scoring
    finally:
        handle.remove()
        if hybrid:
            head.scored_rows = None


def _terms(logits: torch.Tensor, columns: torch.Tensor, is_code: torch.Tensor, num_targets: torch.Tensor
           ) -> LossTerms:
    """Terms of logits (B, L, C) for the column targets (B, L) in [0, C) or IGNORE_INDEX (not scored here);
    is_code (B, L) bool marks the code targets. Cross-entropy in fp32, like HF's ForCausalLMLoss."""
    ce = F.cross_entropy(logits.flatten(0, -2).float(), columns.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none")  # (B * L,), 0 where ignored
    correct = (logits.detach().argmax(-1) == columns) & is_code  # (B, L)
    return LossTerms(ce.sum(), num_targets, ce.detach()[is_code.flatten()].sum(), correct.sum(), is_code.sum())


class VideoLoss:
    """The loss terms of one micro-batch from one forward of the model (see the module docstring).

    Args:
        model: the trained model (peft-wrapped or not); its output embedding and config are read here.
        vocab: the id layout.
        mode: "video_rows" (video targets over the video rows) or "full" (every target over the full vocabulary).
        text_chunk: text-target positions per full-vocabulary chunk.
    """

    def __init__(self, model: nn.Module, vocab: VideoVocab, mode: str = "video_rows", text_chunk: int = TEXT_CHUNK):
        if mode not in VIDEO_LOSSES:
            raise ValueError(f"video_loss must be one of {VIDEO_LOSSES}, got {mode!r}")
        base = hf_model(model)
        self.head, self.transform = base.get_output_embeddings(), logit_transform(base.config)
        self.model_name = type(base).__name__
        self.vocab, self.mode, self.text_chunk = vocab, mode, int(text_chunk)
        self.row_ids = video_row_ids(vocab)  # (R,)
        self._transform_checked = False

    def __call__(self, model: nn.Module, inputs: Mapping[str, Any]) -> tuple[LossTerms, Any]:
        """Run `model(**inputs)` without its labels (the model computes no loss) and score `inputs["labels"]`
        (B, L). Returns the terms and the model's outputs (logits (B, L, R) with "video_rows", (B, L, V) else)."""
        labels = inputs["labels"]
        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        self.row_ids = self.row_ids.to(labels.device)  # once: a no-op after the first batch
        targets = shifted_targets(labels)  # (B, L)
        num_targets, is_code = (targets != IGNORE_INDEX).sum(), self.vocab.is_video_id(targets)
        if self.mode == "full":
            outputs = model(**forward_inputs)
            return _terms(outputs.logits, targets, is_code, num_targets), outputs
        with score_rows(self.head, self.row_ids) as scoring:
            outputs = model(**forward_inputs)
        ids = self.row_ids
        columns = torch.searchsorted(ids, targets.clamp_min(0)).clamp(max=len(ids) - 1)  # (B, L) in [0, R)
        in_rows = (targets != IGNORE_INDEX) & (ids[columns] == targets)  # (B, L)
        terms = _terms(outputs.logits, torch.where(in_rows, columns, IGNORE_INDEX), is_code, num_targets)
        text = (targets != IGNORE_INDEX) & ~in_rows  # (B, L)
        if bool(text.any()):
            if not self._transform_checked:
                self.check_transform(outputs.logits, scoring.hidden)
            terms.loss_sum = terms.loss_sum + self.text_loss_sum(scoring.hidden[text], targets[text])
        return terms, outputs

    # ---- text targets ---------------------------------------------------------------------------------------
    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., h) -> full-vocabulary logits (..., V) as the model's forward gives them (head + transform).
        Calls the head module, so ZeRO-3 gathers its parameters."""
        return self.transform(self.head(hidden))

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.text_logits(hidden).float(), targets, reduction="sum")

    def text_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary CE summed over text targets: hidden (M, h), targets (M,) ids; chunks of `text_chunk`
        positions, each recomputed in backward so that only one chunk's (c, V) logits live at a time."""
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(targets), self.text_chunk):
            part = (hidden[start:start + self.text_chunk], targets[start:start + self.text_chunk])  # (c, h), (c,)
            if torch.is_grad_enabled():
                total = total + checkpoint(self._chunk_loss, *part, use_reentrant=False)
            else:
                total = total + self._chunk_loss(*part)
        return total

    @torch.no_grad()
    def check_transform(self, row_logits: torch.Tensor, hidden: torch.Tensor, positions: int = 4) -> None:
        """RuntimeError unless the model's row logits (B, L, R) at the first `positions` equal `text_logits`'s
        transform of the head's rows there: the text chunks then see the logits the model's forward would give."""
        hidden = hidden[:1, :positions]  # (1, p, h)
        with score_rows(self.head, self.row_ids):
            mine = self.transform(self.head(hidden)).float()  # (1, p, R)
        theirs = row_logits[:1, :positions].detach().float()  # (1, p, R)
        rtol = 1e-4 if row_logits.dtype == torch.float32 else 2e-2  # products of other shapes round differently
        if (mine - theirs).abs().max() > rtol * max(1.0, float(theirs.abs().max())):
            raise RuntimeError(
                f"{self.model_name}: the model's forward transforms the head's logits in a way "
                "llm_adapters.generate.logit_transform does not reproduce, so text targets cannot be scored in "
                "chunks; add the transform there, or train with video_loss='full'")
        self._transform_checked = True


@dataclass
class RowScoringError:
    """Largest |difference| from the model's own full logits: of the row logits (`rows`) and of the chunked text
    path's logits (`text`); `scale` is the largest |full logit| (compare errors against a multiple of it)."""

    rows: float
    text: float
    scale: float


@torch.no_grad()
def row_scoring_error(model: nn.Module, vocab: VideoVocab, input_ids: torch.Tensor) -> RowScoringError:
    """Run the model on `input_ids` (B, L) plainly, under `score_rows`, and through the text path; return how far
    the narrow paths are from the plain logits. Works for any model VideoLoss accepts; put it in eval mode first."""
    loss = VideoLoss(model, vocab)
    full = model(input_ids=input_ids).logits.float()  # (B, L, V)
    with score_rows(loss.head, loss.row_ids) as scoring:
        rows = model(input_ids=input_ids).logits.float()  # (B, L, R)
    text = loss.text_logits(scoring.hidden).float()  # (B, L, V)
    ids = loss.row_ids.to(full.device)
    return RowScoringError(rows=float((rows - full[..., ids]).abs().max()), text=float((text - full).abs().max()),
                           scale=float(full.abs().max()))
