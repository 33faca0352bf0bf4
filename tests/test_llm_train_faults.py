"""Fault injection for larp-train-llm (stage 2, HF Trainer): SIGKILL (through the trainer's test hook) while writing a
checkpoint, while pruning an old one and while replacing an existing checkpoint-N; each resume (the default: the
newest complete checkpoint) ends with the uninterrupted run's weights: exactly without DeepSpeed, within a float
tolerance under ZeRO-2. Every run is `python -m llm_adapters.train` in a subprocess (one process, CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_llm_train import REPO, child_env, synthetic, tiny_argv  # noqa: F401  (synthetic is a fixture)

from larp_mllm.runtime.checkpoint_folders import KILL_HOOK_ENV
from llm_adapters.checkpoints import COMPLETE_FILE, list_checkpoints, recover_checkpoints, resolve_resume

STEPS = 6
WEIGHT_FILES = ("adapter_model.safetensors", "video_adapter.safetensors")


def run(synthetic, out: Path, *extra: str, kill: str | None = None) -> subprocess.CompletedProcess:  # noqa: F811
    """One training run; with `kill` ("point@step") it must die by SIGKILL at that point."""
    env = child_env(**({KILL_HOOK_ENV: kill} if kill else {}))
    argv = tiny_argv(synthetic, out, "--max_steps", str(STEPS), "--save_steps", "2", "--save_total_limit", "2",
                     "--cond_dropout", "0.3", "--per_device_train_batch_size", "4", *extra)
    proc = subprocess.run([sys.executable, "-m", "llm_adapters.train", *argv], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=280)
    expected = -9 if kill else 0
    assert proc.returncode == expected, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{name}:{k}": v for name in WEIGHT_FILES for k, v in load_file(str(folder / name)).items()}


def max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def assert_every_checkpoint_is_whole(out: Path) -> None:
    """Every checkpoint-N folder is either marked complete with its weights readable, or unmarked (unfinished)."""
    for folder in out.glob("checkpoint-*"):
        if (folder / COMPLETE_FILE).is_file():
            weights(folder)
            assert (folder / "trainer_state.json").is_file() and (folder / "optimizer.pt").is_file() or \
                list(folder.glob("global_step*")), folder


def logged_steps(out: Path) -> list[int]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["step"] for h in history if "loss" in h]


@pytest.fixture(scope="module")
def full_run(synthetic, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("llm-faults") / "full"
    run(synthetic, out)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    return out


def test_killed_while_writing_a_checkpoint_resumes_to_the_same_weights(synthetic, full_run, tmp_path):  # noqa: F811
    out = tmp_path / "write"
    run(synthetic, out, "--report_to", "tensorboard", kill="write@4")
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / COMPLETE_FILE).exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert_every_checkpoint_is_whole(out)
    done = run(synthetic, out, "--report_to", "tensorboard")
    assert "checkpoints: removed checkpoint-4 (unfinished" in done.stderr
    assert f"resuming from {out / 'checkpoint-2'}" in done.stderr
    assert max_abs_diff(out, full_run) == 0.0  # same arithmetic in the same order: bit for bit
    assert logged_steps(out) == list(range(1, STEPS + 1))  # the killed attempt's rows after step 2 are gone
    assert len(list((out / "runs").glob("events.out.tfevents.*"))) == 2  # both attempts log into one folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "runs")).Reload()  # the second attempt purged the first's steps > 2
    assert [e.step for e in board.Scalars("train/loss")] == list(range(1, STEPS + 1))


def test_killed_while_pruning_resumes_to_the_same_weights(synthetic, full_run, tmp_path):  # noqa: F811
    out = tmp_path / "prune"
    run(synthetic, out, "--save_total_limit", "1", kill="prune@4")
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-2" not in names and any(n.startswith(".retired-checkpoint-2-") for n in names)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert_every_checkpoint_is_whole(out)
    done = run(synthetic, out, "--save_total_limit", "1")
    assert "checkpoints: removed .retired-checkpoint-2-" in done.stderr
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-6"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert max_abs_diff(out, full_run) == 0.0


def test_killed_while_replacing_a_checkpoint_never_leaves_a_broken_one(synthetic, full_run, tmp_path):  # noqa: F811
    """A run restarted from checkpoint-2 reaches step 4 while the old checkpoint-4 exists: the old folder leaves the
    namespace before anything is written, so a kill there leaves no checkpoint-4 that looks complete."""
    out = tmp_path / "replace"
    run(synthetic, out, "--save_total_limit", "3")
    run(synthetic, out, "--save_total_limit", "3", "--resume_from_checkpoint", str(out / "checkpoint-2"),
        kill="replace@4")
    assert not (out / "checkpoint-4").exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-6"]
    run(synthetic, out, "--save_total_limit", "3", "--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert max_abs_diff(out, full_run) == 0.0
    assert max_abs_diff(out / "checkpoint-4", full_run / "checkpoint-4") == 0.0
    assert json.loads((out / "checkpoint-4" / "training_args.json").read_text())["training"][
        "resume_from_checkpoint"] == str(out / "checkpoint-2")  # the config this attempt actually used


def test_killed_while_writing_under_zero2_resumes_to_the_same_weights(synthetic, tmp_path):  # noqa: F811
    """DeepSpeed ZeRO-2 (one CPU process, gloo): the engine state is written after the bundle; killed between the two,
    the folder stays unfinished and the resume continues from checkpoint-2 to the uninterrupted run's weights."""
    ds = ("--deepspeed", "configs/deepspeed/zero2.json")
    ref, out = tmp_path / "ref", tmp_path / "killed"
    run(synthetic, ref, *ds)
    run(synthetic, out, *ds, kill="write@4")
    assert not (out / "checkpoint-4" / COMPLETE_FILE).exists()
    assert not list((out / "checkpoint-4").glob("global_step*"))
    run(synthetic, out, *ds)
    assert max_abs_diff(out, ref) <= 1e-6  # ZeRO-2 may sum gradients in another order: a float tolerance


def test_recover_removes_only_unfinished_folders(tmp_path):
    for name, complete in (("checkpoint-2", True), ("checkpoint-4", False), ("checkpoint-10", True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (tmp_path / name / COMPLETE_FILE).write_text("{}")
    (tmp_path / ".retired-checkpoint-1-123-abcd").mkdir()
    (tmp_path / "runs").mkdir()
    actions = recover_checkpoints(tmp_path)
    assert actions == ["removed checkpoint-4 (unfinished: no checkpoint_complete.json)",
                       "removed .retired-checkpoint-1-123-abcd (leftover of a deletion)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2", "runs"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]  # by step, not by name
    assert resolve_resume(None, str(tmp_path)) == str(tmp_path / "checkpoint-10")
    (tmp_path / "checkpoint-12").mkdir()  # unfinished, named explicitly
    with pytest.raises(ValueError, match="unfinished checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-12"), str(tmp_path))
    assert (tmp_path / "checkpoint-12").is_dir()  # reported, not removed
