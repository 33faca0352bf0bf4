"""Perceptual distance (LPIPS family), shared by the tokenizer losses and the reconstruction metrics.

Two backends, one module (``PerceptualDistance``):

* **ST-LPIPS** (offline default): the shift-tolerant LPIPS of Ghildyal & Liu (ECCV 2022), whose weights ship in the
  ``stlpips-pytorch`` package (``weights/vST0.0/{vgg,alex}_shift_tolerant.pth``; found by
  ``larp_mllm.assets.stlpips_weights``). Those checkpoints hold the whole network: the anti-aliased backbone
  (convs, the fixed [1, 2, 1]^2 blur filters) and the five linear heads. The backbone is rebuilt here from the
  package's source facts (``invariant_networks.py``, ``models_lpf/vgg.py``, ``models_lpf/downsample.py``) without
  importing it (it imports torchvision and IPython): VGG16 "D" where every 2x2/2 max pool becomes a 2x2/1 max
  pool + reflect-pad 2 + 3x3 binomial blur with stride 2; AlexNet with stride-1 convs followed by the same blur.
* **LPIPS-VGG** (what the LARP reference trains and reports with, ``lpips.LPIPS(net='vgg')``): pass the two weight
  files yourself: torchvision's ImageNet VGG16 (``vgg16-397923af.pth``, i.e.
  ``torchvision.models.VGG16_Weights.IMAGENET1K_V1``; the full state dict or only ``features``) and the lpips
  package's ``lpips/weights/v0.1/vgg.pth`` (keys ``lin0.model.1.weight`` ...). Either may be safetensors or a torch
  file (read with ``torch.load(weights_only=True)``).

Both: inputs in [0, 1] (mapped to [-1, 1], then LPIPS's ScalingLayer), features of five ReLU stages unit-normalised
over channels, squared differences weighted by the 1x1 linear heads, spatially averaged and summed -> one distance
per image. Frozen (no parameter requires grad) and in eval mode; gradients still flow to the inputs, so the same
module is the training loss. Videos (B, 3, T, H, W) are scored per frame and averaged over frames -> (B,).
ST-LPIPS needs frames of at least 24x24 (the reflect pads of its last blur stages), LPIPS 16x16.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_VGG_CHANNELS = (64, 128, 256, 512, 512)
_ALEX_CHANNELS = (64, 192, 384, 256, 256)


@dataclass(frozen=True)
class PerceptualConfig:
    """backend: 'stlpips' (shift-tolerant, weights shipped) or 'lpips' (standard LPIPS, user weights).
    net: 'vgg' or 'alex' ('alex' only for stlpips)."""

    backend: str = "stlpips"
    net: str = "vgg"

    def __post_init__(self):
        if self.backend not in ("stlpips", "lpips"):
            raise ValueError(f"backend must be 'stlpips' or 'lpips', got {self.backend!r}")
        if self.net not in ("vgg", "alex") or (self.backend == "lpips" and self.net != "vgg"):
            raise ValueError(f"net must be 'vgg' (or 'alex' for stlpips), got {self.net!r} for {self.backend}")


class BlurDownsample(nn.Module):
    """Reflect-pad 2 then a depthwise 3x3 binomial ([1,2,1] outer [1,2,1] / 16) blur with stride 2 (ST-LPIPS)."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([1.0, 2.0, 1.0])
        filt = (a[:, None] * a[None, :]) / 16.0
        self.register_buffer("filt", filt[None, None].repeat(channels, 1, 1, 1))  # (C, 1, 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


def _vgg_layers(shift_tolerant: bool) -> list[nn.Module]:
    """VGG16 'D' feature layers up to relu5_3, numbered as in torchvision / models_lpf."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG:
        if v == "M":
            if shift_tolerant:
                layers += [nn.MaxPool2d(2, stride=1), BlurDownsample(in_ch)]
            else:
                layers += [nn.MaxPool2d(2, stride=2)]
        else:
            layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU()]
            in_ch = v
    return layers


def _alex_st_layers() -> list[nn.Module]:
    """Shift-tolerant AlexNet feature layers up to relu5 (stlpips ``invariant_networks.alexnet``)."""
    return [
        nn.Conv2d(3, 64, 11, stride=1, padding=2), BlurDownsample(64), nn.ReLU(),
        nn.MaxPool2d(3, stride=1), BlurDownsample(64), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, stride=1), BlurDownsample(192), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    ]


def _slice_bounds(config: PerceptualConfig) -> list[int]:
    """Layer indices where the five feature stages end (exclusive)."""
    if config.net == "alex":
        return [3, 7, 11, 13, 15]
    return [4, 10, 18, 26, 34] if config.backend == "stlpips" else [4, 9, 16, 23, 30]


class Backbone(nn.Module):
    """Five sequential slices; forward returns the five stage activations (keys net.sliceK.IDX.* as LPIPS)."""

    def __init__(self, config: PerceptualConfig):
        super().__init__()
        if config.net == "alex":
            layers = _alex_st_layers()
        else:
            layers = _vgg_layers(config.backend == "stlpips")
        start = 0
        for k, end in enumerate(_slice_bounds(config), start=1):
            block = nn.Sequential()
            for idx in range(start, end):
                block.add_module(str(idx), layers[idx])
            setattr(self, f"slice{k}", block)
            start = end

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)  # (N, C_k, H_k, W_k)
        return feats


class NetLinLayer(nn.Module):
    """LPIPS 1x1 linear head (``model.1`` because LPIPS puts a Dropout at index 0; a no-op in eval)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class PerceptualDistance(nn.Module):
    """LPIPS-style distance. forward(a, b): images (N, 3, H, W) -> (N,), or videos (B, 3, T, H, W) -> (B,)
    (mean over frames). Inputs in [0, 1]."""

    def __init__(self, config: PerceptualConfig = PerceptualConfig()):
        super().__init__()
        self.config = config
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.net = Backbone(config)
        channels = _ALEX_CHANNELS if config.net == "alex" else _VGG_CHANNELS
        self.lins = nn.ModuleList([NetLinLayer(c) for c in channels])

    def image_distance(self, a: Tensor, b: Tensor) -> Tensor:
        """a, b: (N, 3, H, W) in [0, 1] -> (N,)."""
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(f"expected two (N, 3, H, W) images of equal shape, got {tuple(a.shape)}, {tuple(b.shape)}")
        min_size = 24 if self.config.backend == "stlpips" else 16  # reflect pads / pools of the last stages
        if min(a.shape[-2:]) < min_size:
            raise ValueError(f"{self.config.backend} needs frames of at least {min_size}x{min_size}, got "
                             f"{tuple(a.shape[-2:])}")
        n = a.shape[0]
        x = torch.cat([a, b]).to(self.shift.dtype) * 2.0 - 1.0  # (2N, 3, H, W) in [-1, 1]
        feats = self.net((x - self.shift) / self.scale)
        total = x.new_zeros(n)
        for feat, lin in zip(feats, self.lins):
            feat = feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit norm over channels
            diff = (feat[:n] - feat[n:]).pow(2)  # (N, C, h, w)
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.ndim == 4:
            return self.image_distance(a, b)
        if a.ndim != 5 or a.shape != b.shape:
            raise ValueError(f"expected images (N,3,H,W) or videos (B,3,T,H,W) of equal shape, got "
                             f"{tuple(a.shape)}, {tuple(b.shape)}")
        bsz, c, t, h, w = a.shape
        frames_a = a.transpose(1, 2).reshape(bsz * t, c, h, w)  # (B*T, 3, H, W)
        frames_b = b.transpose(1, 2).reshape(bsz * t, c, h, w)
        return self.image_distance(frames_a, frames_b).view(bsz, t).mean(dim=1)  # (B,)


def _read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """safetensors or a torch file (weights_only) -> flat tensor dict; clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perceptual weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable weight file (safetensors or torch state dict): {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return dict(state)


def _normalise_keys(state: dict[str, Tensor], config: PerceptualConfig) -> dict[str, Tensor]:
    """Map the key layouts we accept onto ours.

    LPIPS / stlpips module state dicts: ``scaling_layer.{shift,scale}`` -> ``{shift,scale}``, ``linK.model.1.*`` ->
    ``lins.K.model.1.*``, ``net.sliceK.IDX.*`` kept. torchvision VGG16: ``features.IDX.*`` (or bare ``IDX.*``) ->
    ``net.sliceK.IDX.*``; ``classifier.*`` dropped.
    """
    bounds = _slice_bounds(config)
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if key.startswith("classifier."):
            continue
        if key.startswith("scaling_layer."):
            key = rest
        elif head.startswith("lin") and head[3:].isdigit():
            key = f"lins.{head[3:]}.{rest}"
        elif head == "features" or head.isdigit():
            key = rest if head == "features" else key
            idx_str = key.partition(".")[0]
            if not idx_str.isdigit() or int(idx_str) >= bounds[-1]:
                continue  # torchvision's layers after relu5_3 (the last max pool) are not used
            k = next(i for i, end in enumerate(bounds, start=1) if int(idx_str) < end)
            key = f"net.slice{k}.{key}"
        out[key] = value
    return out


def load_perceptual(weights: str | os.PathLike | Sequence[str | os.PathLike] | None = None, net: str = "vgg",
                    device: str | torch.device = "cpu") -> PerceptualDistance:
    """Frozen perceptual distance in eval mode.

    weights None -> ST-LPIPS with the weights shipped in stlpips-pytorch (`net` 'vgg' or 'alex').
    weights given -> standard LPIPS-VGG from one file holding the whole ``lpips.LPIPS(net='vgg')`` state dict, or
    from two files: torchvision's VGG16 ImageNet weights and the lpips package's ``weights/v0.1/vgg.pth``.
    Every parameter must be found (ValueError otherwise).
    """
    if weights is None:
        from larp_mllm.assets import stlpips_weights

        module = PerceptualDistance(PerceptualConfig("stlpips", net))
        paths = [stlpips_weights(net)]
    else:
        module = PerceptualDistance(PerceptualConfig("lpips", "vgg"))
        paths = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
    state: dict[str, Tensor] = {}
    for path in paths:
        state.update(_normalise_keys(_read_state_dict(path), module.config))
    if weights is not None:  # the LPIPS scaling constants are fixed; the lpips/torchvision files may omit them
        state.setdefault("shift", module.shift)
        state.setdefault("scale", module.scale)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        cfg = module.config
        raise ValueError(f"{', '.join(map(str, paths))} do not match the {cfg.backend}-{cfg.net} network: missing "
                         f"{missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{'...' if len(unexpected) > 4 else ''}")
    module.eval().requires_grad_(False)
    return module.to(device)


def build_perceptual(backend: str, weights: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                     device: str | torch.device = "cpu") -> PerceptualDistance | None:
    """The frozen perceptual distance named by `backend` (videos (B, 3, T, H, W) x2 in [0, 1] -> (B,)), or None.

    'stlpips': ST-LPIPS-VGG with the weights shipped in stlpips-pytorch (`weights` unused); 'lpips-vgg': standard
    LPIPS-VGG (the reference's loss) from the user's `weights` (see ``load_perceptual``): one path, a sequence of
    two paths, or the two paths in one comma-separated string (the training config's spelling); 'none': None.
    """
    if backend == "none":
        return None
    if backend == "stlpips":
        return load_perceptual(None, "vgg", device)
    if backend == "lpips-vgg":
        if weights is None:
            raise ValueError("perceptual backend 'lpips-vgg' needs weights: an lpips.LPIPS(net='vgg') state dict, "
                             "or [torchvision vgg16 ImageNet weights, lpips weights/v0.1/vgg.pth]")
        if isinstance(weights, str) and "," in weights:
            weights = [w.strip() for w in weights.split(",")]
        return load_perceptual(weights, "vgg", device)
    raise ValueError(f"perceptual backend must be 'stlpips', 'lpips-vgg' or 'none', got {backend!r}")
