"""extend_llm / VideoLLM: text behaviour kept, what trains, save/reload, merged export (tiny models, SmolLM2)."""
from __future__ import annotations

import json

import pytest
import torch
from llm_fixtures import (LOGIT_RTOL, MODEL_VARIANT_IDS, MODEL_VARIANTS, assert_logits_close, assert_same_samples,
                          chat_ids, greedy_record, larp_tiny, logit_tol, perturb_, smollm2, smollm2_dir, tiny_llm,
                          tiny_llm_dir, video_batch)

from llm_adapters import merge
from llm_adapters.adapter import hybrid_modules
from llm_adapters.model import (
    LORA_DEFAULTS,
    VideoLLM,
    VideoLLMConfig,
    check_inputs,
    extend_llm,
    recorded_gguf_file,
)
from llm_adapters.vocab import VideoVocab

MODELS = pytest.mark.parametrize("arch,tied,extra", MODEL_VARIANTS, ids=MODEL_VARIANT_IDS)
ADAPTERS = pytest.mark.parametrize("adapter", ["codebook", "rows"])
SMALL_LORA = dict(r=4, lora_alpha=8)
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def larp():
    return larp_tiny()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def logits(model, batch):
    return [model(input_ids=ids).logits for ids in batch]


def assert_same_greedy_text(before, after, prompt_length: int, width: int) -> None:
    """Two greedy `generate` outputs (with scores) of the model before and after extension give the same text: the
    logits of the `width` text ids agree up to rounding at every step until the answers part, and they part only
    at a near tie (the extended head is a wider GEMM, which rounds differently)."""
    records = [greedy_record(out, prompt_length, 0, width) for out in (before, after)]
    steps = min(len(r.codes) for r in records)  # an answer stops early only after an eos the other lacks
    for r in records:
        r.logits, r.codes = r.logits[:steps], r.codes[:steps]
    assert_same_samples(records[0].codes[None], records[1].codes[None], records[:1], records[1:])
    assert torch.equal(before.sequences[:, :prompt_length], after.sequences[:, :prompt_length])


GREEDY = dict(do_sample=False, output_scores=True, return_dict_in_generate=True)


@MODELS
@ADAPTERS
def test_text_behaviour_is_unchanged_before_training(arch, tied, extra, adapter, larp):
    model, tokenizer = tiny_llm(arch, tied, extra)
    ids = chat_ids(tokenizer, QUESTION)
    with torch.no_grad():
        ref = model(ids).logits
    answer = model.generate(ids, max_new_tokens=8, **GREEDY)
    video_llm = extend_llm(model, tokenizer, larp, adapter=adapter, lora=SMALL_LORA)
    video_llm.model.eval()
    with torch.no_grad():
        new = video_llm.model(input_ids=ids).logits
    assert new.shape[-1] == video_llm.vocab.embedding_size
    # LoRA B = 0 adds exact zeros, but the extended head is a wider GEMM that rounds differently: LOGIT_RTOL of the
    # logit scale
    assert_logits_close(new[..., : ref.shape[-1]], ref)
    again = video_llm.model.generate(input_ids=ids, max_new_tokens=8, **GREEDY)
    assert_same_greedy_text(answer, again, ids.shape[1], ref.shape[-1])


@ADAPTERS
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_only_the_intended_parameters_train(adapter, tied, larp):
    model, tokenizer = tiny_llm("qwen2", tied, 37)
    video_llm = extend_llm(model, tokenizer, larp, adapter=adapter, lora=SMALL_LORA)
    summary = video_llm.trainable_parameters()
    assert summary.other == 0 and summary.lora > 0
    if adapter == "codebook":
        assert summary.video_adapter > 0 and summary.control_rows == 2 * 3 * 64 and summary.trainable_tokens == 0
    else:
        assert summary.trainable_tokens == (1 if tied else 2) * len(video_llm.vocab.new_ids) * 64
    model = video_llm.model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, labels = video_batch(video_llm.tokenizer, video_llm.vocab)
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # two steps: LoRA A and the head MLP see gradients once LoRA B / the head scale left 0
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(summary.names)  # everything that trains moved; nothing else did
    assert all("lora_" in n or "trainable_tokens_" in n or "embed_tokens." in n or "lm_head." in n for n in changed)
    assert not any(n.endswith(("embed_tokens.text.weight", "lm_head.weight", "base_layer.weight")) for n in changed)


@MODELS
@ADAPTERS
def test_bundle_reloads_with_identical_logits_and_exports(arch, tied, extra, adapter, larp, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_llm(arch, tied, extra)
    video_llm = extend_llm(model, tokenizer, larp, adapter=adapter, lora=SMALL_LORA)
    perturb_(trainable(video_llm.model))  # stands in for training
    video_llm.model.eval()
    batch = check_inputs(video_llm.tokenizer, video_llm.vocab)
    want = logits(video_llm.model, batch)
    video_llm.save_pretrained(tmp_path / "bundle")

    base = tiny_llm_dir(arch, tied, extra)
    again = VideoLLM.from_pretrained(tmp_path / "bundle", base_model=base, larp_tokenizer=larp)
    assert again.vocab == video_llm.vocab and again.config == video_llm.config
    for w, g in zip(want, logits(again.model, batch)):
        assert torch.equal(w, g)  # the same modules with the same tensors (read back), the same shapes

    merge.main(["--model", str(tmp_path / "bundle"), "--base-model", str(base),
                "--output-dir", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged.get_input_embeddings()) is torch.nn.Embedding
    assert merged.config.vocab_size == video_llm.vocab.embedding_size
    assert VideoVocab.load(tmp_path / "merged") == video_llm.vocab
    # the merged model folds LoRA into the weights and holds the video input rows computed for all K codes at once:
    # other fp32 sums than the bundle's, equal within LOGIT_RTOL of the logit scale
    for w, g in zip(want, logits(merged, batch)):
        assert_logits_close(g, w)


def test_reload_is_trainable_and_resaves_in_place(larp, tmp_path):
    model, tokenizer = tiny_llm("llama", True)
    video_llm = extend_llm(model, tokenizer, larp, lora=SMALL_LORA)
    (tmp_path / "trainer_state.json").write_text("{}")  # files written by others stay
    video_llm.save_pretrained(tmp_path)
    again = VideoLLM.from_pretrained(tmp_path, base_model=tiny_llm("llama", True)[0], is_trainable=True)
    assert again.trainable_parameters().trainable == video_llm.trainable_parameters().trainable
    again.config.lora = False  # a LoRA-free bundle in the same folder must not leave a stale LoRA behind
    again.model = again.model.merge_and_unload()
    again.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists() and (tmp_path / "trainer_state.json").exists()
    assert not list(tmp_path.glob(".save-*"))
    reloaded = VideoLLM.from_pretrained(tmp_path, base_model=tiny_llm("llama", True)[0])
    batch = check_inputs(reloaded.tokenizer, reloaded.vocab)
    for w, g in zip(logits(again.model, batch), logits(reloaded.model, batch)):
        assert torch.equal(w, g)  # the same modules and weights (LoRA B = 0 merged adds exact zeros), same shapes


def test_loading_against_another_codebook_names_both_hashes(larp, tmp_path):
    model, tokenizer = tiny_llm("llama", False)
    extend_llm(model, tokenizer, larp, lora=None, larp_checkpoint="larp-tiny@seed0").save_pretrained(tmp_path)
    other = larp_tiny(seed=1)
    assert other.codebook_hash() != larp.codebook_hash()
    with pytest.raises(ValueError) as err:
        VideoLLM.from_pretrained(tmp_path, base_model=tiny_llm_dir("llama", False), larp_tokenizer=other)
    assert larp.codebook_hash() in str(err.value) and other.codebook_hash() in str(err.value)
    assert "larp-tiny@seed0" in str(err.value)
    assert json.loads((tmp_path / "video_vocab.json").read_text())["larp_checkpoint"] == "larp-tiny@seed0"


def test_gguf_file_is_recorded_and_old_bundles_still_load(larp, tmp_path):
    base = tiny_llm_dir("llama", False)
    model, tokenizer = tiny_llm("llama", False)
    video_llm = extend_llm(model, tokenizer, larp, lora=None, gguf_file="base.Q4.gguf")
    video_llm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "video_llm.json").read_text())
    assert config["gguf_file"] == "base.Q4.gguf"
    # the recorded name applies to the recorded base or a folder holding that file, not to another (HF) base
    recorded = VideoLLMConfig(**{**config, "base_model": "/models/smol"})
    assert recorded_gguf_file(recorded, "/models/smol") == "base.Q4.gguf"
    assert recorded_gguf_file(recorded, base) is None
    (tmp_path / "gguf_folder").mkdir()
    (tmp_path / "gguf_folder" / "base.Q4.gguf").write_bytes(b"")
    assert recorded_gguf_file(recorded, tmp_path / "gguf_folder") == "base.Q4.gguf"
    assert VideoLLM.from_pretrained(tmp_path, base_model=base).config.gguf_file == "base.Q4.gguf"
    del config["gguf_file"]  # a bundle written before the field existed
    (tmp_path / "video_llm.json").write_text(json.dumps(config))
    assert VideoLLM.from_pretrained(tmp_path, base_model=base).config.gguf_file is None
    assert extend_llm(*tiny_llm("llama", False), larp, lora=None).config.gguf_file is None


def test_bad_inputs_fail_clearly(larp, tmp_path):
    with pytest.raises(FileNotFoundError, match="bundle"):
        VideoLLM.from_pretrained(tmp_path, base_model=tiny_llm_dir("llama", False))
    model, tokenizer = tiny_llm("llama", False)
    with pytest.raises(ValueError, match="adapter must be"):
        extend_llm(model, tokenizer, larp, adapter="lora")
    video_llm = extend_llm(model, tokenizer, larp, lora=None)
    with pytest.raises(ValueError, match="plain HF model"):
        extend_llm(video_llm.model, tiny_llm("llama", False)[1], larp)
    video_llm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="embedding rows"):  # a base of another shape
        VideoLLM.from_pretrained(tmp_path, base_model=tiny_llm_dir("qwen2", False, 37))


def test_lora_defaults_and_config_objects(larp):
    from peft import LoraConfig

    assert LORA_DEFAULTS["r"] == 64 and LORA_DEFAULTS["lora_alpha"] == 128 and LORA_DEFAULTS["lora_dropout"] == 0.05
    assert LORA_DEFAULTS["target_modules"] == "auto"  # follows the architecture (tests/test_llm_families.py)
    model, tokenizer = tiny_llm("llama", False)
    video_llm = extend_llm(model, tokenizer, larp)
    config = video_llm.model.peft_config["default"]
    assert config.r == 64 and set(config.target_modules) == {"q_proj", "v_proj"}  # peft's default for Llama
    assert video_llm.config.lora_target_modules == ["q_proj", "v_proj"]
    model, tokenizer = tiny_llm("llama", False)
    video_llm = extend_llm(model, tokenizer, larp, lora=LoraConfig(r=2, target_modules=["q_proj"]))
    assert video_llm.trainable_parameters().lora == 2 * 2 * (64 + 64)
    hybrid_modules(video_llm.model.get_base_model())  # the codebook adapter sits under the peft wrapper


# ---- the real SmolLM2-135M-Instruct -------------------------------------------------------------------------
def test_smollm2_answers_the_same_after_extension(larp):
    model, tokenizer = smollm2()
    ids = chat_ids(tokenizer, QUESTION)
    answer = model.generate(ids, max_new_tokens=6, **GREEDY)
    assert "Paris" in tokenizer.decode(answer.sequences[0, ids.shape[1]:])
    width = model.get_output_embeddings().weight.shape[0]
    video_llm = extend_llm(model, tokenizer, larp)  # default LoRA (r 64) on peft's default targets for Llama
    video_llm.model.eval()
    again = video_llm.model.generate(input_ids=ids, max_new_tokens=6, **GREEDY)
    assert_same_greedy_text(answer, again, ids.shape[1], width)
    vocab = video_llm.vocab
    assert (vocab.base, vocab.video_offset, vocab.embedding_size) == (49152, 49155, 49472)


@pytest.mark.slow
@ADAPTERS
def test_smollm2_trains_saves_reloads_and_exports(adapter, larp, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2()
    video_llm = extend_llm(model, tokenizer, larp, adapter=adapter, lora=dict(r=8, lora_alpha=16))
    ids, labels = video_batch(video_llm.tokenizer, video_llm.vocab)
    optimizer = torch.optim.AdamW(trainable(video_llm.model), lr=1e-3, weight_decay=0.0)
    for _ in range(2):
        video_llm.model.train()(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    video_llm.model.eval()
    batch = check_inputs(video_llm.tokenizer, video_llm.vocab)
    want = logits(video_llm.model, batch)
    video_llm.save_pretrained(tmp_path / "bundle")
    again = VideoLLM.from_pretrained(tmp_path / "bundle", base_model=smollm2_dir(), larp_tokenizer=larp)
    for w, g in zip(want, logits(again.model, batch)):
        assert torch.equal(w, g)  # the same modules with the same tensors (read back), the same shapes
    merge.main(["--model", str(tmp_path / "bundle"), "--base-model", str(smollm2_dir()),
                "--output-dir", str(tmp_path / "merged")])
    exported = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), batch)
    # materialising the rows: the export equals the bundle model with its LoRA folded in, up to rounding (the
    # export's video input rows were computed for all K codes at once, the adapter's one by one: other GEMM shapes)
    folded = logits(again.model.merge_and_unload(), batch)
    for w, g in zip(folded, exported):
        assert_logits_close(g, w)
    # folding LoRA into 30 layers reorders fp32 sums: equal to the unmerged model within 1e-5 relative
    for w, g in zip(want, exported):
        assert (w - g).abs().max() <= 1e-5 * w.abs().max()


def test_bf16_with_gradient_checkpointing_trains(larp):
    model, tokenizer = tiny_llm("qwen2", True, 37)
    model.to(torch.bfloat16)
    ids = chat_ids(tokenizer, QUESTION)
    with torch.no_grad():
        ref = model(ids).logits
    model.gradient_checkpointing_enable()
    video_llm = extend_llm(model, tokenizer, larp, lora=SMALL_LORA)
    with torch.no_grad():
        new = video_llm.model.eval()(input_ids=ids).logits[..., : ref.shape[-1]]
    # LoRA B = 0 adds exact zeros, but the extended head is a wider bf16 GEMM: its fp32 sums round differently
    # (LOGIT_RTOL of the scale) and then to bf16, which may land one bf16 ulp (2^-7 relative) away
    torch.testing.assert_close(new, ref, atol=logit_tol(ref.float(), rtol=LOGIT_RTOL), rtol=2 ** -7)
    ids, labels = video_batch(video_llm.tokenizer, video_llm.vocab)
    loss = video_llm.model.train()(input_ids=ids, labels=labels).loss
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None for p in trainable(video_llm.model))
