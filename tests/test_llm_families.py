"""Every architecture family the pinned transformers builds: extend -> text logits unchanged -> one step trains only
LoRA, adapter and control rows -> N codes, plain path == fast path -> save, reload -> larp-merge-llm -> the merged
folder gives the adapter model's logits. Families that cannot be extended are refused before anything changes."""
from __future__ import annotations

import json

import pytest
import torch
from llm_fixtures import (FAMILIES, assert_logits_close, assert_same_samples, chat_ids, family_llm, family_llm_dir,
                          larp_tiny, perturb_, record_decisions, sentencepiece_tokenizer, tiny_llm, video_batch)

from llm_adapters import merge
from llm_adapters.adapter import hf_model, hybrid_modules, materialize
from llm_adapters.architectures import embedding_row_scale, resolve_lora_targets
from llm_adapters.generate import generate_video_codes
from llm_adapters.model import VideoLLM, check_inputs, extend_llm

SMALL_LORA = dict(r=4, lora_alpha=8)
PROMPTS = ["a person playing the violin", None]
ALL_PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
# What "auto" resolves to: peft's per-model default where it has one, else every linear layer of the decoder.
AUTO_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"], "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
    "olmo2": ALL_PROJECTIONS, "gpt_neox": ["query_key_value"], "gpt2": ["c_attn"], "granite": ALL_PROJECTIONS,
    "cohere": ALL_PROJECTIONS, "phi": ["fc1", "fc2", "q_proj", "v_proj"], "falcon": ["query_key_value"],
    "starcoder2": ["c_fc", "c_proj", "k_proj", "o_proj", "q_proj", "v_proj"],
}


@pytest.fixture(scope="module")
def larp():
    return larp_tiny()


def text_ids(model, tokenizer) -> torch.Tensor:
    """(1, L) chat ids the base model has rows for (the tokenizer may hold more tokens than the model rows)."""
    return chat_ids(tokenizer, "What is the capital of France?").clamp(max=model.get_input_embeddings().num_embeddings
                                                                        - 1)


@torch.no_grad()
def logits(model, batch):
    return [model(input_ids=ids).logits for ids in batch]


def lora_layers(model) -> set[str]:
    """Names (in the HF model under the peft wrapper) of the modules that hold a LoRA adapter."""
    return {n.rsplit(".lora_A", 1)[0] for n, _ in hf_model(model).named_parameters() if ".lora_A." in n}


def outer_paths(model) -> list[str]:
    """Module paths of the hybrid embedding and head (the video adapter lives under them)."""
    embed, head = hybrid_modules(hf_model(model))
    return [n for n, m in hf_model(model).named_modules() if m is embed or m is head]


def generate(video_llm, fast: bool):
    with record_decisions(video_llm.vocab.num_video_tokens) as records:
        codes = generate_video_codes(video_llm, PROMPTS, cfg_scale=1.25, temperature=0.9, top_k=50, seed=4,
                                     progress=False, fast=fast)
    return codes, records


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_extends_trains_generates_reloads_and_merges(family, larp, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = family_llm(family)
    embedding_class = type(model.get_input_embeddings())
    ids = text_ids(model, tokenizer)
    with torch.no_grad():
        ref = model(ids).logits
    video_llm = extend_llm(model, tokenizer, larp, lora=SMALL_LORA)
    assert video_llm.config.lora_target_modules == AUTO_TARGETS[family]
    layers = lora_layers(video_llm.model)  # LoRA on the named decoder layers, never on the embedding/head/adapter
    assert layers and {n.rsplit(".", 1)[-1] for n in layers} == set(AUTO_TARGETS[family])
    assert not any(n.startswith(p + ".") for n in layers for p in outer_paths(video_llm.model))
    with torch.no_grad():
        new = video_llm.model.eval()(input_ids=ids).logits
    # LoRA B = 0 and the head's video rows start at the mean: the text logits are the base model's, up to the
    # rounding of the wider head GEMM (LOGIT_RTOL of the logit scale)
    assert_logits_close(new[..., : ref.shape[-1]], ref)

    trainable = {n: p for n, p in video_llm.model.named_parameters() if p.requires_grad}
    perturb_(trainable.values())  # stands in for earlier steps: every trainable tensor then gets a gradient
    before = {n: p.detach().clone() for n, p in video_llm.model.named_parameters()}
    input_ids, labels = video_batch(video_llm.tokenizer, video_llm.vocab)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3, weight_decay=0.0)
    video_llm.model.train()(input_ids=input_ids, labels=labels).loss.backward()
    optimizer.step()
    changed = {n for n, p in video_llm.model.named_parameters() if not torch.equal(p, before[n])}
    summary = video_llm.trainable_parameters()
    assert changed == set(trainable) == set(summary.names)
    assert summary.other == 0 and min(summary.lora, summary.video_adapter, summary.control_rows) > 0

    video_llm.model.eval()
    plain, plain_records = generate(video_llm, fast=False)
    fast, fast_records = generate(video_llm, fast=True)
    assert plain.shape == fast.shape == (len(PROMPTS), video_llm.vocab.num_video_tokens)
    assert 0 <= int(plain.min()) and int(plain.max()) < video_llm.vocab.codebook_size
    assert_same_samples(fast, plain, fast_records, plain_records)

    batch = check_inputs(video_llm.tokenizer, video_llm.vocab)
    want = logits(video_llm.model, batch)
    video_llm.save_pretrained(tmp_path / "bundle")
    saved = json.loads((tmp_path / "bundle" / "video_llm.json").read_text())
    assert saved["lora_target_modules"] == AUTO_TARGETS[family]
    again = VideoLLM.from_pretrained(tmp_path / "bundle", base_model=family_llm_dir(family), larp_tokenizer=larp)
    assert again.config == video_llm.config
    for w, g in zip(want, logits(again.model, batch)):
        assert torch.equal(w, g)  # the same modules with the same tensors (read back), the same shapes
    merge.main(["--model", str(tmp_path / "bundle"), "--base-model", str(family_llm_dir(family)),
                "--output-dir", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged.get_input_embeddings()) is embedding_class  # e.g. Gemma's scaled embedding, rows grown
    # LoRA folded into the weights, the video input rows computed for all K codes at once: other fp32 sums, equal
    # within 1e-5 of the logit scale
    for w, g in zip(want, logits(merged, batch)):
        assert_logits_close(g, w, rtol=1e-5)


@pytest.mark.parametrize("family", ["gemma3_text", "gpt2", "phi"])
def test_rows_adapter_across_families(family, larp, tmp_path):
    """The plain baseline (resized rows + peft trainable tokens) on a scaled embedding, a tied Conv1D model and
    a model whose layer names meet the adapter's."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = family_llm(family)
    ids = text_ids(model, tokenizer)
    with torch.no_grad():
        ref = model(ids).logits
    video_llm = extend_llm(model, tokenizer, larp, adapter="rows", lora=SMALL_LORA)
    with torch.no_grad():
        assert_logits_close(video_llm.model.eval()(input_ids=ids).logits[..., : ref.shape[-1]], ref)
    perturb_(p for p in video_llm.model.parameters() if p.requires_grad)
    batch = check_inputs(video_llm.tokenizer, video_llm.vocab)
    want = logits(video_llm.model, batch)
    video_llm.save_pretrained(tmp_path / "bundle")
    merge.main(["--model", str(tmp_path / "bundle"), "--base-model", str(family_llm_dir(family)),
                "--output-dir", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    for w, g in zip(want, logits(merged, batch)):
        assert_logits_close(g, w, rtol=1e-5)


def test_scaled_embedding_rows_are_the_same_before_and_after_merging(larp):
    """Gemma's embedding multiplies its rows by sqrt(h): the control, code and fill rows get the same factor, so the
    rows written into that module by `materialize` give what the adapter gave (before the fix: code-row norm 0.16
    before merging, 1.29 after)."""
    model, tokenizer = family_llm("gemma3_text")
    scale = embedding_row_scale(model.get_input_embeddings())
    assert torch.equal(scale, torch.tensor([8.0]))  # sqrt(h), the module's own factor
    assert embedding_row_scale(torch.nn.Embedding(10, 4)) is None
    video_llm = extend_llm(model, tokenizer, larp, lora=None)
    vocab = video_llm.vocab
    ids = torch.tensor([5, vocab.video_start_id, vocab.video_offset + 3, vocab.text_vocab_size + 1,
                        vocab.embedding_size - 1])  # text, control, code, filler, padding
    embed, _ = hybrid_modules(video_llm.model)
    with torch.no_grad():
        before = embed(ids)  # (5, h)
        assert_logits_close(before[2], embed.video.weight()[3] * 8.0)
        after = materialize(video_llm).get_input_embeddings()(ids)
    assert type(video_llm.model.get_input_embeddings()).__name__ == "Gemma3TextScaledWordEmbedding"
    assert_logits_close(after, before)  # the code row: one code vs all K at once (other GEMM shapes)


# ---- refusals: one clear error, nothing changed -------------------------------------------------------------
def state(model, tokenizer) -> dict:
    """What a refusal must leave as it was: the weights, trainable flags, modules, config and vocabulary."""
    return dict(weights={k: v.clone() for k, v in model.state_dict().items()},
                grads=[p.requires_grad for p in model.parameters()], config=model.config.to_dict(),
                modules=[type(m) for m in model.modules()], vocab=dict(tokenizer.get_vocab()), length=len(tokenizer))


def assert_unchanged(model, tokenizer, saved: dict) -> None:
    now = state(model, tokenizer)
    assert now.keys() == saved.keys() and not hasattr(model, "peft_config")
    for key in ("grads", "config", "modules", "vocab", "length"):
        assert now[key] == saved[key], key
    assert now["weights"].keys() == saved["weights"].keys()
    assert all(torch.equal(now["weights"][k], v) for k, v in saved["weights"].items())


def dory():
    from transformers import AutoModelForCausalLM, DoryConfig

    return AutoModelForCausalLM.from_config(DoryConfig(
        vocab_size=700, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, n_input_layers=1, n_output_layers=1, n_recurrent_layers=0,
        sliding_window=16, bos_token_id=1, eos_token_id=2))


def inkling():
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "inkling_text", vocab_size=700, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4,
        swa_num_key_value_heads=2, swa_head_dim=16, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, num_mtp_layers=0, bos_token_id=1, eos_token_id=2))


@pytest.mark.parametrize("build, message", [
    (dory, "DoryForCausalLM cannot be extended: its output head DoryLMHead computes more than"),
    (inkling, "InklingForCausalLM cannot be extended: the input embedding InklingNormedEmbedding transforms"),
], ids=["dory-per-row-logit-scale", "inkling-normed-embedding"])
@pytest.mark.parametrize("adapter", ["codebook", "rows"])
def test_families_that_cannot_be_extended_are_refused_untouched(build, message, adapter, larp):
    torch.manual_seed(0)
    model, tokenizer = build().eval(), sentencepiece_tokenizer()
    saved = state(model, tokenizer)
    with pytest.raises(ValueError, match=message):
        extend_llm(model, tokenizer, larp, adapter=adapter, lora=SMALL_LORA)
    assert_unchanged(model, tokenizer, saved)


class DoublingEmbedding(torch.nn.Embedding):
    """Scales its rows by 2 without an `embed_scale` attribute (peft's trainable tokens would drop the factor)."""

    def forward(self, input_ids):
        return super().forward(input_ids) * 2.0


class WrappedEmbedding(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids)


@pytest.mark.parametrize("swap, adapter, message", [
    (lambda e: WrappedEmbedding(e), "codebook", "expected its input embedding .* to be an nn.Embedding, got Wrapped"),
    (lambda e: torch.nn.Embedding(*e.weight.shape, max_norm=1.0), "codebook", "renormalises rows"),
    (lambda e: DoublingEmbedding(*e.weight.shape), "rows", "without an `embed_scale` attribute"),
], ids=["not-an-embedding", "max-norm", "rows-adapter-on-an-unmarked-scale"])
def test_embeddings_that_cannot_be_extended_are_refused_untouched(swap, adapter, message, larp):
    model, tokenizer = tiny_llm("llama")
    model.set_input_embeddings(swap(model.get_input_embeddings()))
    saved = state(model, tokenizer)
    with pytest.raises(ValueError, match=message):
        extend_llm(model, tokenizer, larp, adapter=adapter, lora=SMALL_LORA)
    assert_unchanged(model, tokenizer, saved)


def test_an_unmarked_scale_works_with_the_codebook_adapter(larp):
    model, tokenizer = tiny_llm("llama")
    model.set_input_embeddings(DoublingEmbedding.from_pretrained(model.get_input_embeddings().weight, freeze=False))
    ids = text_ids(model, tokenizer)
    with torch.no_grad():
        ref = model(ids).logits
    video_llm = extend_llm(model, tokenizer, larp, lora=None)
    perturb_(p for p in video_llm.model.parameters() if p.requires_grad)
    embed, _ = hybrid_modules(video_llm.model)
    assert torch.equal(embed.row_scale, torch.tensor([2.0]))
    batch = [torch.cat([ids, check_inputs(video_llm.tokenizer, video_llm.vocab)[0]], dim=1)]
    want = logits(video_llm.model, batch)
    assert_logits_close(want[0][:, : ids.shape[1], : ref.shape[-1]], ref)
    merged = materialize(video_llm)
    assert type(merged.get_input_embeddings()) is DoublingEmbedding
    assert_logits_close(logits(merged, batch)[0], want[0])


# ---- LoRA targets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, requested, expected", [
    ("gpt2", "all-linear", ["c_attn", "c_fc", "c_proj"]),  # Conv1D projections, not the tied lm_head
    ("gpt2", ["all-linear"], ["c_attn", "c_fc", "c_proj"]),  # the CLI / YAML form
    ("phi3", "auto", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),  # no peft default: every linear layer
    ("llama", None, ["q_proj", "v_proj"]),  # peft's default (None = auto)
    ("llama", ["k_proj", "down_proj"], ["k_proj", "down_proj"]),  # a user list wins
    ("gpt_neox", r".*\.query_key_value", r".*\.query_key_value"),  # peft's regex form
])
def test_lora_targets_follow_the_architecture(family, requested, expected):
    model, _ = family_llm(family)
    assert resolve_lora_targets(model, requested) == expected


def test_adapter_layers_are_never_lora_targets(larp):
    """Phi names its MLP layers fc1 / fc2 like the video adapter's MLP: LoRA lands on the decoder's only."""
    model, tokenizer = family_llm("phi")
    video_llm = extend_llm(model, tokenizer, larp, lora=dict(SMALL_LORA, target_modules=["fc1"]))
    layers = lora_layers(video_llm.model)
    assert layers == {f"model.layers.{i}.mlp.fc1" for i in range(2)}
    assert video_llm.config.lora_target_modules == ["fc1"]
    assert all(p.requires_grad for p in hybrid_modules(hf_model(video_llm.model))[0].video.parameters())


@pytest.mark.parametrize("targets, message", [
    (["fc1"], "'fc1' matches no layer of LlamaForCausalLM's decoder; its linear layers are"),  # the adapter's
    (["q_proj", "qq_proj"], "'qq_proj' matches no layer"),
    (["lm_head"], "matches the input embedding / output head"),
    (["embed_tokens"], "matches the input embedding / output head"),
    (["mlp"], r"matches model.layers.0.mlp \(LlamaMLP\), which LoRA cannot adapt"),
    ("q_proj(", "not a valid regular expression"),
    ([], "non-empty module names"),
])
def test_wrong_lora_targets_are_refused_untouched(targets, message, larp):
    model, tokenizer = tiny_llm("llama")
    saved = state(model, tokenizer)
    with pytest.raises(ValueError, match=message):
        extend_llm(model, tokenizer, larp, lora=dict(SMALL_LORA, target_modules=targets))
    assert_unchanged(model, tokenizer, saved)


def test_bundles_without_recorded_targets_still_load(larp, tmp_path):
    model, tokenizer = family_llm("gpt2")
    video_llm = extend_llm(model, tokenizer, larp, lora=SMALL_LORA)
    video_llm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "video_llm.json").read_text())
    assert config["lora_target_modules"] == ["c_attn"]
    del config["lora_target_modules"]  # a bundle written before the field existed
    (tmp_path / "video_llm.json").write_text(json.dumps(config))
    again = VideoLLM.from_pretrained(tmp_path, base_model=family_llm_dir("gpt2"))
    assert again.config.lora_target_modules is None
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(again.model)} == {"c_attn"}  # peft's own record
