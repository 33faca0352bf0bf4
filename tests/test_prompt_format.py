"""The prompt format with videos in the user turn (template version 2): build -> parse round trips, text stays text."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from llm_adapters.prompts import PLAIN_TEMPLATE, PromptEncoder, VideoSegment
from llm_adapters.vocab import VideoVocab

from llm_fixtures import sentencepiece_tokenizer, smollm2_dir

pytestmark = pytest.mark.timeout(120)
HASH = "0" * 64


def extend(tokenizer, num_video_tokens: int = 8, codebook_size: int = 64):
    vocab = VideoVocab.extend_tokenizer(tokenizer, len(tokenizer), codebook_size, num_video_tokens, HASH, "t")
    return tokenizer, vocab


@functools.lru_cache(maxsize=None)
def extended(name: str):
    """(tokenizer, vocab) of one of the test tokenizers, extended once per session (8 tokens of 64 codes)."""
    from transformers import AutoTokenizer

    if name == "smollm2":
        return extend(AutoTokenizer.from_pretrained(smollm2_dir()))
    tokenizer = sentencepiece_tokenizer()
    if name == "sentencepiece-plain":
        tokenizer.chat_template = None
    return extend(tokenizer)


def segment(seed: int, n: int = 8, k: int = 64) -> VideoSegment:
    return VideoSegment(torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed)))


PART_LISTS = [
    [segment(0), "What is moving, and where to?"],
    ["Continue this video:\n", segment(1)],
    [segment(2), "\nand then\n", segment(3), "Which one is red?"],
    [segment(4)],
    ["a text with <|video_start|> and <|im_end|> and </s> inside:", segment(5)],
]


@pytest.mark.parametrize("name", ["sentencepiece-chat", "sentencepiece-plain", "smollm2"])
def test_turns_with_videos_round_trip(name):
    tokenizer, vocab = extended(name)
    encode = PromptEncoder(tokenizer, vocab)
    for parts in PART_LISTS:
        turn = encode.turn_ids(parts)
        assert encode.parse(turn) == parts
        video_prompt = encode(parts)
        assert video_prompt == turn + [vocab.video_start_id] and encode.parse(video_prompt) == parts
        # the only video control ids are the segments' own: one start / end pair per segment (+ the answer's start)
        segments = sum(isinstance(p, VideoSegment) for p in parts)
        assert turn.count(vocab.video_start_id) == segments == turn.count(vocab.video_end_id)
        codes = [i for i in turn if i >= vocab.video_offset]
        assert len(codes) == segments * vocab.num_video_tokens
        # the text around the user content is the template's: the same frame as a text-only prompt
        text_only = encode.turn_ids("X")
        assert turn[:3] == text_only[:3] and turn[-2:] == text_only[-2:]


@pytest.mark.parametrize("name", ["sentencepiece-chat", "sentencepiece-plain", "smollm2"])
def test_text_only_turns_keep_the_version_1_ids(name):
    tokenizer, vocab = extended(name)
    encode = PromptEncoder(tokenizer, vocab)
    text = "a red circle moving right over a plain background"
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        v1 = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        v1 = tokenizer(PLAIN_TEMPLATE.format(text=text))["input_ids"]
    assert encode.turn_ids(text) == encode.turn_ids(["a red circle ", "moving right over a plain background"]) == v1
    assert encode(text) == v1 + [vocab.video_start_id]
    assert encode.parse(encode(text)) == [text]
    assert encode.parse(encode(None)) == []


def test_video_segments_are_checked_and_parse_refuses_what_it_did_not_build():
    tokenizer, vocab = extend(sentencepiece_tokenizer())
    encode = PromptEncoder(tokenizer, vocab)
    with pytest.raises(ValueError, match="8"):
        encode.turn_ids([VideoSegment(torch.zeros(7, dtype=torch.long)), "q"])
    with pytest.raises(ValueError, match=r"\[0, 64\)|range|64"):
        encode.turn_ids([VideoSegment(torch.full((8,), 64)), "q"])
    with pytest.raises(ValueError, match="one video"):
        encode.turn_ids([VideoSegment(torch.zeros(2, 8, dtype=torch.long))])
    with pytest.raises(TypeError, match="str or VideoSegment"):
        encode.turn_ids([torch.zeros(8, dtype=torch.long)])
    with pytest.raises(ValueError, match="at least one part"):
        encode.turn_ids([])
    ids = encode.turn_ids([segment(0), "q"])
    start = ids.index(vocab.video_start_id)
    with pytest.raises(ValueError, match="<|video_start|>, 8 codes, <|video_end|>"):
        encode.parse(ids[:start + 4] + ids[start + 5:])  # a segment one code short
    with pytest.raises(ValueError, match="outside a video segment"):
        encode.parse(ids[:start] + ids[start + 1:])  # codes without their start
    with pytest.raises(ValueError, match="template"):
        encode.parse(tokenizer("just some text", add_special_tokens=False)["input_ids"])


def test_a_text_only_model_refuses_videos_in_its_prompt():
    tokenizer, vocab = extend(sentencepiece_tokenizer())
    old = dataclasses.replace(vocab, template_version=1)
    encode = PromptEncoder(tokenizer, old)
    assert encode("a cat") == PromptEncoder(tokenizer, vocab)("a cat")  # text prompts: the same ids as version 2
    with pytest.raises(ValueError, match="template version 1"):
        encode([segment(0), "what is this?"])
    with pytest.raises(ValueError, match="newer"):
        dataclasses.replace(vocab, template_version=99)
