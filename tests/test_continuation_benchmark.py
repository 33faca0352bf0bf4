"""larp-continuation-bench on a fake K600 tree: the reference's clip draw, the protocol end to end (condition codes,
64x64 real features), shards == one run, resume, unreadable clips skipped and counted, one clear error for bad input."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from llm_fixtures import tiny_video_bundle
from test_ucf101_protocol import _FakeStyleGANI3D  # the cheap stand-in for the StyleGAN-V I3D TorchScript

from larp_mllm import LARPTokenizer
from larp_mllm.data.continuation import condition_clip
from larp_mllm.data.records import csv_records
from larp_mllm.data.synthetic import class_specs, render_clip
from larp_mllm.data.video_io import read_video
from larp_mllm.data.video_write import write_video
from larp_mllm.eval.fvd import i3d_ready, load_i3d
from larp_mllm.eval.real_set import draw_chunks
from llm_adapters import continuation_benchmark as bench

pytestmark = pytest.mark.timeout(120)

CHUNK, SIZE = 8, 32  # larp-tiny clips: 8 frames of 32x32
# (file stem, frames, action, label) in CSV order (by label, as k600_val.csv); None frames: a corrupt file. Sorting
# the paths as strings changes the order (upper case first): Ab, Kq, Zz, aa, mm, zb.
VIDEOS = [("zb_000010_000020", 20, "abseiling", 0), ("Ab_000002_000012", 8, "abseiling", 0),
          ("mm_000001_000011", 5, "bowling", 1),  # shorter than a chunk: no chunk
          ("Kq_000030_000040", 17, "bowling", 1), ("aa_000000_000010", None, "cooking", 2),
          ("Zz_000005_000015", 24, "cooking", 2)]
NUM_CHUNKS = sum((n or 0) // CHUNK for _, n, _, _ in VIDEOS)  # 8
NUM = 5  # clips of the small protocol


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_module():
    """Tiny matmuls on 2 shared, busy cores: one thread is 10-100x faster (see conftest's `one_thread`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """k600_val.csv with paths data/k600/val/<stem>.mp4 (40x32 H.264, 8 fps), as the reference's CSV."""
    root = tmp_path_factory.mktemp("k600")
    rows = ["id,path,action,label"]
    for k, (stem, frames, action, label) in enumerate(VIDEOS):
        path = root / "data" / "k600" / "val" / f"{stem}.mp4"
        if frames is None:
            path.write_bytes(np.random.default_rng(k).bytes(3000))
        else:
            clip, _ = render_clip(class_specs(6)[k], np.random.default_rng(k), frames=frames, size=40)
            write_video(clip[:, :, 4:36], path, fps=8)  # (3, frames, 32, 40)
        rows.append(f"{k + 1},data/k600/val/{stem}.mp4,{action},{label}")
    (root / "k600_val.csv").write_text("\n".join(rows) + "\n")
    return root / "k600_val.csv"


def reference_draw(num_samples: int) -> list[tuple[str, int]]:
    """The reference's rule on its own terms: the CSV paths sorted as strings, len(video) // 16 chunks of each in
    order (16 -> CHUNK here; the corrupt file, which stops the reference, gives none), random.Random(42).sample."""
    frames = {f"data/k600/val/{stem}.mp4": n or 0 for stem, n, _, _ in VIDEOS}
    index = [(Path(p).stem, c) for p in sorted(frames) for c in range(frames[p] // CHUNK)]
    return [index[i] for i in random.Random(42).sample(range(len(index)), num_samples)]


def _named(records, chosen) -> list[tuple[str, int]]:
    return [(records[v].path.stem, c) for v, c in chosen]


def test_the_draw_is_the_reference_rule(tree, tmp_path):
    records = csv_records(tree)
    unsorted = [(stem, c) for stem, n, _, _ in VIDEOS for c in range((n or 0) // CHUNK)]
    assert [unsorted[i] for i in random.Random(42).sample(range(NUM_CHUNKS), NUM)] != reference_draw(NUM)  # order
    for k in (NUM, NUM_CHUNKS):
        ds, chosen = draw_chunks(records, CHUNK, SIZE, k, 42, tmp_path, allow_fewer=False)
        assert _named(records, chosen) == reference_draw(k)
    assert len(ds) == NUM_CHUNKS and sorted(f.kind for f in ds.index_faults()) == ["too_short", "unreadable"]
    with pytest.raises(ValueError):  # the reference's random.sample refuses more than there are ...
        random.Random(42).sample(range(NUM_CHUNKS), NUM_CHUNKS + 1)
    with pytest.raises(ValueError, match=f"only {NUM_CHUNKS} non-overlapping {CHUNK}-frame chunks"):  # ... and so do we
        draw_chunks(records, CHUNK, SIZE, NUM_CHUNKS + 1, 42, tmp_path, allow_fewer=False)
    assert bench._runs([2, 3, 5, 6, 7, 9]) == [(0, 2), (2, 5), (5, 6)] and bench._runs([]) == []


@pytest.fixture(scope="module")
def setup(tree, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bench")
    tiny_video_bundle(root)
    i3d = root / "i3d_torchscript.pt"
    torch.jit.script(_FakeStyleGANI3D()).save(str(i3d))
    common = ["--model", str(root / "bundle"), "--larp-tokenizer", str(root / "larp"), "--csv", str(tree),
              "--cache-dir", str(root / "cache"), "--num-samples", str(NUM), "--batch-size", "2", "--workers", "0",
              "--i3d", str(i3d), "--grid-samples", "2", "--no-progress"]
    single = root / "single"
    bench.main([*common, "--output-dir", str(single)])
    return {"root": root, "common": common, "single": single, "i3d": i3d}


def _report(out: Path) -> dict:
    return json.loads((out / bench.REPORT_FILE).read_text())


def _clips(out: Path) -> bench.ShardProgress:
    return bench.merge_shards(out, bench.ContinuationPlan.load(out))[0]


def test_single_run_follows_the_protocol(setup):
    single = setup["single"]
    report, plan = _report(single), bench.ContinuationPlan.load(single)
    assert [(Path(p).stem, c) for p, c in plan.samples] == reference_draw(NUM)
    assert report["num_samples"] == report["num_real"] == report["num_planned"] == NUM
    assert report["num_chunks"] == NUM_CHUNKS and report["num_shards"] == 1 and np.isfinite(report["fvd"])
    assert report["data_faults"]["videos_left_out"] == {"too_short": 1, "unreadable": 1}
    assert report["data_faults"]["clips_skipped"] == {} and report["cfg_scale"] == 1.0
    assert report["detector"] == "stylegan-v-i3d-torchscript" and report["fvd_note"] is None
    assert Path(report["grid"]).is_file() and report["fvd_size"] == 64 and report["cond_frames"] == 5
    state = _clips(single)
    assert state.positions.tolist() == list(range(NUM)) and state.codes.shape == (NUM, 32)
    # the real statistics are the drawn chunks, read independently, at 64x64 through the same I3D
    real = torch.stack([read_video(p, CHUNK, SIZE, start=c * CHUNK) for p, c in plan.samples])  # (5, 3, 8, 32, 32)
    features = load_i3d(str(setup["i3d"]))(i3d_ready(real, 64))  # (5, 400)
    torch.testing.assert_close(state.real.sum_x, features.double().sum(0), rtol=1e-5, atol=1e-4)


def test_shards_resume_and_merge_equal_one_run(setup, monkeypatch):
    out, calls = setup["root"] / "sharded", []
    real_continue = bench.continue_video_codes

    def recording(llm, cond, **kw):
        calls.append((kw["seed"], cond.clone()))
        if crash and len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_continue(llm, cond, **kw)

    monkeypatch.setattr(bench, "continue_video_codes", recording)
    crash = True
    with pytest.raises(KeyboardInterrupt):  # shard 1 = clips 2-4: killed in its second batch
        bench.main([*setup["common"], "--output-dir", str(out), "--shard", "1/2"])
    assert bench.ShardProgress.load(bench.progress_path(out, 1, 2), bench.ContinuationPlan.load(out).key).done == 2
    with pytest.raises(FileNotFoundError, match="shard 0/2 has not run"):
        bench.main(["--merge", "--output-dir", str(out), "--grid-samples", "0"])
    crash, calls[:] = False, []
    bench.main([*setup["common"], "--output-dir", str(out), "--shard", "1/2"])
    assert [seed for seed, _ in calls] == [4]  # only the unfinished batch (clip 4, seed 0 + 4) ran again
    calls.clear()
    bench.main([*setup["common"], "--output-dir", str(out), "--shard", "0/2"])
    assert [seed for seed, _ in calls] == [0]
    # the condition the model saw: frames 0-4 of the real chunk, frame 4 repeated, tokenized with deterministic VQ
    plan, larp = bench.ContinuationPlan.load(out), LARPTokenizer.from_pretrained(setup["root"] / "larp").eval()
    real = torch.stack([read_video(p, CHUNK, SIZE, start=c * CHUNK) for p, c in plan.samples[:2]])
    assert torch.equal(calls[0][1], larp.tokenize(condition_clip(real, 5), deterministic=True))
    calls.clear()
    bench.main([*setup["common"], "--output-dir", str(out), "--shard", "0/2"])  # finished: nothing runs again
    assert calls == []
    bench.main(["--merge", "--output-dir", str(out), "--larp-tokenizer", str(setup["root"] / "larp")])
    one, merged = _report(setup["single"]), _report(out)
    assert merged["num_shards"] == 2 and merged["num_samples"] == NUM and merged["key"] == one["key"]
    assert torch.equal(_clips(out).codes, _clips(setup["single"]).codes)  # clip j sampled with seed + j
    assert merged["fvd"] == pytest.approx(one["fvd"], rel=1e-6, abs=1e-6) and Path(merged["grid"]).is_file()
    with pytest.raises(ValueError, match="other settings"):
        bench.main([*setup["common"], "--output-dir", str(out), "--temperature", "0.5"])


def test_unreadable_clips_are_skipped_and_counted(setup, tree):
    plan = bench.ContinuationPlan.load(setup["single"])
    victim = Path(plan.samples[0][0])  # a video whose chunk is drawn: made unreadable after it was indexed
    lost = sum(Path(p) == victim for p, _ in plan.samples)
    assert 1 <= lost <= NUM - 2
    good = victim.read_bytes()
    victim.write_bytes(bytes(len(good)))  # same size: the cached chunk index (and so the draw) still holds
    try:
        out = setup["root"] / "damaged"
        bench.main([*setup["common"], "--output-dir", str(out), "--grid-samples", "0"])
    finally:
        victim.write_bytes(good)
    report = _report(out)
    assert report["data_faults"]["clips_skipped"] == {"unreadable": lost} and report["key"] == _report(
        setup["single"])["key"]
    assert report["num_samples"] == report["num_real"] == NUM - lost and np.isfinite(report["fvd"])
    assert str(victim) in report["data_faults"]["examples"][0]
    kept, single = _clips(out), _clips(setup["single"])
    assert torch.equal(kept.codes, single.codes[kept.positions])  # the other clips: the same seeds, the same codes


def test_bad_input_fails_early_with_one_clear_error(setup, tree, tmp_path):
    base = ["--model", str(tmp_path / "no-such-model"), "--csv", str(tree), "--output-dir", str(tmp_path / "o")]
    cases = [(["--csv", str(tmp_path / "missing.csv")], FileNotFoundError, "CSV file not found"),
             (["--shard", "2/2"], ValueError, "0 <= i < n"), (["--shard", "1"], ValueError, "i/n"),
             (["--cfg-scale", "1.25"], ValueError, "without classifier-free guidance"),
             (["--num-samples", "0"], ValueError, "must be >= 1"),
             (["--i3d", str(tmp_path / "none.pt")], FileNotFoundError, "--i3d")]
    for extra, error, message in cases:  # all found before the (missing) model would load
        with pytest.raises(error, match=message):
            bench.main([*base, *extra])
    with pytest.raises(ValueError, match=f"only {NUM_CHUNKS} non-overlapping"):
        bench.main([*setup["common"], "--output-dir", str(tmp_path / "many"), "--num-samples", str(NUM_CHUNKS + 1)])
    with pytest.raises(FileNotFoundError, match="no plan.json"):
        bench.main(["--merge", "--output-dir", str(tmp_path / "empty"), "--grid-samples", "0"])
