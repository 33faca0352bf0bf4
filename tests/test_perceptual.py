"""Perceptual distance: ST-LPIPS from the shipped weights, standard LPIPS-VGG from user files, clear errors."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from larp_mllm.assets import stlpips_weights
from larp_mllm.eval.perceptual import PerceptualConfig, build_perceptual, load_perceptual

_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


@pytest.fixture(scope="module")
def stlpips_vgg():
    return load_perceptual()


def _tv_vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 ``features`` layout (conv/ReLU pairs, 2x2/2 max pools), random weights."""
    layers, ch = [], 3
    for v in _VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU(inplace=True)]
            ch = v
    return nn.Sequential(*layers)


@pytest.fixture
def stlpips_package(monkeypatch):
    """The stlpips-pytorch package itself, importable without torchvision/IPython/torchsummary (stubbed)."""
    vgg = types.SimpleNamespace(vgg16=lambda pretrained=False: types.SimpleNamespace(features=_tv_vgg16_features()))
    for name, attrs in {"torchvision": {"models": vgg}, "IPython": {"embed": None},
                        "torchsummary": {"summary": None}}.items():
        module = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(module, k, v)
        monkeypatch.setitem(sys.modules, name, module)
    for name in [m for m in sys.modules if m.startswith("stlpips_pytorch")]:
        monkeypatch.delitem(sys.modules, name)
    from stlpips_pytorch import stlpips

    return stlpips


def test_stlpips_checkpoint_holds_the_whole_network():
    state = torch.load(stlpips_weights("vgg"), map_location="cpu", weights_only=True)
    assert any(k.startswith("net.slice5.") for k in state), "backbone weights are inside the ST-LPIPS checkpoint"
    assert {f"lin{k}.model.1.weight" for k in range(5)} <= set(state)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_matches_the_stlpips_package(stlpips_package, net):
    ref = stlpips_package.LPIPS(net=net, variant="shift_tolerant", verbose=False).eval()
    ours = load_perceptual(net=net)
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 48, 48, generator=gen)
    b = (a + 0.1 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(a, b), ref(a, b, normalize=True).flatten(), atol=1e-6, rtol=1e-5)


def test_standard_lpips_vgg_from_user_files(stlpips_package, tmp_path):
    torch.manual_seed(0)
    features = _tv_vgg16_features()
    tv_state = {f"features.{k}": v for k, v in features.state_dict().items()}
    tv_state["classifier.0.weight"] = torch.randn(4, 4)  # the full torchvision state dict has a classifier
    torch.save(tv_state, tmp_path / "vgg16-397923af.pth")
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) * 0.1 for k, c in enumerate([64, 128, 256, 512, 512])}
    torch.save(lins, tmp_path / "vgg.pth")
    ours = load_perceptual([tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth"])
    assert ours.config == PerceptualConfig("lpips", "vgg")
    torch.testing.assert_close(getattr(ours.net.slice2, "5").weight, tv_state["features.5.weight"])
    # the reference network (lpips / stlpips vanilla LPIPS) with the same weights
    ref = stlpips_package.LPIPS(net="vgg", pretrained=False, verbose=False)
    ref_state = ref.state_dict()
    for key in ref_state:
        if key.startswith("net.slice"):
            _, _, idx, rest = key.split(".", 3)
            ref_state[key] = tv_state[f"features.{idx}.{rest}"]
        elif key.startswith("lin"):  # LPIPS registers each head twice: lin0.* and lins.0.*
            k = key.split(".")[1] if key.startswith("lins.") else key.split(".")[0][3:]
            ref_state[key] = lins[f"lin{k}.model.1.weight"]
    ref.load_state_dict(ref_state)
    ref.eval()
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(a, b), ref(a, b, normalize=True).flatten(), atol=1e-6, rtol=1e-5)
    # one file holding a whole lpips.LPIPS(net='vgg') state dict works too
    torch.save(ref.state_dict(), tmp_path / "lpips_vgg.pth")
    single = build_perceptual("lpips-vgg", tmp_path / "lpips_vgg.pth")
    with torch.no_grad():
        torch.testing.assert_close(single(a, b), ours(a, b))


def test_distance_behaviour_and_gradients(stlpips_vgg):
    gen = torch.Generator().manual_seed(1)
    video = torch.rand(2, 3, 2, 24, 24, generator=gen)  # (B, 3, T, H, W)
    noise = torch.randn(video.shape, generator=gen)
    # the two inputs sit at two places of one batch, which conv kernels may round apart (~1e-7 on unit-norm features,
    # ~1e-14 once squared); a 1e-3 pixel noise already gives a distance of ~1e-6
    torch.testing.assert_close(stlpips_vgg(video, video), torch.zeros(2), atol=1e-9, rtol=0)
    small = stlpips_vgg(video, (video + 0.02 * noise).clamp(0, 1))
    large = stlpips_vgg(video, (video + 0.3 * noise).clamp(0, 1))
    assert small.shape == (2,) and torch.all(small > 0) and torch.all(large > small)
    frames = [stlpips_vgg(video[:, :, t], (video + 0.3 * noise).clamp(0, 1)[:, :, t]) for t in range(2)]
    torch.testing.assert_close(large, torch.stack(frames, 1).mean(1))  # per-video = mean over frames
    assert not any(p.requires_grad for p in stlpips_vgg.parameters()) and not stlpips_vgg.training
    recon = (video + 0.1 * noise).clamp(0, 1).requires_grad_(True)
    stlpips_vgg(recon, video).sum().backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0  # usable as a training loss


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_perceptual(tmp_path / "missing.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable weight file"):
        load_perceptual(tmp_path / "corrupt.pth")
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing"):
        load_perceptual(tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="needs weights"):
        build_perceptual("lpips-vgg")
    with pytest.raises(ValueError, match="backend"):
        build_perceptual("squeeze")
    net = load_perceptual()
    with pytest.raises(ValueError, match="equal shape"):
        net(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="at least 24x24"):
        net(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
