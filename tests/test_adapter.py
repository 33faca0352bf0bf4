"""Codebook-aware hybrid embedding/head: exact text behaviour, codebook geometry, caching, materialisation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from llm_fixtures import (MODEL_VARIANT_IDS, MODEL_VARIANTS, assert_logits_close, assert_same_samples, chat_ids,
                          greedy_record, larp_tiny, perturb_, tiny_llm)

from llm_adapters.adapter import (
    HybridEmbedding,
    HybridHead,
    VideoTokenEmbedding,
    install_video_adapter,
    load_video_adapter_state_dict,
    materialize,
    resize_for_rows,
    row_stats,
    video_adapter_parameters,
    video_adapter_state_dict,
)
from llm_adapters.vocab import VideoVocab

IDS = pytest.mark.parametrize("arch,tied,extra", MODEL_VARIANTS, ids=MODEL_VARIANT_IDS)


@pytest.fixture(scope="module")
def larp():
    return larp_tiny()


def install(arch, tied, extra, larp):
    model, tokenizer = tiny_llm(arch, tied, extra)
    vocab = VideoVocab.extend_tokenizer(tokenizer, model.config.vocab_size, larp.codebook_size, larp.num_tokens,
                                        larp.codebook_hash())
    with torch.no_grad():
        ref = model(chat_ids(tokenizer, "What does a function return?")).logits
    install_video_adapter(model, vocab, larp.codebook())
    return model, tokenizer, vocab, ref


def test_row_stats_match_torch():
    w = torch.randn(500, 32) * torch.rand(32) + torch.randn(32)
    mean, std = row_stats(w, 400, chunk=64)
    assert torch.allclose(mean, w[:400].mean(0), atol=1e-5)
    assert torch.allclose(std, w[:400].std(0, unbiased=False), atol=1e-5)


def test_codes_close_on_the_sphere_start_close(larp):
    """Pairwise cosine similarities of the rows follow those of the LARP code vectors."""
    torch.manual_seed(0)
    cb = larp.codebook()  # (K, d)
    emb = VideoTokenEmbedding(cb, 64, torch.zeros(64), torch.ones(64))
    with torch.no_grad():
        rows = F.normalize(emb.weight(), dim=-1)  # (K, h)
    sim_codes = (cb @ cb.T).flatten()
    sim_rows = (rows @ rows.T).flatten()
    assert torch.corrcoef(torch.stack([sim_codes, sim_rows]))[0, 1] > 0.5


@IDS
def test_hybrid_modules_keep_text_rows_and_split_the_layout(arch, tied, extra, larp):
    model, tokenizer, vocab, ref = install(arch, tied, extra, larp)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, HybridEmbedding) and isinstance(head, HybridHead)
    assert (head.weight is embed.weight) == tied and model.config.vocab_size == vocab.embedding_size
    ids = torch.tensor([[5, vocab.base - 1, vocab.video_start_id, vocab.video_uncond_id,
                         vocab.video_offset, vocab.video_offset + 200, vocab.embedding_size - 1]])
    with torch.no_grad():
        out = embed(ids)[0]  # (7, h)
        assert torch.equal(out[:2], embed.text.weight[[5, vocab.base - 1]])
        assert torch.equal(out[2], embed.control[0]) and torch.equal(out[3], embed.control[2])
        assert torch.allclose(out[5], embed.video.weight()[200], atol=1e-6)  # one row vs all K: other GEMM shapes
        assert torch.equal(out[6], embed.fill) or vocab.embedding_size == vocab.vocab_size
        # codes get text-like statistics: per-row RMS close to the text rows'
        rms_text = embed.weight.square().mean().sqrt()
        assert 0.5 < float(embed.video.weight().square().mean().sqrt() / rms_text) < 2.0
        logits = model(chat_ids(tokenizer, "What does a function return?")).logits
    assert logits.shape[-1] == vocab.embedding_size
    # text logits unchanged, up to rounding: without grad the head is one product with the extended matrix, a wider
    # GEMM than the original head's, which rounds differently (LOGIT_RTOL of the logit scale)
    assert_logits_close(logits[..., : ref.shape[-1]], ref)
    # before training every code and control gets the mean text logit, which never beats the text argmax
    new = logits[..., vocab.base:]
    assert torch.allclose(new, ref[..., : vocab.text_vocab_size].mean(-1, keepdim=True).expand_as(new), atol=1e-4)
    assert (new.max(-1).values < ref.max(-1).values).all()


@IDS
def test_generate_with_cache_and_logits_processors(arch, tied, extra, larp):
    model, tokenizer, vocab, _ = install(arch, tied, extra, larp)
    perturb_(video_adapter_parameters(model))
    prompt = chat_ids(tokenizer, "Draw me a video")
    video_ids = list(range(vocab.video_offset, vocab.vocab_size))
    outs = [model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=cache, output_scores=True,
                           return_dict_in_generate=True, prefix_allowed_tokens_fn=lambda b, ids: video_ids)
            for cache in (True, False)]
    # the KV-cache path agrees with full recomputation: the same logits up to rounding (one new token per step vs
    # the whole sequence: other GEMM shapes), so the same greedy tokens up to near ties
    cached, full = (greedy_record(out, prompt.shape[1], vocab.video_offset, vocab.vocab_size) for out in outs)
    assert_same_samples(cached.codes[None], full.codes[None], [cached], [full])
    assert vocab.is_video_id(outs[0].sequences[:, prompt.shape[1]:]).all()


def test_head_rows_are_cached_without_grad_and_refreshed_after_a_step(larp):
    model, tokenizer, vocab, _ = install("llama", False, 0, larp)
    head = model.get_output_embeddings().video
    perturb_(head.parameters())
    with torch.no_grad():
        first = head.weight()
        assert head.weight() is first  # cached during generation
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    loss = head(torch.randn(3, 64)).square().mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = head.weight()
    assert after is not first and not torch.equal(after, first)
    assert torch.equal(after, head._compute())  # the cache holds what the same function computes from the same state


@IDS
def test_materialize_gives_a_plain_model_with_equal_logits(arch, tied, extra, larp, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, vocab, _ = install(arch, tied, extra, larp)
    perturb_(video_adapter_parameters(model))
    model.tie_weights()  # HF may re-tie at any time: harmless with the hybrid modules
    ids = torch.cat([chat_ids(tokenizer, "a video"), torch.tensor([[vocab.video_start_id, vocab.video_offset + 7,
                     vocab.video_offset + 255, vocab.video_end_id, vocab.video_uncond_id]])], dim=1)
    with torch.no_grad():
        want = model(ids).logits
    plain = materialize(model)
    assert type(plain.get_input_embeddings()) is torch.nn.Embedding
    assert type(plain.get_output_embeddings()) is torch.nn.Linear
    assert plain.get_input_embeddings().weight.shape[0] == vocab.embedding_size == plain.config.vocab_size
    assert not plain.config.tie_word_embeddings
    with torch.no_grad():
        got = plain(ids).logits
    # equal up to rounding: the hybrid embedding computes a code's input row from its own code vector, the plain
    # embedding holds the rows computed for all K codes at once (other GEMM shapes); LOGIT_RTOL of the logit scale
    assert_logits_close(got, want)
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, got)  # the same weights read back: the same computation


def test_adapter_state_round_trips_and_checks_keys(larp):
    model, _, vocab, _ = install("qwen2", True, 37, larp)
    perturb_(video_adapter_parameters(model))
    state = {k: v.clone() for k, v in video_adapter_state_dict(model).items()}
    assert "embed.video.codebook" in state and not any(k.endswith("text.weight") for k in state)
    other, _, _, _ = install("qwen2", True, 37, larp)
    load_video_adapter_state_dict(other, state)
    ids = torch.tensor([[1, 2, vocab.video_start_id, vocab.video_offset + 3]])
    with torch.no_grad():  # the same modules and tensors (copied), the same shapes: the same computation
        assert torch.equal(model(ids).logits, other(ids).logits)
    with pytest.raises(ValueError, match="missing"):
        load_video_adapter_state_dict(other, {k: v for k, v in state.items() if k != "head.control"})
    with pytest.raises(ValueError, match="already holds"):
        install_video_adapter(other, vocab, larp.codebook())


def test_resize_for_rows_is_deterministic_outside_the_new_rows(larp):
    model, tokenizer = tiny_llm("qwen2", False, 37)
    vocab = VideoVocab.extend_tokenizer(tokenizer, model.config.vocab_size, 256, 32, larp.codebook_hash())
    text = model.get_input_embeddings().weight[: vocab.base].clone()
    resize_for_rows(model, vocab)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == vocab.embedding_size == model.get_output_embeddings().weight.shape[0]
    assert torch.equal(weight[: vocab.base], text)
    mean, _ = row_stats(weight, vocab.text_vocab_size)
    assert torch.equal(weight[vocab.vocab_size:], mean.expand(vocab.embedding_size - vocab.vocab_size, -1))


@IDS
def test_training_path_agrees_with_the_generation_path(arch, tied, extra, larp):
    """With grad the head computes text/control/video logits separately; without, one cached product."""
    model, tokenizer, vocab, _ = install(arch, tied, extra, larp)
    perturb_(video_adapter_parameters(model))
    ids = torch.cat([chat_ids(tokenizer, "a video"), vocab.codes_to_ids(torch.arange(32) * 8)[None]], dim=1)
    with torch.no_grad():
        fast = model(ids).logits
    slow = model(ids).logits
    assert slow.requires_grad and torch.allclose(slow.detach(), fast, atol=1e-5 * float(fast.abs().max()), rtol=0)


def test_tokenizer_larger_than_the_embedding(larp):
    """len(tokenizer) > config.vocab_size: the tokens without a base row get the mean row, ids stay the layout's."""
    model, tokenizer = tiny_llm("llama", False, extra_rows=-10)
    rows = model.config.vocab_size
    vocab = VideoVocab.extend_tokenizer(tokenizer, rows, 256, 32, larp.codebook_hash())
    assert vocab.base == vocab.text_vocab_size == rows + 10 and vocab.unused_id_ranges()[0][0] == vocab.vocab_size
    ids = torch.tensor([[3, 50, rows - 1]])
    with torch.no_grad():
        ref = model(ids).logits
    install_video_adapter(model, vocab, larp.codebook())
    perturb_(video_adapter_parameters(model))
    with torch.no_grad():
        # text logits unchanged up to rounding (the extended head is a wider GEMM; LOGIT_RTOL of the logit scale)
        assert_logits_close(model(ids).logits[..., :rows], ref)
        gap = model.get_input_embeddings()(torch.tensor([[rows, rows + 9]]))[0]
        assert torch.equal(gap, model.get_input_embeddings().fill.expand(2, -1))
        full = torch.cat([ids, torch.tensor([[rows + 5, vocab.video_start_id, vocab.video_offset + 1]])], dim=1)
        want = model(full).logits
    plain = materialize(model)
    with torch.no_grad():  # video input rows computed one by one vs for all K codes at once: equal up to rounding
        assert_logits_close(plain(full).logits, want)
