"""Losses and the discriminator (larp-spec 3.1)."""
import math

import pytest
import torch

from larp_mllm import LARPTokenizer
from larp_mllm.eval.perceptual import build_perceptual
from tokenizer_training.arguments import LossArguments
from tokenizer_training.discriminator import DiscriminatorConfig, TransformerDiscriminator
from tokenizer_training.losses import (
    LeCamEMA, TokenizerLoss, d_loss_ns_smooth, g_loss_nonsaturating, lecam_regularizer,
)


def tiny_disc(**kw) -> TransformerDiscriminator:
    cfg = dict(input_size=32, frame_num=8, dim=32, depth=2, num_heads=4)
    cfg.update(kw)
    return TransformerDiscriminator(DiscriminatorConfig(**cfg))


def test_discriminator_reference_size_and_shapes():
    torch.manual_seed(0)
    big = TransformerDiscriminator(DiscriminatorConfig(dim=512, depth=12, num_heads=8))
    assert sum(p.numel() for p in big.parameters()) / 1e6 == pytest.approx(38.2, abs=0.05)  # larp-spec 1.5
    d = tiny_disc()
    logits = d(torch.rand(3, 3, 8, 32, 32))
    assert logits.shape == (3,)
    assert d.cls_token.abs().sum() > 0  # xavier, not zeros
    assert d.norm.eps == 1e-6
    assert torch.all(d.head.bias == 0)
    assert not d.pos_embed.requires_grad
    with pytest.raises(ValueError, match="divisible"):
        DiscriminatorConfig(input_size=30)


def test_ns_smooth_matches_its_definition():
    real, fake = torch.randn(64), torch.randn(64)
    torch.manual_seed(3)
    got = d_loss_ns_smooth(real, fake, noise=0.15)
    torch.manual_seed(3)
    t_real = (1 - torch.randn(64).abs() * 0.15).clamp(min=0.7)
    t_fake = (torch.randn(64).abs() * 0.15).clamp(max=0.3)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert torch.allclose(got, bce(real, t_real) + bce(fake, t_fake))
    # clamps: huge noise pins the targets at 0.7 / 0.3
    logits = torch.zeros(8)
    huge = d_loss_ns_smooth(logits + 2.0, logits - 2.0, noise=100.0)
    expect = bce(logits + 2.0, torch.full((8,), 0.7)) + bce(logits - 2.0, torch.full((8,), 0.3))
    assert torch.allclose(huge, expect)


def test_generator_loss_is_non_saturating():
    x = torch.tensor([-3.0, 0.0, 3.0], requires_grad=True)
    loss = g_loss_nonsaturating(x)
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(x).mean().item())
    loss.backward()
    assert x.grad[0].abs() > x.grad[2].abs()  # strong gradient where D says "fake"


def test_lecam_regularizer_and_weight_switch():
    ema = LeCamEMA(real=1.0, fake=-1.0, decay=0.9)
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -2.0])
    # relu(real - ema_fake)^2 = [1, 9] -> 5 ; relu(ema_real - fake)^2 = [1, 9] -> 5
    assert lecam_regularizer(real, fake, ema).item() == pytest.approx(10.0)
    ema.update(3.0, -3.0)
    assert (ema.real, ema.fake) == pytest.approx((1.2, -1.2))
    intended = TokenizerLoss(LossArguments(perceptual_backend="none"))
    buggy = TokenizerLoss(LossArguments(perceptual_backend="none", lecam_reference_double_weight=True))
    assert intended.lecam_weight == pytest.approx(1e-3)
    assert buggy.lecam_weight == pytest.approx(1e-6)


def test_tokenizer_loss_weights_and_gradients(tiny_tokenizer):
    tok = tiny_tokenizer.train()
    torch.manual_seed(0)
    video = torch.rand(2, 3, 8, 32, 32)
    out = tok(video, ss_ratio=0.2)
    args = LossArguments(perceptual_backend="none", gan_weight=0.3, vq_weight=0.1, prior_weight=0.06)
    loss_fn = TokenizerLoss(args)
    d = tiny_disc()
    d.requires_grad_(False)
    g = loss_fn.generator(video, out, d(out.recon))
    expect = g.l1 + 0.3 * g.gan + 0.1 * g.vq + 0.06 * g.prior
    assert g.total.item() == pytest.approx(expect.item(), rel=1e-5)
    assert g.l1.item() == pytest.approx((video - out.recon).abs().mean().item(), rel=1e-6)
    assert g.l2.item() == pytest.approx((video - out.recon).square().mean().item(), rel=1e-6)
    # the squared-error term (the CPU config's reconstruction loss) enters the total with its weight
    g2 = TokenizerLoss(LossArguments(perceptual_backend="none", l1_weight=0.0, l2_weight=2.0, vq_weight=0.1,
                                     prior_weight=0.06)).generator(video, out)
    assert g2.total.item() == pytest.approx((2.0 * g2.l2 + 0.1 * g2.vq + 0.06 * g2.prior).item(), rel=1e-5)
    assert g.prior.item() > math.log(tok.codebook_size) * 0.3  # a real CE, not a placeholder
    g.total.backward()
    assert tok.final_layer.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())  # D frozen during the generator step
    # discriminator step: gradients reach D only, through the detached reconstruction
    d.requires_grad_(True)
    tok.zero_grad()
    dl = loss_fn.discriminator(d, video, out.recon, LeCamEMA())
    dl.total.backward()
    assert d.head.weight.grad.abs().sum() > 0
    assert tok.final_layer.linear.weight.grad is None or tok.final_layer.linear.weight.grad.abs().sum() == 0


def test_perceptual_backend_none_and_stlpips():
    assert build_perceptual("none") is None
    net = build_perceptual("stlpips")
    assert not any(p.requires_grad for p in net.parameters())
    a = torch.rand(1, 3, 2, 32, 32)
    loss_fn = TokenizerLoss(LossArguments(perceptual_backend="stlpips"), net)
    recon = (a + 0.1 * torch.randn_like(a)).requires_grad_(True)
    from larp_mllm import TokenizerOutput

    out = TokenizerOutput(recon=recon, codes=torch.zeros(1, 4, dtype=torch.long), commit_loss=torch.tensor(0.0),
                          codebook_loss=torch.tensor(0.0), vq_loss=torch.tensor(0.0))
    g = loss_fn.generator(a, out)
    assert g.perceptual > 0
    g.total.backward()
    assert recon.grad.abs().sum() > 0
    same = TokenizerOutput(recon=a.clone(), codes=out.codes, commit_loss=out.commit_loss,
                           codebook_loss=out.codebook_loss, vq_loss=out.vq_loss)
    assert loss_fn.generator(a, same).perceptual.item() == pytest.approx(0.0, abs=1e-6)


def test_code_entropy_loss_rewards_confident_spread_codes():
    from larp_mllm.model.quantizer import code_entropy_loss

    k, t = 8, 0.01
    codebook = torch.eye(k)
    spread = codebook.repeat(4, 1)[None]  # (1, 32, 8): every code used equally, each token on a code
    collapsed = codebook[:1].repeat(32, 1)[None]  # every token on code 0
    blurry = torch.zeros(1, 32, k)  # every token equally close to every code
    assert code_entropy_loss(spread, t).item() == pytest.approx(-math.log(k), abs=1e-4)
    assert code_entropy_loss(collapsed, t).item() == pytest.approx(0.0, abs=1e-4)
    assert code_entropy_loss(blurry, t).item() == pytest.approx(0.0, abs=1e-5)
    # against the definition on random affinities
    cos = torch.rand(2, 5, k) * 2 - 1
    p = torch.softmax(cos / 0.1, -1)
    mean_p = p.reshape(-1, k).mean(0)
    expect = -(p * p.log()).sum(-1).mean() + (mean_p * mean_p.log()).sum()
    assert code_entropy_loss(cos, 0.1).item() == pytest.approx(expect.item(), rel=1e-5)


def test_entropy_term_enters_the_total_and_reaches_the_encoder(tiny_tokenizer):
    tok = tiny_tokenizer.train()
    torch.manual_seed(0)
    video = torch.rand(2, 3, 8, 32, 32)
    assert tok(video).entropy_loss is None  # off unless a temperature is given
    out = tok(video, entropy_temperature=0.05)
    args = LossArguments(perceptual_backend="none", vq_weight=0.1, prior_weight=0.06, entropy_weight=0.5,
                         entropy_temperature=0.05)
    g = TokenizerLoss(args).generator(video, out)
    assert g.entropy.item() == pytest.approx(out.entropy_loss.item())
    assert g.total.item() == pytest.approx((g.l1 + 0.1 * g.vq + 0.06 * g.prior + 0.5 * g.entropy).item(), rel=1e-5)
    tok.zero_grad()
    out.entropy_loss.backward()
    assert tok.bottleneck.in_linear.weight.grad.abs().sum() > 0  # through the affinities
    assert tok.bottleneck.regularizer.embedding.weight.grad.abs().sum() > 0
    assert tok.final_layer.linear.weight.grad is None or tok.final_layer.linear.weight.grad.abs().sum() == 0
