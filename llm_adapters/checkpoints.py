"""Checkpoints of `larp-train-llm` (llm_adapters.train): written so a kill at any moment leaves no broken-looking
folder, which one a run resumes from, loading their weights, and a TensorBoard log that continues after a resume.

The HF Trainer writes ``output_dir/checkpoint-N`` in place. `SafeCheckpoints` (mixed into the trainer) makes that safe:

- an existing ``checkpoint-N`` (a run restarted from an older checkpoint reaches step N again) leaves the
  ``checkpoint-*`` namespace before the new one is written (larp_mllm.runtime.checkpoint_folders.retire_folder);
- when every process has written its part, the saving process writes ``checkpoint_complete.json`` last (atomically):
  only folders holding it are checkpoints (`list_checkpoints`);
- old checkpoints beyond ``save_total_limit`` are pruned by renaming them out of the namespace, then deleting them
  (the Trainer's own rotation, which deletes in place, is switched off for the duration of the save).

At start, `resolve_resume` removes what killed saves left (`recover_checkpoints`: folders without the marker,
``.retired-*`` leftovers) and picks the newest complete checkpoint; a complete one is never deleted. A run resumes
only from its own folders (resuming unpickles DeepSpeed's engine files). Kill points for the tests: ``write``
(model written, optimizer not), ``replace`` and ``prune`` (larp_mllm.runtime.checkpoint_folders).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from larp_mllm.runtime.checkpoint_folders import kill_point, remove_retired, retire_folder
from larp_mllm.runtime.files import atomic_write_json

from .model import ADAPTER_FILE, VideoLLM

logger = logging.getLogger("llm_adapters.train")
COMPLETE_FILE = "checkpoint_complete.json"  # written last, once every process has saved: marks a whole checkpoint
_CHECKPOINT_DIR = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


# ---- folders --------------------------------------------------------------------------------------------------
def checkpoint_step(path: str | Path) -> int | None:
    """N of a ``checkpoint-N`` folder name, else None."""
    m = _CHECKPOINT_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(folder: str | Path) -> bool:
    """Whether a ``checkpoint-N`` folder was finished (its completion marker is there)."""
    return (Path(folder) / COMPLETE_FILE).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders of `output_dir`, oldest (smallest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if (step := checkpoint_step(p)) is not None and is_complete(p)]
    return [p for _, p in sorted(found)]


def recover_checkpoints(output_dir: str | Path) -> list[str]:
    """Remove what killed saves left in `output_dir` (one process, before anything reads the checkpoints): every
    ``checkpoint-N`` without its completion marker (killed while writing) and the ``.retired-*`` leftovers of killed
    deletions. Returns one line per action, for the log."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    actions = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and checkpoint_step(p) is not None and not is_complete(p):
            retire_folder(p)
            actions.append(f"removed {p.name} (unfinished: no {COMPLETE_FILE})")
    actions += [f"removed {name} (leftover of a deletion)" for name in remove_retired(root)]
    return actions


def load_checkpoint_weights(video_llm: VideoLLM, folder: str | Path) -> None:
    """Copy the LoRA and video-adapter weights of a bundle/checkpoint folder into `video_llm` (in place)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    peft_file, adapter_file = folder / "adapter_model.safetensors", folder / ADAPTER_FILE
    if not peft_file.is_file() and not adapter_file.is_file():
        raise FileNotFoundError(f"{folder} holds neither adapter_model.safetensors nor {ADAPTER_FILE}")
    model = video_llm.model
    if adapter_file.is_file():
        from .adapter import hf_model, load_video_adapter_state_dict

        load_video_adapter_state_dict(hf_model(model), load_file(str(adapter_file)))
    if peft_file.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(peft_file)))
        if result.unexpected_keys:
            raise ValueError(f"{peft_file} does not fit the model: unexpected keys {result.unexpected_keys[:5]}")



def check_own_checkpoint(path: str | Path, output_dir: str | Path) -> None:
    """Raise unless `path` is one of this run's complete checkpoints: FileNotFoundError when it does not exist;
    ValueError unless it is a `checkpoint-N` folder directly in `output_dir` (both with symlinks resolved, so a link
    out of the run folder does not count) holding the completion marker.

    Resuming unpickles files of the checkpoint: under DeepSpeed its engine states (`global_stepN/*.pt`, read with
    `torch.load(weights_only=False)`); the plain Trainer reads optimizer / scheduler / RNG files with
    `weights_only=True`. Only folders this run wrote itself are loaded.
    """
    root, real = Path(output_dir).resolve(), Path(path).resolve()
    if not real.exists():
        raise FileNotFoundError(f"resume_from_checkpoint={str(path)!r}: checkpoint folder not found (this run's "
                                f"checkpoints are the complete checkpoint-N folders in {root}; leave "
                                f"resume_from_checkpoint unset to continue from the newest one)")
    if real.parent != root or checkpoint_step(real) is None:
        raise ValueError(
            f"resume_from_checkpoint={str(path)!r} is not a checkpoint of this run: larp-train-llm resumes only from "
            f"the checkpoint-N folders in its own output_dir ({root}), because resuming unpickles the checkpoint's "
            f"DeepSpeed engine files (torch.load with weights_only=False), which can run any code their author put "
            f"there. Leave resume_from_checkpoint unset (the last checkpoint of output_dir), or set --output-dir to "
            f"the run folder that wrote it (copy a checkpoint into output_dir only if you trust where it came from)"
        )
    if not is_complete(real):
        raise ValueError(f"resume_from_checkpoint={str(path)!r} is an unfinished checkpoint (no {COMPLETE_FILE}: the "
                         f"run was stopped while writing it); resume from an earlier one, or leave "
                         f"resume_from_checkpoint unset for the newest complete one")


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """Checkpoint to resume from: a path; None/"last"/"auto" = the newest complete checkpoint in output_dir (None when
    there is none; an error when "last"/"auto" was asked for explicitly); "no" = none.

    Before choosing, the launching process (RANK 0 or unset) removes what killed saves left (`recover_checkpoints`);
    the choice reads only complete folders, so every process picks the same one. Only this run's own checkpoints are
    accepted (`check_own_checkpoint`).
    """
    if value is not None and value.lower() in ("no", "none", "false"):
        return None
    latest = value is None or value.lower() in ("last", "auto", "true")
    if not latest:
        check_own_checkpoint(value, output_dir)  # before recovery: an unfinished folder named here is reported
    if int(os.environ.get("RANK", "0")) == 0:
        for line in recover_checkpoints(output_dir):
            logger.warning("checkpoints: %s", line)
    if not latest:
        return value
    found = list_checkpoints(output_dir)
    if not found and value is not None:
        raise FileNotFoundError(f"resume_from_checkpoint={value!r} but {output_dir} holds no complete checkpoint-N "
                                f"folder")
    return str(found[-1]) if found else None


# ---- the trainer side -----------------------------------------------------------------------------------------
class SafeCheckpoints:
    """Trainer mixin (put it before `transformers.Trainer` in the bases): checkpoint-N folders that a kill at any
    moment cannot leave broken-looking; see the module docstring."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if self.args.should_save and folder.exists():  # written by an earlier attempt that went further
            retire_folder(folder)
            kill_point("replace", step)
        self.accelerator.wait_for_everyone()  # nobody writes into the folder before the old one is gone
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # pruned below, out of the namespace
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            atomic_write_json(folder / COMPLETE_FILE, {"step": step})
            keep = {Path(self.state.best_model_checkpoint).name} if self.state.best_model_checkpoint else set()
            old = [p for p in list_checkpoints(run_dir) if p.name not in keep]
            for stale in old[: max(0, len(old) - limit)] if limit else []:
                retire_folder(stale, step)
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        kill_point("write", self.state.global_step)  # the bundle is written, the optimizer state not yet
        super()._save_optimizer_and_scheduler(output_dir)


class ContinuedTensorBoard(TensorBoardCallback):
    """TensorBoard in one folder (``output_dir/runs``) for every attempt of a run; after a resume from step S the
    rows a killed attempt logged at steps > S are dropped (SummaryWriter's ``purge_step``), so each step has one row.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.logging_dir = self.logging_dir or os.path.join(args.output_dir, "runs")
        self._purge_step = state.global_step + 1 if state.global_step else None  # rows after the resume point
        super().on_train_begin(args, state, control, **kwargs)

    def _init_summary_writer(self, args: Any) -> None:
        if self._SummaryWriter is not None:
            self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=getattr(self, "_purge_step", None))
