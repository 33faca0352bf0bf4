"""Resumable training state: atomic checkpoint folders, RNG states, and a sampler that knows its data position.

Layout of one checkpoint (all processes write into a temporary folder that rank 0 renames when complete, so a
folder named `step_XXXXXXXX` is always whole):

    <output_dir>/checkpoints/step_00001000/
        generator/ds/...          DeepSpeed engine state of the tokenizer (weights, optimizer, ZeRO partitions)
        discriminator/ds/...      the same for the discriminator
        rng/rank_00000.json       per-process python / numpy / torch (/ cuda) RNG states
        trainer_state.json        step, epoch, data position, skipped steps, LeCam EMAs, the run config
        model/                    the tokenizer in fp32 (LARPTokenizer.save_pretrained): loads with from_pretrained

A `step_*` name only ever appears by renaming a complete `.tmp-step_*` folder (trainer_state.json is its last file)
and only ever disappears by renaming it out of the namespace (`.retired-*`) before anything in it is deleted, so a
kill at any moment cannot leave a `step_*` folder that looks complete but is not. `recover_checkpoints` (at start-up,
one process) finishes what a killed run left: a complete `.tmp-step_*` whose `step_*` is missing is moved into
place (never deleted), incomplete ones and `.retired-*` leftovers are deleted.

Only the last `keep_last` checkpoints are kept. No pickles of our own: RNG states and the trainer state are JSON
(the engine folders are DeepSpeed's own format, read back by DeepSpeed). On several nodes, `output_dir` must be on
a filesystem that all nodes share (as DeepSpeed's own checkpointing assumes).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from larp_mllm.runtime.checkpoint_folders import RETIRED_MARK, kill_point, retire_folder
from larp_mllm.runtime.files import atomic_write_text

__all__ = [
    "TrainerState", "ResumableSampler", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
    "list_checkpoints", "recover_checkpoints", "get_rng_state", "set_rng_state", "resume_checkpoint",
    "check_own_checkpoint",
]

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_DIR = re.compile(r"^\.tmp-step_(\d{8})$")
_STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint folder


@dataclass
class TrainerState:
    """Everything besides the engines and RNGs that resuming needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch (per process)
    bad_steps: int = 0  # micro-batches skipped for a non-finite loss
    lecam_real: float = 0.0  # LeCam EMAs (identical on all processes: fed with all-reduced means)
    lecam_fake: float = 0.0
    config: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------------------------------------------------
# RNG states (JSON, no pickles)
# ----------------------------------------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state().tolist()
    return out


def set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------------------------------
# Data position
# ----------------------------------------------------------------------------------------------------------------------
class ResumableSampler(torch.utils.data.Sampler):
    """DistributedSampler-like: epoch-seeded permutation, process `rank` takes every `world`-th index (the tail is
    dropped so all processes see the same number), starting at micro-batch `start_batch` of the epoch."""

    def __init__(self, num_items: int, batch_size: int, rank: int, world: int, seed: int, shuffle: bool = True):
        if num_items < batch_size * world:
            raise ValueError(f"dataset of {num_items} clips is smaller than one batch of {batch_size} x {world} "
                             f"processes")
        self.num_items, self.batch_size, self.rank, self.world = num_items, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.world // self.batch_size

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        per_rank = self.batches_per_epoch * self.batch_size
        mine = order[self.rank::self.world][:per_rank]
        return iter(mine[self.start_batch * self.batch_size:])


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint folders
# ----------------------------------------------------------------------------------------------------------------------
def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name)) and (p / _STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def check_own_checkpoint(path: str | Path, output_dir: str | Path) -> None:
    """Raise ValueError unless `path` is one of this run's checkpoints: a `step_XXXXXXXX` folder directly in
    `output_dir/checkpoints` (both with symlinks resolved, so a link out of the run folder does not count).

    Resuming unpickles DeepSpeed's engine files (`torch.load(weights_only=False)` of the model and optimizer states),
    which runs whatever code the file's author put in it; only files this run wrote itself are loaded.
    """
    root = (Path(output_dir) / "checkpoints").resolve()
    real = Path(path).resolve()
    if not real.exists():
        raise FileNotFoundError(f"resume={str(path)!r}: checkpoint folder not found (this run's checkpoints are the "
                                f"step_XXXXXXXX folders in {root}; --resume auto picks the newest complete one)")
    if real.parent != root or not _STEP_DIR.match(real.name):
        raise ValueError(
            f"resume={str(path)!r} is not a checkpoint of this run: larp-train-tokenizer resumes only from the "
            f"step_XXXXXXXX folders in its own output_dir ({root}), because loading a checkpoint unpickles "
            f"DeepSpeed's model and optimizer files (torch.load with weights_only=False), which can run any code its "
            f"author put there. Use --resume auto, or --output-dir set to the run folder that wrote the checkpoint "
            f"(copy a checkpoint into <output_dir>/checkpoints/ only if you trust where it came from)"
        )


def resume_checkpoint(resume: Optional[str], output_dir: str | Path) -> Optional[Path]:
    """The checkpoint folder `--resume` names: None/"" -> None (a fresh start); "auto" -> the latest complete
    checkpoint in `output_dir/checkpoints` (None when there is none); a path -> that folder. Either must pass
    `check_own_checkpoint` (ValueError otherwise)."""
    if not resume:
        return None
    path = latest_checkpoint(Path(output_dir) / "checkpoints") if resume == "auto" else Path(resume)
    if path is not None:
        check_own_checkpoint(path, output_dir)
    return path


def recover_checkpoints(root: str | Path) -> list[str]:
    """Finish what a run killed while checkpointing left in `root` (call on one process, before anything reads the
    checkpoints); returns one line per action, for the log.

    - `.tmp-step_X` with its trainer_state.json (complete) and no `step_X`: moved into place (a kill between
      retiring an old `step_X` and renaming the new one in); with a `step_X` present: retired (a duplicate).
    - `.tmp-step_X` without it (killed mid-write): deleted. `.retired-*` (killed mid-delete): deleted.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    actions = []
    for p in sorted(root.iterdir()):
        m = _TMP_DIR.match(p.name)
        if m and (p / _STATE_FILE).is_file() and not (root / f"step_{m.group(1)}").exists():
            os.replace(p, root / f"step_{m.group(1)}")
            actions.append(f"completed checkpoint {p.name} moved into place as step_{m.group(1)}")
        elif m or p.name.startswith(RETIRED_MARK):
            shutil.rmtree(p, ignore_errors=True)
            actions.append(f"removed {p.name} ({'unfinished write' if m and not (p / _STATE_FILE).is_file() else 'leftover'})")
    return actions


def save_checkpoint(
    root: str | Path,
    state: TrainerState,
    engines: dict,
    export_model: Callable[[Path], None],
    keep_last: int,
    rank: int,
    barrier: Callable[[], None],
) -> Path:
    """Write checkpoint `root/step_{state.step}` atomically; collective (every process calls it).

    engines: {"generator": engine, "discriminator": engine} (DeepSpeed engines or None);
    export_model(folder): writes the fp32 tokenizer (collective; rank 0 writes the files).
    """
    root = Path(root)
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp-step_{state.step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    for name, engine in engines.items():
        if engine is not None:
            engine.save_checkpoint(str(tmp / name), tag="ds", save_latest=False)
    kill_point("write", state.step)
    (tmp / "rng").mkdir(exist_ok=True)
    atomic_write_text(tmp / "rng" / f"rank_{rank:05d}.json", json.dumps(get_rng_state()))
    export_model(tmp / "model")
    barrier()
    if rank == 0:
        atomic_write_text(tmp / _STATE_FILE, state.to_json())  # the folder is complete from here on
        if final.exists():  # re-running the same step after a resume: the old folder leaves the namespace first
            retire_folder(final)
            kill_point("replace", state.step)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            retire_folder(old, state.step)
    barrier()
    return final


def load_checkpoint(path: str | Path, engines: dict, rank: int) -> TrainerState:
    """Restore the engines, this process's RNG states and the trainer state from a checkpoint folder."""
    path = Path(path)
    state_file = path / _STATE_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} not found (expected a folder step_XXXXXXXX written by "
                                f"larp-train-tokenizer in <output_dir>/checkpoints)")
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {_STATE_FILE}); expected a "
                                f"folder step_XXXXXXXX written by larp-train-tokenizer")
    for name, engine in engines.items():
        if engine is None:
            continue
        loaded, _ = engine.load_checkpoint(str(path / name), tag="ds", load_optimizer_states=True,
                                           load_lr_scheduler_states=False, load_module_strict=True)
        if loaded is None:
            raise FileNotFoundError(f"could not load the {name} engine state from {path / name}")
    rng_file = path / "rng" / f"rank_{rank:05d}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    else:  # resumed on more processes than wrote the checkpoint: continues, but not bit-exactly
        warnings.warn(f"{rng_file} missing (checkpoint written by fewer processes); this process keeps its own seed")
    return TrainerState.from_json(state_file.read_text())
