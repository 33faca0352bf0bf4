"""Fault injection for larp-train-tokenizer: SIGKILL (through the trainer's test hook) at a checkpoint write, while
pruning an old checkpoint, and while replacing an existing step folder; every resume with `--resume auto` ends with
the uninterrupted run's weights, and no `step_*` folder is ever incomplete. DeepSpeed subprocesses, CPU, gloo."""
from __future__ import annotations

import json
from pathlib import Path

from test_train_tokenizer import (COMMON, HALF, STEPS, full_run, log_rows, max_abs_diff, run_train,  # noqa: F401
                                  synthetic_csvs)

from larp_mllm import LARPTokenizer
from larp_mllm.runtime.checkpoint_folders import KILL_HOOK_ENV
from tokenizer_training.checkpointing import list_checkpoints


def _step(n: int) -> str:
    return f"step_{n:08d}"


def _assert_every_step_folder_is_whole(root: Path) -> None:
    for folder in root.glob("step_*"):
        assert (folder / "trainer_state.json").is_file(), folder
        LARPTokenizer.from_pretrained(folder / "model")  # the weights read back whole


def test_killed_while_pruning_resumes_to_the_same_weights(full_run, synthetic_csvs, tmp_path):
    out = tmp_path / "pruned"
    args = (*COMMON[:4], "--keep_last", "1", *COMMON[6:])  # step 20's checkpoint prunes step 10's
    killed = run_train(out, synthetic_csvs, *args, env={KILL_HOOK_ENV: f"prune@{STEPS}"}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    root = out / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert _step(HALF) not in names and _step(STEPS) in names  # the half-deleted one left the step_* namespace
    assert any(n.startswith(".retired-") for n in names)
    _assert_every_step_folder_is_whole(root)
    done = run_train(out, synthetic_csvs, *args, "--resume", "auto")
    assert "checkpoints: removed .retired-" in done.stderr
    assert [p.name for p in list_checkpoints(root)] == [_step(STEPS)]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert max_abs_diff(out / "final", full_run / "final") <= 1e-6


def test_killed_while_replacing_a_step_folder_keeps_the_complete_one(full_run, synthetic_csvs, tmp_path):
    """A run restarted from step 10 writes step 20 again while the old step 20 exists: killed after the old folder
    left the namespace and before the new one moved in, the complete new one is moved into place, never deleted."""
    out = tmp_path / "replaced"
    run_train(out, synthetic_csvs, *COMMON)
    root = out / "checkpoints"
    killed = run_train(out, synthetic_csvs, *COMMON, "--resume", str(root / _step(HALF)),
                       env={KILL_HOOK_ENV: f"replace@{STEPS}"}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    names = sorted(p.name for p in root.iterdir())
    assert _step(STEPS) not in names and f".tmp-{_step(STEPS)}" in names
    assert (root / f".tmp-{_step(STEPS)}" / "trainer_state.json").is_file()  # complete, waiting to be moved in
    _assert_every_step_folder_is_whole(root)
    done = run_train(out, synthetic_csvs, *COMMON, "--resume", "auto")
    assert f"moved into place as {_step(STEPS)}" in done.stderr
    assert [p.name for p in list_checkpoints(root)] == [_step(HALF), _step(STEPS)]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert max_abs_diff(out / "final", full_run / "final") <= 1e-6
    assert max_abs_diff(root / _step(STEPS) / "model", full_run / "final") <= 1e-6
    # the log holds every step once (the attempts' rows after their resume point were dropped), and the checkpoint
    # written by the attempt that resumed from step 10 carries that attempt's config
    steps = [r["step"] for r in log_rows(out) if "loss/l2" in r]
    assert steps == list(range(1, STEPS + 1)), steps
    config = json.loads((root / _step(STEPS) / "trainer_state.json").read_text())["config"]
    assert config["resume"] == str(root / _step(HALF))


def test_same_config_and_seed_give_the_same_weights_in_any_folder(tmp_path):
    """Each run renders the synthetic set into its own folder; the files are byte-identical (deterministic colour
    conversion, single-threaded x264 without lookahead), so two runs train on the same bytes and end equal."""
    import hashlib
    import os
    import subprocess
    import sys

    from test_train_tokenizer import REPO, TINY

    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")},
           "OMP_NUM_THREADS": "1"}
    for name in ("a", "b"):  # the trainer's own synthetic set (train_data: synthetic), 6 steps
        subprocess.run([sys.executable, "-m", "tokenizer_training.train", "--config", str(TINY), "--output_dir",
                        str(tmp_path / name), "--max_steps", "6", "--checkpoint_every", "6", "--global_batch_size",
                        "4", "--synthetic_per_class", "2", "--disc_every", "2"], cwd=REPO, env=env, check=True,
                       capture_output=True, timeout=600)

    def digests(run: Path) -> dict[str, str]:
        return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((run / "data").rglob("*")) if p.is_file() and p.suffix in (".mp4", ".csv")}

    assert digests(tmp_path / "a") == digests(tmp_path / "b") and len(digests(tmp_path / "a")) > 8
    assert max_abs_diff(tmp_path / "a" / "final", tmp_path / "b" / "final") == 0.0
