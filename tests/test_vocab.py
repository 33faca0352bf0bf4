"""VideoVocab id layout, token strings, video_vocab.json, and the prompt builder."""
from __future__ import annotations

import json

import pytest
import torch
from llm_fixtures import sentencepiece_tokenizer

from llm_adapters.prompts import PLAIN_TEMPLATE, build_prompt_ids, class_name_to_text
from llm_adapters.vocab import (
    VIDEO_END,
    VIDEO_START,
    VIDEO_UNCOND,
    VOCAB_FILE,
    VideoVocab,
    code_token,
)

HASH = "ab" * 32


def extended(extra_rows: int = 0, codebook_size: int = 256, num_video_tokens: int = 32, pad: int | None = 64):
    tokenizer = sentencepiece_tokenizer()
    vocab = VideoVocab.extend_tokenizer(tokenizer, len(tokenizer) + extra_rows, codebook_size, num_video_tokens,
                                        HASH, "larp-tiny", pad_to_multiple_of=pad)
    return tokenizer, vocab


def test_layout_and_every_code_round_trips():
    vocab = VideoVocab(base=1000, codebook_size=300, num_video_tokens=10, codebook_hash=HASH)
    assert (vocab.video_start_id, vocab.video_end_id, vocab.video_uncond_id) == (1000, 1001, 1002)
    assert vocab.video_offset == 1003 and vocab.vocab_size == 1303 and vocab.embedding_size == 1303
    assert vocab.new_ids == list(range(1000, 1303)) and vocab.unused_id_ranges() == []
    codes = torch.arange(300).reshape(30, 10)  # every code once
    ids = vocab.codes_to_ids(codes)
    assert ids.dtype == torch.int64 and ids.unique().numel() == 300
    assert ids.min() == vocab.video_offset and ids.max() == vocab.vocab_size - 1
    assert vocab.is_video_id(ids).all() and not vocab.is_video_id(torch.tensor(vocab.control_ids)).any()
    assert torch.equal(vocab.ids_to_codes(ids), codes)
    assert vocab.codes_to_ids([5] * 10).tolist() == [1008] * 10  # lists work too


@pytest.mark.parametrize("bad", [[-1] + [0] * 9, [300] + [0] * 9, [0] * 9, [[0] * 11]])
def test_codes_to_ids_checks_range_and_length(bad):
    vocab = VideoVocab(base=1000, codebook_size=300, num_video_tokens=10, codebook_hash=HASH)
    with pytest.raises(ValueError):
        vocab.codes_to_ids(bad)


@pytest.mark.parametrize("bad", [[1002] + [1003] * 9, [1303] + [1003] * 9, [1003] * 11, [0] * 10])
def test_ids_to_codes_checks_range_and_length(bad):
    vocab = VideoVocab(base=1000, codebook_size=300, num_video_tokens=10, codebook_hash=HASH)
    with pytest.raises(ValueError):
        vocab.ids_to_codes(bad)
    assert vocab.ids_to_codes([1003, 1302], check_length=False).tolist() == [0, 299]


@pytest.mark.parametrize("extra_rows", [0, 37])
def test_tokenizer_ids_equal_layout_ids(extra_rows):
    tokenizer, vocab = extended(extra_rows)
    text_size = vocab.text_vocab_size
    assert vocab.base == text_size + extra_rows  # Qwen-style padded rows are never reused
    assert len(tokenizer) == vocab.vocab_size
    assert tokenizer.convert_tokens_to_ids([VIDEO_START, VIDEO_END, VIDEO_UNCOND]) == vocab.control_ids
    strings = [code_token(k) for k in range(vocab.codebook_size)]
    assert tokenizer.convert_tokens_to_ids(strings) == list(range(vocab.video_offset, vocab.vocab_size))
    assert vocab.embedding_size % 64 == 0 and vocab.embedding_size >= vocab.vocab_size
    unused = [(text_size, vocab.base)] if extra_rows else []
    if vocab.embedding_size > vocab.vocab_size:
        unused.append((vocab.vocab_size, vocab.embedding_size))
    assert vocab.unused_id_ranges() == unused


def test_token_strings_never_split():
    tokenizer, vocab = extended(extra_rows=5)
    codes = torch.tensor([0, 17, 17, 255, 128, 3])
    ids = vocab.codes_to_ids(codes, check_length=False).tolist()
    text = "the cat" + VIDEO_START + "".join(code_token(int(c)) for c in codes) + VIDEO_END + "walks" + VIDEO_UNCOND
    got = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert got[got.index(vocab.video_start_id) + 1: got.index(vocab.video_end_id)] == ids
    assert got[-1] == vocab.video_uncond_id and got.count(vocab.video_start_id) == 1
    for s in vocab.token_strings():  # every string alone is one id, also after a space and inside words
        assert tokenizer(s, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(s)]
    assert tokenizer.decode(ids) == "".join(code_token(int(c)) for c in codes)
    inside = tokenizer(" x" + code_token(9) + "y ", add_special_tokens=False)["input_ids"]
    assert inside.count(vocab.video_offset + 9) == 1


def test_layout_survives_save_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tokenizer, vocab = extended(extra_rows=37)
    vocab.save(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again = VideoVocab.load(tmp_path)
    assert again == vocab
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    again.check_tokenizer(reloaded)  # every filler/control/code string keeps its id
    text = VIDEO_START + code_token(3) + code_token(200) + VIDEO_END
    want = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reloaded(text, add_special_tokens=False)["input_ids"] == want
    record = json.loads((tmp_path / VOCAB_FILE).read_text())
    assert record["video_offset"] == vocab.video_offset and record["codebook_hash"] == HASH
    assert record["larp_checkpoint"] == "larp-tiny" and record["template_version"] == vocab.template_version


def test_bad_files_and_tokenizers_fail_clearly(tmp_path):
    tokenizer, vocab = extended()
    with pytest.raises(FileNotFoundError, match=VOCAB_FILE):
        VideoVocab.load(tmp_path)
    vocab.save(tmp_path)
    record = json.loads((tmp_path / VOCAB_FILE).read_text())
    record["video_offset"] += 1
    (tmp_path / VOCAB_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="video_offset"):
        VideoVocab.load(tmp_path)
    with pytest.raises(ValueError, match="already holds video tokens"):
        VideoVocab.extend_tokenizer(tokenizer, len(tokenizer), 256, 32, HASH)
    with pytest.raises(ValueError, match="does not match"):
        vocab.check_tokenizer(sentencepiece_tokenizer())


def test_smollm2_tokenizer_takes_a_full_size_codebook():
    """The real SmolLM2 tokenizer (from the shipped GGUF) with LARP-L's 8192 codes: one id per code."""
    from transformers import AutoTokenizer

    from larp_mllm.assets import smollm2_gguf

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    vocab = VideoVocab.extend_tokenizer(tokenizer, 49152, 8192, 1024, HASH)
    assert vocab.base == 49152 and vocab.video_offset == 49155 and vocab.embedding_size == 57408
    codes = torch.randint(0, 8192, (1024,), generator=torch.Generator().manual_seed(0))
    text = VIDEO_START + "".join(code_token(int(c)) for c in codes) + VIDEO_END
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [vocab.video_start_id] + vocab.codes_to_ids(codes).tolist() + [vocab.video_end_id]
    assert torch.equal(vocab.ids_to_codes(ids[1:-1]), codes)


# ---- prompts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,text", [
    ("ApplyEyeMakeup", "apply eye makeup"), ("YoYo", "yo yo"), ("air_drumming", "air drumming"),
    ("PlayingDaf", "playing daf"), ("UCFClip", "ucf clip"), ("riding a bike", "riding a bike"),
])
def test_class_name_to_text(name, text):
    assert class_name_to_text(name) == text


def test_build_prompt_ids_uses_the_chat_template():
    tokenizer, vocab = extended()
    ids = build_prompt_ids(tokenizer, vocab, "apply eye makeup")
    assert ids[-1] == vocab.video_start_id and ids.count(vocab.video_start_id) == 1
    assert ids[0] == tokenizer.bos_token_id  # the template's bos, added once
    rendered = tokenizer.decode(ids[:-1])
    assert "user\napply eye makeup" in rendered and rendered.rstrip().endswith("assistant")
    assert ids == build_prompt_ids(tokenizer, vocab, "apply eye makeup")  # pure: same input, same ids
    uncond = build_prompt_ids(tokenizer, vocab, None)
    assert uncond.count(vocab.video_uncond_id) == 1 and uncond[-1] == vocab.video_start_id
    assert vocab.video_uncond_id not in ids


def test_build_prompt_ids_without_chat_template():
    tokenizer, vocab = extended()
    tokenizer.chat_template = None
    ids = build_prompt_ids(tokenizer, vocab, "juggling balls")
    expected = tokenizer(PLAIN_TEMPLATE.format(text="juggling balls"))["input_ids"] + [vocab.video_start_id]
    assert ids == expected and ids[0] == tokenizer.bos_token_id
