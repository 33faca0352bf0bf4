"""Tokenizer training: config parsing, DeepSpeed config filling, data position, and real DeepSpeed runs (CPU, gloo).

Every DeepSpeed job is a subprocess on the tiny preset, 6-20 steps (about 50 s for the file on 2 idle cores):
ZeRO-2 fp32 and bf16, exact resume, a SIGKILL during a checkpoint write, non-finite losses, two processes under
torchrun. The subprocesses run with OMP_NUM_THREADS=1 (two threads per process thrash on a loaded 2-core machine).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from larp_mllm.runtime.deepspeed import BatchLayout
from larp_mllm.runtime.distributed import free_port
from tokenizer_training.arguments import deepspeed_config, parse_config
from larp_mllm.runtime.checkpoint_folders import KILL_HOOK_ENV
from tokenizer_training.checkpointing import ResumableSampler, get_rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tokenizer" / "larp_tiny_cpu.yaml"


# ----------------------------------------------------------------------------------------------------------------------
# Fast units
# ----------------------------------------------------------------------------------------------------------------------
def test_config_yaml_and_cli_overrides(tmp_path):
    cfg = parse_config(["--config", str(TINY), "--lr", "3e-4", "--max_steps", "7", "--flip", "false"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.max_steps == 7 and cfg.data.flip is False
    assert cfg.model.preset == "larp-tiny" and cfg.train.prior_lr_mult == 1.0
    long = parse_config(["--config", str(REPO / "configs" / "tokenizer" / "larp_l_long.yaml")])
    t = long.train
    assert (t.global_batch_size, t.lr, t.disc_lr, t.disc_every) == (128, 1e-4, 3e-5, 5)
    assert (long.train.epochs, long.train.warmup_epochs, long.model.disc_dim) == (150, 8, 512)


def test_unknown_keys_are_rejected_with_the_valid_list(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: larp-tiny\nlearning_rate: 1e-4\n")
    with pytest.raises(ValueError, match=r"learning_rate.*Valid keys: .*\blr\b"):
        parse_config(["--config", str(bad)])
    with pytest.raises(ValueError, match=r"'lrr' \(did you mean 'lr'\?\)"):
        parse_config(["--lrr", "1"])
    with pytest.raises(ValueError, match="preset"):
        parse_config(["--preset", "larp-huge"])
    with pytest.raises(FileNotFoundError):
        parse_config(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="entropy_temperature must be > 0"):
        parse_config(["--config", str(TINY), "--entropy_weight", "0.1", "--entropy_temperature", "0"])
    with pytest.raises(ValueError, match="prior_ce_temperature must be > 0"):
        parse_config(["--config", str(TINY), "--prior_ce_temperature", "-1"])


def test_tokenizer_config_fields_come_from_init_from_unless_set(tmp_path):
    """ss_max_ratio / ss_peak_fraction / prior_ce_temperature have one home, the tokenizer's config: the run keeps
    the checkpoint's (or preset's) values and overrides only those it sets; a preset must fit the checkpoint."""
    from larp_mllm import TOKENIZER_PRESETS, LARPTokenizer
    from tokenizer_training.train import build_tokenizer

    folder = tmp_path / "tok"
    LARPTokenizer.from_preset("larp-tiny", ss_max_ratio=0.2, ss_peak_fraction=0.1,
                              prior_ce_temperature=0.5).save_pretrained(folder)
    tok = build_tokenizer(parse_config(["--init_from", str(folder)]))
    assert (tok.config.ss_max_ratio, tok.config.ss_peak_fraction, tok.config.prior_ce_temperature) == (0.2, 0.1, 0.5)
    tok = build_tokenizer(parse_config(["--config", str(TINY), "--init_from", str(folder), "--ss_max_ratio", "0.4"]))
    assert (tok.config.ss_max_ratio, tok.config.ss_peak_fraction) == (0.4, 0.1)  # set: overridden; unset: kept
    preset = TOKENIZER_PRESETS["larp-tiny"]
    assert build_tokenizer(parse_config([])).config.ss_max_ratio == preset.ss_max_ratio
    with pytest.raises(ValueError, match=r"not a 'larp-l-long' tokenizer: input_size=32 \(preset: 128\)"):
        build_tokenizer(parse_config(["--preset", "larp-l-long", "--init_from", str(folder)]))
    with pytest.raises(ValueError, match=r"ss_max_ratio must be in \[0, 1\]"):
        parse_config(["--ss_max_ratio", "1.5"])


def test_deepspeed_json_auto_fields_are_filled():
    cfg = parse_config(["--config", str(TINY), "--deepspeed", str(REPO / "configs/deepspeed/zero2.json"),
                        "--global_batch_size", "16", "--micro_batch_size", "4", "--precision", "bf16",
                        "--grad_clip", "1.0"])
    layout = BatchLayout.split(cfg.train.global_batch_size, 2, cfg.train.micro_batch_size)
    assert (layout.micro_batch, layout.grad_accum) == (4, 2)
    ds = deepspeed_config(cfg, layout, on_gpu=False)
    sizes = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert sizes == (16, 4, 2)
    assert ds["gradient_clipping"] == 1.0 and ds["zero_optimization"]["stage"] == 2
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # precision bf16: autocast, fp32 weights
    assert "bf16" not in ds and "fp16" not in ds
    assert ds["zero_optimization"]["overlap_comm"] is False
    cfg0 = parse_config(["--deepspeed", str(REPO / "configs/deepspeed/zero0.json"), "--global_batch_size", "2"])
    ds0 = deepspeed_config(cfg0, BatchLayout.split(2, 1), False)
    assert ds0["zero_optimization"]["stage"] == 0 and "torch_autocast" not in ds0  # fp32: no precision section
    assert deepspeed_config(parse_config(["--zero_stage", "1"]), layout, False)["zero_optimization"]["stage"] == 1
    with pytest.raises(ValueError, match="GPU"):
        deepspeed_config(parse_config(["--precision", "fp16"]), layout, on_gpu=False)
    with pytest.raises(ValueError, match="multiple"):
        BatchLayout.split(6, 1, 4)


def test_deepspeed_precision_sections_the_tokenizer_cannot_honour_are_refused(tmp_path):
    def resolve(ds: dict, *argv: str) -> dict:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        cfg = parse_config(["--deepspeed", str(path), "--global_batch_size", "2", *argv])
        return deepspeed_config(cfg, BatchLayout.split(2, 1), on_gpu=False)

    with pytest.raises(ValueError, match=r"bf16.enabled=True.*fp32 islands.*precision: bf16"):
        resolve({"bf16": {"enabled": True}}, "--precision", "bf16")  # DeepSpeed's bf16 weights: never here
    with pytest.raises(ValueError, match=r"torch_autocast.enabled=True.*set it to \"auto\""):
        resolve({"torch_autocast": {"enabled": True}})  # autocast, but precision fp32
    with pytest.raises(ValueError, match=r"torch_autocast.dtype='float16'"):
        resolve({"torch_autocast": {"enabled": True, "dtype": "float16"}}, "--precision", "bf16")
    with pytest.raises(ValueError, match="optimizer"):
        resolve({"optimizer": {"type": "Adam"}})
    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported"):
        resolve({"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match=r"train_batch_size=8 but .*gives 2"):
        resolve({"train_batch_size": 8})
    auto = {"bf16": {"enabled": "auto"}, "torch_autocast": {"enabled": "auto", "dtype": "auto"}}
    assert resolve(auto, "--precision", "bf16")["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert resolve(auto, "--precision", "bf16")["bf16"] == {"enabled": False}  # "auto" = the stage's weights: fp32
    assert resolve(auto)["torch_autocast"] == {"enabled": False}


def test_sampler_shards_and_resumes_mid_epoch():
    a = ResumableSampler(20, batch_size=3, rank=0, world=2, seed=5)
    b = ResumableSampler(20, batch_size=3, rank=1, world=2, seed=5)
    assert a.batches_per_epoch == 3
    ia, ib = list(a), list(b)
    assert len(ia) == len(ib) == 9 and not set(ia) & set(ib)  # the processes see different clips
    a.set_position(epoch=1)
    assert list(a) != ia  # a new order every epoch
    full = list(a)
    a.set_position(epoch=1, start_batch=2)
    assert list(a) == full[6:]  # resuming skips exactly the consumed micro-batches


def test_rng_state_roundtrip_is_json():
    import random

    import numpy as np

    state = json.loads(json.dumps(get_rng_state()))
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


# ----------------------------------------------------------------------------------------------------------------------
# Real DeepSpeed runs (subprocesses, CPU, gloo)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_csvs(tmp_path_factory) -> tuple[Path, Path]:
    from larp_mllm.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    train = make_synthetic_dataset(root / "train", classes=4, per_class=4, seed=0, frames=12, size=32)
    val = make_synthetic_dataset(root / "val", classes=4, per_class=1, seed=1, frames=8, size=32)
    return train, val


def run_train(out: Path, csvs, *extra: str, env: dict | None = None, launcher: list[str] | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    clean.update(OMP_NUM_THREADS="1", **(env or {}))  # 2 threads thrash on a loaded 2-core machine
    cmd = (launcher or [sys.executable, "-m"]) + ["tokenizer_training.train", "--config", str(TINY),
                                                   "--output_dir", str(out), "--train_data", str(csvs[0]),
                                                   "--val_data", str(csvs[1]), "--global_batch_size", "4",
                                                   "--log_every", "1", "--disc_every", "2", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=clean, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def recon_curve(out: Path) -> list[float]:
    """The reconstruction term the tiny config trains on (squared error; L1 is logged too)."""
    return [r["loss/l2"] for r in log_rows(out) if "loss/l2" in r]


def max_abs_diff(a: Path, b: Path) -> float:
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


STEPS, HALF = 20, 10
COMMON = ("--max_steps", str(STEPS), "--checkpoint_every", str(HALF), "--keep_last", "3", "--lr", "2e-3",
          "--warmup_steps", "3")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, synthetic_csvs) -> Path:
    """40 uninterrupted steps, ZeRO-2 fp32, checkpoints at 20 and 40."""
    out = tmp_path_factory.mktemp("full")
    run_train(out, synthetic_csvs, *COMMON, "--deepspeed", str(REPO / "configs/deepspeed/zero2.json"))
    return out


def test_deepspeed_zero2_run_learns_and_exports(full_run):
    from larp_mllm import LARPTokenizer

    curve = recon_curve(full_run)
    assert len(curve) == STEPS
    first, last = curve[0], sum(curve[-5:]) / 5
    assert last < 0.7 * first, f"reconstruction loss did not drop: {first:.4f} -> {last:.4f}"
    ckpts = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    assert ckpts == [f"step_{HALF:08d}", f"step_{STEPS:08d}"]
    tok = LARPTokenizer.from_pretrained(full_run / "checkpoints" / f"step_{STEPS:08d}" / "model")
    final = LARPTokenizer.from_pretrained(full_run / "final")
    assert tok.num_tokens == final.num_tokens == 32
    assert max_abs_diff(full_run / "final", full_run / "checkpoints" / f"step_{STEPS:08d}" / "model") == 0.0
    assert (full_run / "samples" / f"step_{STEPS:08d}.mp4").is_file()
    assert (full_run / "samples" / f"step_{STEPS:08d}.png").is_file()
    assert any("val/psnr" in r for r in log_rows(full_run))
    assert list((full_run / "tensorboard").iterdir())
    rows = [r for r in log_rows(full_run) if "loss/disc" in r]
    assert len(rows) == (STEPS + 1) // 2  # D stepped every 2nd step (0, 2, ...)


def test_exact_resume_matches_uninterrupted(full_run, synthetic_csvs, tmp_path):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_run / "checkpoints" / f"step_{HALF:08d}", out / "checkpoints" / f"step_{HALF:08d}")
    run_train(out, synthetic_csvs, *COMMON, "--deepspeed", str(REPO / "configs/deepspeed/zero2.json"),
              "--resume", "auto")
    assert [r["step"] for r in log_rows(out) if "loss/l2" in r][0] == HALF + 1
    assert max_abs_diff(out / "final", full_run / "final") <= 1e-6


def test_sigkill_during_checkpoint_write_resumes_from_previous(full_run, synthetic_csvs, tmp_path):
    out = tmp_path / "killed"
    proc = run_train(out, synthetic_csvs, *COMMON, env={KILL_HOOK_ENV: f"write@{STEPS}"}, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f".tmp-step_{STEPS:08d}", f"step_{HALF:08d}"]  # the half-written one is not a checkpoint
    run_train(out, synthetic_csvs, *COMMON, "--resume", "auto")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{HALF:08d}", f"step_{STEPS:08d}"]
    assert max_abs_diff(out / "final", full_run / "final") <= 1e-6


def test_bf16_zero2_run_learns(synthetic_csvs, tmp_path):
    from larp_mllm import LARPTokenizer

    run_train(tmp_path, synthetic_csvs, *COMMON, "--precision", "bf16", "--entropy_weight", "0.01",
              "--prior_ce_temperature", "0.5", "--ss_max_ratio", "0.25")
    curve = recon_curve(tmp_path)
    assert sum(curve[-5:]) / 5 < 0.7 * curve[0]
    entropy = [r["loss/entropy"] for r in log_rows(tmp_path) if "loss/entropy" in r]
    # the usage term is on every step (fp32 SVQ under bf16); it is <= 0 (concavity of entropy), clearly below 0 at
    # the start and ~0 once this 20-step run's codes collapse (the early collapse the term fights in long runs)
    assert len(entropy) == STEPS and all(e <= 1e-5 for e in entropy) and entropy[0] < -0.5
    tok = LARPTokenizer.from_pretrained(tmp_path / "final")
    assert next(tok.parameters()).dtype == torch.float32
    assert tok.config.prior_ce_temperature == 0.5  # the override reaches the model and is saved with it
    assert (tok.config.ss_max_ratio, tok.config.ss_peak_fraction) == (0.25, 0.3)  # set / the preset's
    ratios = [r["schedule/ss_ratio"] for r in log_rows(tmp_path) if "schedule/ss_ratio" in r]
    assert max(ratios) == pytest.approx(0.25) and ratios[-1] == pytest.approx(0.25)  # the schedule used it


def test_two_processes_torchrun_agree(synthetic_csvs, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m"]
    run_train(tmp_path, synthetic_csvs, "--max_steps", "6", "--checkpoint_every", "3", "--global_batch_size", "8",
              "--micro_batch_size", "2", launcher=launcher)  # 2 processes x 2 clips x 2 accumulation steps
    agree = [r for r in log_rows(tmp_path) if "replicas_agree" in r]
    assert [r["step"] for r in agree] == [3, 6]
    state = json.loads((tmp_path / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step_00000006" / "rng").iterdir()) == [
        "rank_00000.json", "rank_00001.json"]


def test_non_finite_losses_are_skipped_then_abort_with_a_checkpoint(synthetic_csvs, tmp_path):
    from tokenizer_training.train import NAN_HOOK_ENV

    proc = run_train(tmp_path, synthetic_csvs, "--max_steps", "6", "--checkpoint_every", "100", "--max_bad_steps",
                     "2", "--gan_weight", "0", "--deepspeed", str(REPO / "configs/deepspeed/zero0.json"),
                     env={NAN_HOOK_ENV: "3"}, check=False)
    assert proc.returncode != 0
    assert "aborting: 3 micro-batches had a non-finite loss" in proc.stderr
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["bad_steps"]) == (3, 3)
    weights = load_file(ckpt / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the skipped steps never touched the weights
