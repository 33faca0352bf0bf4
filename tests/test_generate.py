"""llm_adapters.generate: constrained decoding, CFG, sampling processors, per-sample seeds, plain vs fast path."""
from __future__ import annotations

import pytest
import torch
from llm_fixtures import assert_same_samples, greedy_record, larp_tiny, record_decisions, tiny_llm

from llm_adapters.adapter import hf_model, hybrid_modules, materialize
from llm_adapters.generate import (SamplingConfig, VideoSpanConstraint, _plain_loop, apply_cfg, draw_uniforms,
                                   filter_logits, generate_video_codes, pack_prompts, prompt_rows, sample_codes)
from llm_adapters.loading import MergedLLM
from llm_adapters.model import extend_llm
from llm_adapters.prompts import build_prompt_ids

PROMPTS = ["apply eye makeup", "a person playing the violin on a small wooden stage in the park", None]


def _sharpen(video_llm) -> None:
    """Random weights give every code the same logit at init; give the video head a context-dependent spread."""
    _, head = hybrid_modules(hf_model(video_llm.model))
    torch.manual_seed(1)
    with torch.no_grad():
        head.video.rows.scale.normal_(0, 1.0)


@pytest.fixture(scope="module")
def larp():
    return larp_tiny()


@pytest.fixture(scope="module")
def llama(larp):
    """Tiny Llama, codebook adapter + LoRA (peft-wrapped)."""
    model, tokenizer = tiny_llm("llama")
    video_llm = extend_llm(model, tokenizer, larp, lora=dict(r=4, lora_alpha=8, lora_dropout=0.0))
    _sharpen(video_llm)
    video_llm.model.eval()
    return video_llm


@pytest.fixture(scope="module")
def qwen_merged(larp):
    """Tiny Qwen2 (tied, config.vocab_size > len(tokenizer)), materialised into a plain HF model (nn.Linear head)."""
    model, tokenizer = tiny_llm("qwen2", tied=True, extra_rows=5)
    video_llm = extend_llm(model, tokenizer, larp, lora=None)
    _sharpen(video_llm)
    return MergedLLM(materialize(video_llm).eval(), video_llm.tokenizer, video_llm.vocab)


def _check_codes(codes: torch.Tensor, video_llm, count: int) -> None:
    vocab = video_llm.vocab
    assert codes.shape == (count, vocab.num_video_tokens) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < vocab.codebook_size
    ids = vocab.codes_to_ids(codes)  # checks length and range again
    assert torch.equal(vocab.ids_to_codes(ids), codes)


@pytest.mark.parametrize("settings", [
    dict(cfg_scale=1.25, temperature=1.0, top_k=0, top_p=1.0, batch_size=3),
    dict(cfg_scale=0.0, temperature=0.7, top_k=5, top_p=1.0, batch_size=1),
    dict(cfg_scale=4.0, temperature=1.5, top_k=0, top_p=0.5, batch_size=2),
])
def test_every_sample_has_exactly_n_codes_and_decodes(llama, larp, settings):
    codes = generate_video_codes(llama, PROMPTS, seed=3, progress=False, fast=False, **settings)
    _check_codes(codes, llama, len(PROMPTS))
    video = larp.decode_codes(codes)
    assert video.shape == (len(PROMPTS), *larp.video_shape) and torch.isfinite(video).all()


def _generate(video_llm, prompts, **kw):
    """generate_video_codes(...) and the `SampleRecord` of every sample (the logits behind each code)."""
    with record_decisions(video_llm.vocab.num_video_tokens) as records:
        codes = generate_video_codes(video_llm, prompts, progress=False, **kw)
    return codes, records


def test_top_k_one_and_tiny_top_p_are_greedy(llama):
    # one path, one batch: the logits are the same computation in all three runs (bit for bit), only the filters
    # differ, and each keeps exactly the argmax
    kw = dict(cfg_scale=1.25, seed=0, progress=False, fast=False)
    greedy = generate_video_codes(llama, PROMPTS, temperature=0.0, **kw)
    assert torch.equal(generate_video_codes(llama, PROMPTS, top_k=1, **kw), greedy)
    assert torch.equal(generate_video_codes(llama, PROMPTS, top_p=1e-6, **kw), greedy)
    sampled = generate_video_codes(llama, PROMPTS, **kw)
    assert not torch.equal(sampled, greedy)  # the sharpened head still leaves randomness to sampling


def test_cfg_scale_one_equals_plain_unguided_path(llama):
    """The batched CFG machinery (doubled rows, uncond prompts padded in, same token fed to both halves) at s = 1
    gives the unguided codes; another scale changes them."""
    plain, plain_records = _generate(llama, PROMPTS, cfg_scale=1.0, seed=7, fast=False)
    vocab = llama.vocab
    batch = pack_prompts(prompt_rows(llama, PROMPTS, cfg=True), 0, "cpu")
    assert batch.input_ids.shape[0] == 2 * len(PROMPTS)
    uniforms = draw_uniforms([7 + i for i in range(len(PROMPTS))], vocab.num_video_tokens)
    with record_decisions(vocab.num_video_tokens) as forced_records:
        forced = _plain_loop(llama.model, vocab, batch, uniforms, SamplingConfig(cfg_scale=1.0), True, lambda: None)
    # c + 0 (c - u) is exactly c, but the doubled batch is another fp32 computation of c (other GEMM shapes): the
    # same codes up to near ties of the logits
    assert_same_samples(forced, plain, forced_records, plain_records)
    guided = generate_video_codes(llama, PROMPTS, cfg_scale=3.0, seed=7, progress=False, fast=False)
    assert not torch.equal(guided, plain)


@pytest.mark.parametrize("which, cfg_scale", [("llama", 1.25), ("qwen_merged", 1.25), ("qwen_merged", 1.0)])
def test_fast_path_equals_plain_path(which, cfg_scale, request):
    video_llm = request.getfixturevalue(which)
    kw = dict(cfg_scale=cfg_scale, temperature=0.9, top_k=50, top_p=0.95, seed=11, batch_size=2)
    plain, plain_records = _generate(video_llm, PROMPTS, fast=False, **kw)
    fast, fast_records = _generate(video_llm, PROMPTS, fast=True, **kw)
    _check_codes(fast, video_llm, len(PROMPTS))
    # the fast path computes the video logits with other shapes (static cache, K video rows only): the same logits
    # within fp32 rounding, so the same codes up to near ties
    assert_same_samples(fast, plain, fast_records, plain_records)


def test_hf_generate_with_the_span_constraint_matches_greedy_codes(llama):
    """HF `generate` + VideoSpanConstraint writes N codes, <|video_end|>, eos; its greedy codes equal ours."""
    from transformers import LogitsProcessorList

    vocab, eos = llama.vocab, llama.tokenizer.eos_token_id
    n = vocab.num_video_tokens
    ids = torch.tensor([build_prompt_ids(llama.tokenizer, vocab, PROMPTS[0])])
    out = llama.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=n + 2, pad_token_id=eos, output_scores=True,
                               return_dict_in_generate=True,
                               logits_processor=LogitsProcessorList([VideoSpanConstraint(vocab, eos)]))
    new = out.sequences[0, ids.shape[1]:]
    assert new[-2:].tolist() == [vocab.video_end_id, eos]
    assert vocab.is_video_id(new[:-2]).all()
    ours, records = _generate(llama, PROMPTS[:1], cfg_scale=1.0, temperature=0.0, fast=False)
    hf = greedy_record(out, ids.shape[1], vocab.video_offset, vocab.vocab_size)  # the scores of the code ids
    hf.logits, hf.codes = hf.logits[:n], hf.codes[:n]
    # HF's generate and our loop are two computations of the same logits (their own masks, cache and shapes):
    # the same greedy codes up to near ties
    assert_same_samples(vocab.ids_to_codes(new[:-2])[None], ours, [hf], records)


def test_sample_depends_on_prompt_and_seed_not_on_batch(llama):
    # another batch (and padding) is another fp32 computation of a sample's logits: the same codes up to near ties
    together, together_records = _generate(llama, PROMPTS, seed=5, batch_size=3, fast=False)
    alone, alone_records = _generate(llama, PROMPTS[1:2], seed=6, batch_size=1, fast=False)
    # no left padding alone, 1 pad row per shorter prompt together
    assert_same_samples(alone, together[1:2], alone_records, together_records[1:2])
    again, again_records = _generate(llama, PROMPTS, seed=5, batch_size=1, fast=True)
    assert_same_samples(again, together, again_records, together_records)
    assert not torch.equal(together[0], together[2])  # different prompts and seeds, different videos


def test_left_padding_masks_and_positions():
    batch = pack_prompts([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.lengths.tolist() == [3, 1]
    assert pack_prompts([[1]], 0, "cpu", pad_to=4).input_ids.shape == (1, 4)


def test_sampler_follows_the_distribution_and_skips_masked_codes():
    logits = torch.tensor([[float("-inf"), 0.0, 1.0, float("-inf"), 2.0, float("-inf")]])
    probs = logits.softmax(-1)[0]
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(0))
    draws = sample_codes(logits.expand(len(u), -1), u)
    freq = torch.bincount(draws, minlength=6).double() / len(u)
    assert freq[[0, 3, 5]].sum() == 0
    assert torch.allclose(freq, probs.double(), atol=0.01)
    edge = sample_codes(logits, torch.tensor([1.0 - 2 ** -24]))  # u * total may round up to the total
    assert edge.item() == 4
    assert sample_codes(logits, torch.tensor([0.0]), greedy=True).item() == 4


def test_processors_cfg_topk_topp_temperature():
    cond, uncond = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
    assert torch.equal(apply_cfg(torch.cat([cond, uncond]), 1.0), cond)
    assert torch.allclose(apply_cfg(torch.cat([cond, uncond]), 2.0), uncond + 2.0 * (cond - uncond))
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top2 = filter_logits(logits, SamplingConfig(top_k=2))
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    nucleus = filter_logits(logits, SamplingConfig(top_p=0.75))  # 0.5 + 0.3 >= 0.75: two codes kept
    assert torch.isfinite(nucleus[0]).tolist() == [True, True, False, False]
    hot = filter_logits(logits, SamplingConfig(temperature=2.0))
    assert torch.allclose(hot, logits / 2)


def test_bad_arguments_raise_clear_errors(llama):
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_video_codes(llama, [], progress=False)
    with pytest.raises(ValueError, match="top_p"):
        generate_video_codes(llama, ["x"], top_p=0.0, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        generate_video_codes(llama, ["x"], temperature=-1.0, progress=False)
    with pytest.raises(ValueError, match="fast"):
        generate_video_codes(llama, ["x"], fast="yes", progress=False)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate_video_codes(llama, ["word " * 600], progress=False)


@pytest.mark.slow
def test_compiled_fast_step_equals_plain_path(qwen_merged):
    """torch.compile of the decode step (inductor on the CPU; CUDA graphs on a GPU) keeps the codes."""
    kw = dict(cfg_scale=1.25, seed=2, batch_size=2)
    plain, records = _generate(qwen_merged, PROMPTS, fast=False, **kw)
    compiled = generate_video_codes(qwen_merged, PROMPTS, fast=True, compile=True, progress=False, **kw)
    # inductor fuses and reorders the fp32 sums: the same codes up to near ties of the plain path's logits (the
    # compiled step cannot be recorded, so only the plain side's margin is checked where they differ)
    assert_same_samples(plain, compiled, records)
