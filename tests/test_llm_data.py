"""Examples for the LLM stage from code shards: formatting, label masking, seeded dropout/flips, padding, checks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from larp_mllm.data.codes import CodeManifest, CodeShardWriter, ShardData, VideoEntry, load_code_shards
from llm_adapters.data import IGNORE_INDEX, VideoCodeDataset, VideoCollator, example_texts, pad_token_id
from llm_adapters.prompts import build_prompt_ids
from llm_adapters.vocab import VideoVocab

CLASS_NAMES = ["ApplyEyeMakeup", "BoxingPunchingBag", "JumpRope", "YoYo"]


def write_code_dir(folder: Path, codes: torch.Tensor, labels: list[int], codebook_hash: str, codebook_size: int,
                   class_names: list[str] = CLASS_NAMES, captions: list[str] | None = None,
                   flip_codes: torch.Tensor | None = None, shard_size: int = 8) -> Path:
    """A code folder (shards + manifest) written with larp_mllm.data.codes' writer; one video per example."""
    m, n = codes.shape
    captions = captions or [""] * m
    num_shards = max(1, -(-m // shard_size))
    writer = CodeShardWriter(folder, "test-run", num_shards, codebook_hash, n, codebook_size)
    for s in range(num_shards):
        lo, hi = s * shard_size, min(m, (s + 1) * shard_size)
        idx = torch.arange(lo, hi)
        writer.write(s, lo, hi, ShardData(codes[lo:hi], torch.tensor(labels[lo:hi]), idx, torch.zeros_like(idx),
                                          None if flip_codes is None else flip_codes[lo:hi]), 0)
    videos = [VideoEntry(f"v{i}.mp4", labels[i], class_names[labels[i]] if labels[i] >= 0 else "", captions[i])
              for i in range(m)]
    manifest = CodeManifest("test-run", codebook_hash, n, codebook_size, "test-larp", "test", "chunks", 8, 32, 0,
                            flip_codes is not None, shard_size, m, 0, list(class_names), videos)
    writer.finalize(manifest)
    return folder


@pytest.fixture(scope="module")
def extended():
    """(tokenizer, vocab) of a tiny SentencePiece tokenizer extended with 64 codes, 8 tokens per video."""
    from llm_fixtures import sentencepiece_tokenizer

    tokenizer = sentencepiece_tokenizer()
    vocab = VideoVocab.extend_tokenizer(tokenizer, len(tokenizer), 64, 8, "hash-a")
    return tokenizer, vocab


def make_codes(tmp_path: Path, vocab: VideoVocab, m: int = 12, flip: bool = False, captions: bool = False,
               codebook_hash: str | None = None):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, vocab.codebook_size, (m, vocab.num_video_tokens), generator=gen)
    flips = (vocab.codebook_size - 1 - codes) if flip else None
    caps = [f"a person doing thing number {i}" for i in range(m)] if captions else None
    write_code_dir(tmp_path / "codes", codes, [i % 4 for i in range(m)], codebook_hash or vocab.codebook_hash,
                   vocab.codebook_size, captions=caps, flip_codes=flips)
    return load_code_shards(tmp_path / "codes"), codes


def test_example_layout_and_labels(tmp_path, extended):
    tokenizer, vocab = extended
    codeset, codes = make_codes(tmp_path, vocab)
    ds = VideoCodeDataset(codeset, tokenizer, vocab, cond_dropout=0.0, flip_prob=0.0)
    assert len(ds) == 12
    for i in (0, 5):
        ex = ds[i]
        prompt = build_prompt_ids(tokenizer, vocab, ["apply eye makeup", "boxing punching bag", "jump rope",
                                                     "yo yo"][i % 4])
        n = vocab.num_video_tokens
        assert ex.input_ids.tolist() == (prompt + vocab.codes_to_ids(codes[i]).tolist()
                                         + [vocab.video_end_id, tokenizer.eos_token_id])
        assert ex.input_ids[len(prompt) - 1] == vocab.video_start_id
        # labels: -100 on the prompt (incl. <|video_start|>) and the eos; the codes and <|video_end|> are targets
        assert (ex.labels[:len(prompt)] == IGNORE_INDEX).all() and ex.labels[-1] == IGNORE_INDEX
        assert ex.labels[len(prompt):len(prompt) + n + 1].tolist() == ex.input_ids[len(prompt):len(prompt) + n + 1].tolist()
        assert int((ex.labels != IGNORE_INDEX).sum()) == n + 1
        assert ex.conditional and not ex.flipped
    assert "apply eye makeup" in tokenizer.decode(ds[0].input_ids)
    no_eos = VideoCodeDataset(codeset, tokenizer, vocab, cond_dropout=0.0, add_eos=False)[0]
    assert no_eos.input_ids[-1] == vocab.video_end_id and no_eos.labels[-1] == vocab.video_end_id


def test_caption_prompts(tmp_path, extended):
    tokenizer, vocab = extended
    codeset, _ = make_codes(tmp_path, vocab, captions=True)
    assert example_texts(codeset, "caption")[3] == "a person doing thing number 3"
    ex = VideoCodeDataset(codeset, tokenizer, vocab, prompt_source="caption", cond_dropout=0.0)[3]
    assert ex.input_ids[:-vocab.num_video_tokens - 2].tolist() == build_prompt_ids(
        tokenizer, vocab, "a person doing thing number 3")
    with pytest.raises(ValueError, match="prompt_source must be one of"):
        example_texts(codeset, "label")


def test_condition_dropout_is_seeded_per_example_and_epoch(tmp_path, extended):
    tokenizer, vocab = extended
    codeset, _ = make_codes(tmp_path, vocab, m=400)
    ds = VideoCodeDataset(codeset, tokenizer, vocab, cond_dropout=0.1, seed=3)
    uncond = build_prompt_ids(tokenizer, vocab, None)
    dropped = [not ds.draws(i)[0] for i in range(len(ds))]
    assert 0.05 < sum(dropped) / len(ds) < 0.16  # ~10%
    i = dropped.index(True)
    ex = ds[i]
    assert not ex.conditional and ex.input_ids[:len(uncond)].tolist() == uncond
    assert ex.labels[len(uncond):len(uncond) + vocab.num_video_tokens].tolist() == \
        vocab.codes_to_ids(codeset.codes[i]).tolist()  # the video target is unchanged
    # deterministic: same (seed, epoch, index) -> same draw, a fresh dataset agrees; another epoch differs
    again = VideoCodeDataset(codeset, tokenizer, vocab, cond_dropout=0.1, seed=3)
    assert [not again.draws(j)[0] for j in range(len(ds))] == dropped
    ds.set_epoch(1)
    assert [not ds.draws(j)[0] for j in range(len(ds))] != dropped
    assert all(VideoCodeDataset(codeset, tokenizer, vocab, cond_dropout=0.0).draws(j)[0] for j in range(50))


def test_flip_twins(tmp_path, extended):
    tokenizer, vocab = extended
    codeset, codes = make_codes(tmp_path, vocab, m=40, flip=True)
    ds = VideoCodeDataset(codeset, tokenizer, vocab, cond_dropout=0.0, flip_prob=0.5)
    flipped = [ds[i].flipped for i in range(len(ds))]
    assert 0 < sum(flipped) < len(ds)
    i = flipped.index(True)
    n = vocab.num_video_tokens
    assert ds[i].input_ids[-n - 2:-2].tolist() == vocab.codes_to_ids(vocab.codebook_size - 1 - codes[i]).tolist()
    # without flip codes in the shards, flip_prob has no effect
    plain, _ = make_codes(tmp_path / "plain", vocab, m=40)
    assert not any(VideoCodeDataset(plain, tokenizer, vocab, flip_prob=1.0)[j].flipped for j in range(40))


def test_collator_pads_right(tmp_path, extended):
    tokenizer, vocab = extended
    codeset, _ = make_codes(tmp_path, vocab, captions=True)
    ds = VideoCodeDataset(codeset, tokenizer, vocab, prompt_source="caption", cond_dropout=0.0)
    short = VideoCodeDataset(codeset, tokenizer, vocab, cond_dropout=0.0)[0]
    long = ds[11]
    assert len(long.input_ids) > len(short.input_ids)
    pad = pad_token_id(tokenizer)
    batch = VideoCollator(pad, pad_to_multiple_of=8)([short, long])
    length = batch["input_ids"].shape[1]
    assert length % 8 == 0 and length >= len(long.input_ids)
    n = len(short.input_ids)
    assert batch["input_ids"][0, :n].tolist() == short.input_ids.tolist()
    assert (batch["input_ids"][0, n:] == pad).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and batch["attention_mask"][0, :n].all()
    assert batch["labels"][1, :len(long.labels)].tolist() == long.labels.tolist()


def test_clear_errors_before_training(tmp_path, extended):
    tokenizer, vocab = extended
    codeset, _ = make_codes(tmp_path, vocab)
    with pytest.raises(ValueError, match=r"longest example is \d+ tokens.*context holds 20 positions"):
        VideoCodeDataset(codeset, tokenizer, vocab, max_length=20)
    other, _ = make_codes(tmp_path / "other", vocab, codebook_hash="hash-b")
    with pytest.raises(ValueError, match="codebook mismatch.*hash-b.*hash-a"):
        VideoCodeDataset(other, tokenizer, vocab)
    empty = write_code_dir(tmp_path / "empty", torch.zeros(0, vocab.num_video_tokens, dtype=torch.long), [],
                           vocab.codebook_hash, vocab.codebook_size)
    with pytest.raises(ValueError, match="hold no examples"):
        VideoCodeDataset(load_code_shards(empty), tokenizer, vocab)
    with pytest.raises(ValueError, match="have no caption"):
        VideoCodeDataset(codeset, tokenizer, vocab, prompt_source="caption")
    wrong_n = VideoVocab(vocab.base, vocab.codebook_size, 16, vocab.codebook_hash,
                         text_vocab_size=vocab.text_vocab_size)
    with pytest.raises(ValueError, match="8 tokens per video.*expects 16 tokens"):
        VideoCodeDataset(codeset, tokenizer, wrong_n)
