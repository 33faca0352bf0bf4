"""Answers to prompts with videos in them: text (captions, questions) and continued clips.

    from llm_adapters.answers import generate_text, continue_video_codes
    generate_text(video_llm, [question_prompt(codes, "What is moving, and where to?")])  # -> ["a red circle ..."]
    continue_video_codes(video_llm, condition_codes, seed=0)                            # (B, N) codes of whole clips

Text answers use the model's own ``generate`` (KV cache, left padding) with every video / control / filler id
suppressed, so the answer is text; greedy by default (temperature 0), one answer per prompt, stopping at the
tokenizer's eos. Continuation is `generate_video_codes` on `tasks.continuation_prompt` rows, without CFG (the
reference asserts ``cfg_scale == 1`` for frame prediction); samples follow that function's seeding rules.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .adapter import hf_model
from .generate import generate_video_codes, pack_prompts
from .prompts import Part, PromptEncoder
from .tasks import continuation_prompt


@torch.no_grad()
def generate_text(video_llm: Any, prompts: Sequence[str | Sequence[Part]], max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                  progress: bool = True) -> list[str]:
    """One text answer per prompt (a text, or a user turn of texts and `VideoSegment`s).

    Args:
        max_new_tokens: the longest answer in tokens. temperature: 0 = greedy; > 0 samples (torch seeded with
            `seed` before each batch, so the answers depend on the batching).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    model, tokenizer, vocab = video_llm.model, video_llm.tokenizer, video_llm.vocab
    if tokenizer.eos_token_id is None:
        raise ValueError("text answers stop at the tokenizer's eos, and this tokenizer has none")
    encode = PromptEncoder(tokenizer, vocab)
    rows = [encode.turn_ids(p) for p in prompts]
    device = next(model.parameters()).device
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    suppress = list(range(vocab.text_vocab_size, vocab.embedding_size))  # video, control, filler and padding ids
    sampling = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p)) if temperature > 0 else \
        dict(do_sample=False)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="writing text answers", disable=not progress):
            chunk = rows[start:start + batch_size]
            batch = pack_prompts(chunk, pad_id, device)
            if temperature > 0:
                torch.manual_seed(seed + start)
            out = hf_model(model).generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=int(max_new_tokens),
                suppress_tokens=suppress, eos_token_id=int(tokenizer.eos_token_id), pad_token_id=int(pad_id),
                **sampling)  # (B, L + new) ids
            for row in out[:, batch.input_ids.shape[1]:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers


def continue_video_codes(video_llm: Any, condition_codes: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, seed: int = 0, batch_size: int = 32, fast: Any = "auto",
                         progress: bool = True) -> torch.Tensor:
    """Codes of whole clips (B, N) from the codes of their condition clips (B, N) (`larp_mllm.data.continuation`)."""
    condition_codes = torch.as_tensor(condition_codes)
    if condition_codes.dim() != 2:
        raise ValueError(f"condition_codes must be (B, N) codes, got shape {tuple(condition_codes.shape)}")
    prompts = [continuation_prompt(c) for c in condition_codes]
    return generate_video_codes(video_llm, prompts, cfg_scale=1.0, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, batch_size=batch_size, fast=fast, progress=progress)


@torch.no_grad()
def text_perplexity(model: Any, tokenizer: Any, texts: Sequence[str], max_tokens: int = 256, batch_size: int = 8,
                    text_vocab_size: int | None = None, progress: bool = True) -> float:
    """exp(mean next-token NLL) of `model` over plain `texts` (each cut to `max_tokens`, with the tokenizer's usual
    special tokens), every token of every text weighted equally.

    `model`: any HF causal LM, or a VideoLLM's model. `text_vocab_size`: normalise over the first rows only (give
    ``vocab.text_vocab_size`` for an extended model: its text answers are drawn from the text rows, as
    `generate_text` does, and its text logits are then the base model's until training moves LoRA).
    """
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_tokens] for t in texts]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError("text_perplexity needs at least one text of two or more tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="text perplexity", disable=not progress):
            chunk = rows[start:start + batch_size]
            length = max(len(r) for r in chunk)
            ids = torch.zeros(len(chunk), length, dtype=torch.long)  # (B, L) right-padded
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[..., :text_vocab_size].float()  # (B, L, V)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            keep = mask[:, 1:].bool()  # (B, L - 1) real next tokens
            total += float(nll[keep].sum())
            count += int(keep.sum())
    finally:
        model.train(was_training)
    return float(torch.exp(torch.tensor(total / count)))
