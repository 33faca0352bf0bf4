"""One LoRA for all tasks: the mixed examples (continuation, video-to-text, text), and a tiny LLM that learns them."""
from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pytest
import torch

from larp_mllm.data.codes import CodeSet
from llm_adapters.data import IGNORE_INDEX, VideoCollator
from llm_adapters.prompts import PromptEncoder, VideoSegment
from llm_adapters.tasks import (CAPTION_QUESTIONS, CONTINUE_INSTRUCTION, MixedTaskDataset, TaskMix, TextRow,
                                continuation_prompt, load_text_rows, question_prompt)

from llm_fixtures import tiny_llm

pytestmark = pytest.mark.timeout(300)

# A toy code space with the structure of the synthetic set: 8 codes per clip from 32.
# clip = [colour, 4 + shape, 7 + direction, 10 + p, 10 + p +- 1, ..., 10 + p +- 4]  (a track that moves by one
# code per step, up for "right", down for "left"); its condition clip keeps the first 5 codes and repeats the 5th
# (the first 5 frames, the 5th repeated to the clip length).
COLORS, SHAPES, DIRECTIONS = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle"), ("right", "left")
N, K = 8, 32


class ToyCodebook:
    """The code space `extend_llm` reads from a LARP tokenizer: a seeded (K, 8) codebook."""

    num_tokens, codebook_size = N, K

    def __init__(self):
        self._codebook = torch.randn(K, 8, generator=torch.Generator().manual_seed(0))

    def codebook(self) -> torch.Tensor:
        return self._codebook

    def codebook_hash(self) -> str:
        return hashlib.sha256(self._codebook.numpy().tobytes()).hexdigest()


def toy_clip(color: int, shape: int, direction: int, start: int) -> tuple[list[int], list[int]]:
    step = 1 if direction == 0 else -1
    clip = [color, 4 + shape, 7 + direction] + [10 + start + step * k for k in range(5)]
    return clip, clip[:5] + [clip[4]] * 3


def toy_code_set(rows: list[tuple[int, int, int, int]], codebook_hash: str) -> CodeSet:
    clips, conds = zip(*(toy_clip(*r) for r in rows))
    captions = [f"a {COLORS[c]} {SHAPES[s]} moving {DIRECTIONS[d]}" for c, s, d, _ in rows]
    m = len(rows)
    code_set = CodeSet(codes=torch.tensor(clips), labels=torch.full((m,), -1), captions=captions, class_names=[],
                       video_index=torch.arange(m), chunk=torch.zeros(m, dtype=torch.long),
                       codebook_hash=codebook_hash, num_tokens=N, codebook_size=K)
    code_set.cond_codes = torch.tensor(conds)  # (M, N)
    return code_set


def toy_rows(seed: int = 0) -> tuple[list, list]:
    """(train, held-out) rows: every (colour, shape, direction, start) with start in 4..12; 20% held out."""
    rows = list(itertools.product(range(4), range(3), range(2), range(4, 13)))
    order = np.random.default_rng(seed).permutation(len(rows))
    held = int(0.2 * len(rows))
    return [rows[i] for i in order[held:]], [rows[i] for i in order[:held]]


@pytest.fixture(scope="module")
def toy_llm():
    from llm_adapters.model import extend_llm

    model, tokenizer = tiny_llm("llama")
    return extend_llm(model, tokenizer, ToyCodebook(), lora=None)


def test_examples_of_every_task(toy_llm, tmp_path):
    vocab, tokenizer = toy_llm.vocab, toy_llm.tokenizer
    train, _ = toy_rows()
    codes = toy_code_set(train[:40], vocab.codebook_hash)
    text_file = tmp_path / "text.jsonl"
    text_file.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n\n"
                         + json.dumps({"prompt": "Say hi.", "response": "Hi!"}) + "\n")
    mix = TaskMix(text_to_video=1, continuation=1, video_to_text=1, text=1)
    ds = MixedTaskDataset(codes, tokenizer, vocab, mix, text_rows=load_text_rows(text_file), prompt_source="caption",
                          seed=3)
    encode = PromptEncoder(tokenizer, vocab)
    seen = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ex = ds[i]
            seen.add(ex.task)
            ids, labels = ex.input_ids.tolist(), ex.labels.tolist()
            first = next(j for j, y in enumerate(labels) if y != IGNORE_INDEX)  # the answer starts here
            target = [y for y in labels if y != IGNORE_INDEX]
            assert labels[first:first + len(target)] == ids[first:first + len(target)] == target  # one span
            if ex.task == "continuation":
                assert encode.parse(ids[:first]) == continuation_prompt(codes.cond_codes[i])
                assert target == vocab.codes_to_ids(codes.codes[i]).tolist() + [vocab.video_end_id]
            elif ex.task == "video_to_text":
                parts = encode.parse(ids[:first])
                assert parts[0] == VideoSegment(codes.codes[i]) and parts[1] in CAPTION_QUESTIONS
                assert tokenizer.decode(target[:-1]) == codes.captions[i] and target[-1] == tokenizer.eos_token_id
            elif ex.task == "text":
                assert all(t < vocab.text_vocab_size for t in target)
            else:
                assert ids[first - 1] == vocab.video_start_id and target[-1] == vocab.video_end_id
            again = ds[i]
            assert torch.equal(again.input_ids, ex.input_ids) and again.task == ex.task  # pure in (seed, epoch, i)
    assert seen == {"text_to_video", "continuation", "video_to_text", "text"}
    counts = {t: 0 for t in seen}
    for i in range(len(ds)):
        counts[ds.task_of(i, epoch=7)[0]] += 1
    assert min(counts.values()) >= 3  # equal shares over 40 rows
    assert ds.max_sequence_length >= max(len(ds[i].input_ids) for i in range(len(ds)))
    batch = VideoCollator(pad_id=0)([ds[i] for i in range(8)])
    assert batch["input_ids"].shape == batch["labels"].shape


def test_bad_task_setups_fail_clearly(toy_llm, tmp_path):
    vocab, tokenizer = toy_llm.vocab, toy_llm.tokenizer
    codes = toy_code_set(toy_rows()[0][:10], vocab.codebook_hash)
    codes.cond_codes = None
    with pytest.raises(ValueError, match="--condition-frames"):
        MixedTaskDataset(codes, tokenizer, vocab, TaskMix(continuation=1.0), prompt_source="caption")
    with pytest.raises(ValueError, match="no text rows"):
        MixedTaskDataset(codes, tokenizer, vocab, TaskMix(text=0.5), prompt_source="caption")
    with pytest.raises(ValueError, match="context holds 20"):
        MixedTaskDataset(codes, tokenizer, vocab, TaskMix(video_to_text=1), prompt_source="caption", max_length=20)
    with pytest.raises(ValueError, match="positive sum"):
        TaskMix(text_to_video=0)
    with pytest.raises(ValueError, match=">= 0"):
        TaskMix(continuation=-1)
    with pytest.raises(FileNotFoundError, match="JSONL"):
        load_text_rows(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_text_rows(tmp_path / "bad.jsonl")
    assert load_text_rows(_write(tmp_path / "ok.jsonl", {"prompt": "a", "response": "b"})) == [TextRow("b", "a")]


def _write(path, row):
    path.write_text(json.dumps(row) + "\n")
    return path


def test_a_tiny_llm_learns_continuation_and_captioning(toy_llm, one_thread):
    """Trained on 80% of the toy clips (both tasks mixed, the trainer's loss), greedy answers on the held-out 20%
    (unseen colour / shape / direction / start combinations): >= 90% exactly right."""
    from llm_adapters.answers import continue_video_codes, generate_text
    from llm_adapters.loss import VideoLoss

    vocab, tokenizer, model = toy_llm.vocab, toy_llm.tokenizer, toy_llm.model
    train, held = toy_rows()
    codes = toy_code_set(train, vocab.codebook_hash)
    ds = MixedTaskDataset(codes, tokenizer, vocab, TaskMix(text_to_video=0, continuation=1, video_to_text=1),
                          prompt_source="caption", seed=0)
    for p in model.parameters():
        p.requires_grad_(True)  # a tiny random model: train it all
    loss_fn = VideoLoss(model, vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    collate = VideoCollator(pad_id=0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    steps = 500
    for step in range(steps):
        ds.set_epoch(step)
        rows = torch.randint(0, len(ds), (32,), generator=gen).tolist()
        batch = collate([ds[i] for i in rows])
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / steps))
        terms, _ = loss_fn(model, batch)
        optimizer.zero_grad()
        (terms.loss_sum / terms.num_targets).backward()
        optimizer.step()
    model.eval()

    test = toy_code_set(held, vocab.codebook_hash)
    predicted = continue_video_codes(toy_llm, test.cond_codes, temperature=0.0, progress=False)
    continued = (predicted == test.codes).all(1).float().mean().item()
    answers = generate_text(toy_llm, [question_prompt(c, CAPTION_QUESTIONS[1]) for c in test.codes],
                            max_new_tokens=40, progress=False)
    captioned = np.mean([a == c for a, c in zip(answers, test.captions)])
    assert continued >= 0.9, (continued, predicted[:3], test.codes[:3])
    assert captioned >= 0.9, (captioned, answers[:5])
    # continuation is sampled without CFG
    with pytest.raises(ValueError, match="cfg_scale to 1"):
        from llm_adapters.generate import generate_video_codes

        generate_video_codes(toy_llm, [continuation_prompt(test.cond_codes[0])], cfg_scale=1.5, progress=False)


def test_text_perplexity_is_the_models_own_nll(one_thread):
    """text_perplexity = exp(mean NLL of the next tokens) from the model's logits; extending leaves it unchanged over
    the text rows (the video rows take probability mass from them over the full vocabulary)."""
    from llm_adapters.answers import text_perplexity
    from llm_adapters.model import extend_llm

    model, tokenizer = tiny_llm("llama")
    texts = ["The quick brown fox jumps over the lazy dog.", "Lists are mutable sequences.", "x = 1"]
    want_nll, want_n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tokenizer(t)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            want_nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            want_n += ids.shape[1] - 1
    base = text_perplexity(model, tokenizer, texts, batch_size=2, progress=False)  # padded batches
    assert base == pytest.approx(float(np.exp(want_nll / want_n)), rel=1e-5)
    video_llm = extend_llm(model, tokenizer, ToyCodebook(), lora=dict(r=4, lora_alpha=8, lora_dropout=0.0))
    text_rows = video_llm.vocab.text_vocab_size
    extended = text_perplexity(video_llm.model, video_llm.tokenizer, texts, text_vocab_size=text_rows, progress=False)
    assert extended == pytest.approx(base, rel=1e-5)
    assert text_perplexity(video_llm.model, video_llm.tokenizer, texts, progress=False) > base * (1 + 1e-4)
    with pytest.raises(ValueError, match="two or more tokens"):
        text_perplexity(model, tokenizer, [""], progress=False)
