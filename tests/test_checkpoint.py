"""Checkpoint folders: the reference implementation's (fixture + synthetic configs) and ours."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from larp_mllm import LARPTokenizer
from larp_mllm.model.layers import get_1d_sincos_pos_embed, get_3d_sincos_pos_embed

REFERENCE_DOC_KEYS = """encoder_latent_query_embed decoder_patch_query_token_type_embed encoder_patch_pe decoder_latent_pe
decoder_patch_query_embed x_embedder.proj.weight x_embedder.proj.bias bottleneck.in_linear.weight
bottleneck.in_linear.bias bottleneck.out_linear.weight bottleneck.out_linear.bias
bottleneck.regularizer.embedding.weight final_layer.norm_final.weight final_layer.norm_final.bias
final_layer.linear.weight final_layer.linear.bias prior_model.pos_emb prior_model.input_proj.weight
prior_model.input_proj.bias prior_model.ln_f.weight prior_model.ln_f.bias prior_model.head.weight
prior_model.head.bias""".split()
VIT_BLOCK = "norm1.weight norm1.bias attn.qkv.weight attn.proj.weight attn.proj.bias norm2.weight norm2.bias " \
            "mlp.fc1.weight mlp.fc1.bias mlp.fc2.weight mlp.fc2.bias".split()
PRIOR_BLOCK = "ln1.weight ln1.bias ln2.weight ln2.bias attn.key.weight attn.key.bias attn.query.weight " \
              "attn.query.bias attn.value.weight attn.value.bias attn.proj.weight attn.proj.bias mlp.0.weight " \
              "mlp.0.bias mlp.2.weight mlp.2.bias".split()


def reference_key_set(enc_depth: int, dec_depth: int, prior_depth: int) -> set[str]:
    keys = set(REFERENCE_DOC_KEYS)
    keys |= {f"encoder.blocks.{i}.{k}" for i in range(enc_depth) for k in VIT_BLOCK}
    keys |= {f"decoder.blocks.{i}.{k}" for i in range(dec_depth) for k in VIT_BLOCK}
    keys |= {f"prior_model.blocks.{i}.{k}" for i in range(prior_depth) for k in PRIOR_BLOCK}
    return keys


@torch.no_grad()
def test_fixture_outputs_are_reproduced(reference_fixture):
    """Fixture A: the reference's outputs from its own checkpoint. Codes exactly (an argmax over well-separated code
    similarities); floats within 1e-4 absolute (fp32 on the CPU; different kernels round differently)."""
    tok = LARPTokenizer.from_pretrained(reference_fixture).eval()
    exp = load_file(str(reference_fixture / "expected_outputs.safetensors"))
    codes = tok.tokenize(exp["video"], deterministic=True)
    assert torch.equal(codes, exp["codes"])
    # exact codes are a fair demand: every token's best code beats the runner-up by far more than rounding moves
    cos = torch.nn.functional.normalize(tok.bottleneck.in_linear(tok.encode(exp["video"])), dim=-1) @ \
        tok.codebook().t()  # (B, N, K)
    top2 = cos.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4
    q = tok.quantize(tok.encode(exp["video"]), deterministic=True)
    encoded = tok.bottleneck.out_linear(q.quantized)  # (B, N, D): the decoder-side latents
    torch.testing.assert_close(encoded, exp["encoded"], atol=1e-4, rtol=0)
    torch.testing.assert_close(tok.decode_latents(encoded), exp["recon"], atol=1e-4, rtol=0)
    torch.testing.assert_close(tok.decode_codes(exp["codes"]), exp["decoded_from_codes"], atol=1e-4, rtol=0)
    # teacher-forced prior logits for positions 1..N-1 (the fixture was made with the reference's eval-time prior
    # attention dropout switched off, as ours is in eval)
    torch.testing.assert_close(tok.prior_logits(exp["codes"]), exp["prior_logits"], atol=1e-4, rtol=0)


def test_fixed_embeddings_equal_the_reference_buffers(reference_fixture):
    """Our sin-cos buffers (used by from_preset) are the reference's, so fresh models match its init."""
    state = load_file(str(reference_fixture / "model.safetensors"))
    tok = LARPTokenizer.from_pretrained(reference_fixture)
    d = tok.config.encoder_hidden_size
    grid = tok.config.patch_grid
    torch.testing.assert_close(get_3d_sincos_pos_embed(d, *grid), state["encoder_patch_pe"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(get_3d_sincos_pos_embed(d, *grid), state["decoder_patch_query_embed"][0],
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(get_1d_sincos_pos_embed(d, tok.num_tokens), state["decoder_latent_pe"][0],
                               atol=1e-6, rtol=0)


def test_fixture_keys_are_the_reference_layout(reference_fixture):
    state = load_file(str(reference_fixture / "model.safetensors"))
    assert set(state) == reference_key_set(2, 2, 6)


def test_larp_l_long_state_dict_matches_reference_doc():
    with torch.device("meta"):
        tok = LARPTokenizer.from_preset("larp-l-long")
    sd = tok.state_dict()
    assert set(sd) == reference_key_set(12, 12, 12)
    shapes = {
        "encoder_latent_query_embed": (1024, 768), "decoder_patch_query_token_type_embed": (1, 1, 768),
        "encoder_patch_pe": (1, 1024, 768), "decoder_latent_pe": (1, 1024, 768),
        "decoder_patch_query_embed": (1, 1024, 768), "x_embedder.proj.weight": (768, 3, 4, 8, 8),
        "encoder.blocks.0.attn.qkv.weight": (2304, 768), "encoder.blocks.0.mlp.fc1.weight": (3072, 768),
        "bottleneck.in_linear.weight": (16, 768), "bottleneck.out_linear.weight": (768, 16),
        "bottleneck.regularizer.embedding.weight": (8192, 16), "final_layer.linear.weight": (768, 768),
        "prior_model.pos_emb": (1, 1024, 384), "prior_model.input_proj.weight": (384, 16),
        "prior_model.blocks.0.mlp.0.weight": (1536, 384), "prior_model.head.weight": (16, 384),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k


def write_reference_folder(folder: Path, base_config: dict, **changes) -> dict:
    """A reference-format folder for a modified config, with weights of the right layout (random)."""
    cfg = copy.deepcopy(base_config)
    reg = cfg["bottleneck"]["args"]["regularizer"]["args"]
    for k, v in changes.items():
        if k in ("codebook_size",):
            reg[k] = v
        elif k == "bottleneck_dim":
            cfg["bottleneck"]["args"][k] = v
        elif k == "prior_name":
            cfg["prior_model"]["name"] = v
        else:
            cfg[k] = v
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    # Build the weights with our own model under the reference key names, then perturb them all.
    from larp_mllm.model.checkpoint import config_from_reference

    model = LARPTokenizer(config_from_reference(cfg))
    torch.manual_seed(1)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return state


@pytest.mark.parametrize(
    "changes",
    [
        dict(bottleneck_token_num=24, encoder_hidden_size=48, decoder_hidden_size=32, encoder_num_heads=3,
             decoder_num_heads=2, encoder_depth=1, decoder_depth=3),
        dict(codebook_size=100, bottleneck_dim=4, prior_name="gptc-XS"),
        dict(input_size=48, frame_num=12, patch_size=16, decoder_patch_size=16, temporal_patch_size=3,
             decoder_temporal_patch_size=3),
        dict(prior_name="none"),
    ],
)
def test_reference_format_with_other_options_loads(tmp_path, reference_fixture, changes):
    base = json.loads((reference_fixture / "config.json").read_text())
    state = write_reference_folder(tmp_path / "ckpt", base, **changes)
    tok = LARPTokenizer.from_pretrained(tmp_path / "ckpt").eval()
    for k, v in tok.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.rand(1, *tok.video_shape)
    assert tok.decode_codes(tok.tokenize(x)).shape == x.shape


@pytest.mark.parametrize(
    "option, value",
    [
        ("learned_encoder_patch_pe", True),
        ("use_encoder_patch_token_type_embed", True),
        ("transformer_name", "transformer_encoder_fused"),
        ("bogus_option", 1),
    ],
)
def test_unsupported_reference_options_are_refused(tmp_path, reference_fixture, option, value):
    cfg = json.loads((reference_fixture / "config.json").read_text())
    cfg[option] = value
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "c" / "model.safetensors").write_bytes((reference_fixture / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=re.escape(option)):
        LARPTokenizer.from_pretrained(tmp_path / "c")


def test_nested_reference_options_are_refused(tmp_path, reference_fixture):
    cfg = json.loads((reference_fixture / "config.json").read_text())
    cfg["bottleneck"]["args"]["regularizer"]["args"]["entropy_loss_weight"] = 0.1
    cfg["prior_model"]["no_grad_before_last_round"] = True
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="entropy_loss_weight.*no_grad_before_last_round"):
        LARPTokenizer.from_pretrained(tmp_path / "c")


def test_reference_prior_schedule_is_honoured(reference_fixture):
    """The reference's scheduled-sampling schedule and prior temperature land in our config (the trainer starting
    from such a checkpoint trains with them unless told otherwise); values we cannot use are refused."""
    from larp_mllm.model.checkpoint import config_from_reference

    cfg = json.loads((reference_fixture / "config.json").read_text())
    cfg["prior_model"].update(mix_ss_max_ratio=0.2, mix_ss_peak_steps_ratio=0.1, latent_ce_temperature=0.5)
    ours = config_from_reference(cfg)
    assert (ours.ss_max_ratio, ours.ss_peak_fraction, ours.prior_ce_temperature) == (0.2, 0.1, 0.5)
    cfg["prior_model"]["mix_ss_max_ratio"] = 1.5
    with pytest.raises(ValueError, match=r"ss_max_ratio must be in \[0, 1\]"):
        config_from_reference(cfg)


def test_save_load_round_trip(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    again = LARPTokenizer.from_pretrained(tmp_path / "tok").eval()
    assert again.config == tiny_tokenizer.config
    for (k, a), (_, b) in zip(tiny_tokenizer.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.rand(2, *tiny_tokenizer.video_shape)
    assert torch.equal(tiny_tokenizer.tokenize(x), again.tokenize(x))
    assert again.codebook_hash() == tiny_tokenizer.codebook_hash()
    # saving over an existing folder replaces it atomically
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    assert LARPTokenizer.from_pretrained(tmp_path / "tok").codebook_hash() == tiny_tokenizer.codebook_hash()


def test_missing_and_corrupt_files(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="not found"):
        LARPTokenizer.from_pretrained(tmp_path / "nope")
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    weights = tmp_path / "tok" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read"):
        LARPTokenizer.from_pretrained(tmp_path / "tok")
    weights.unlink()
    (tmp_path / "tok" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        LARPTokenizer.from_pretrained(tmp_path / "tok")


def test_mismatched_weights_give_one_clear_error(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())
    cfg["codebook_size"] = 128
    (tmp_path / "tok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bottleneck.regularizer.embedding.weight"):
        LARPTokenizer.from_pretrained(tmp_path / "tok")
