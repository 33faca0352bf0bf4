"""Checkpoints of `larp-train-llm` (llm_adapters.train): which one a run resumes from, and loading its weights.

The HF Trainer writes ``output_dir/checkpoint-N`` folders; a run resumes only from its own ones (resuming unpickles
DeepSpeed's engine files).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from larp_mllm.runtime.files import atomic_write_text

from .model import ADAPTER_FILE, VideoLLM


def load_checkpoint_weights(video_llm: VideoLLM, folder: str | Path) -> None:
    """Copy the LoRA and video-adapter weights of a bundle/checkpoint folder into `video_llm` (in place)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    peft_file, adapter_file = folder / "adapter_model.safetensors", folder / ADAPTER_FILE
    if not peft_file.is_file() and not adapter_file.is_file():
        raise FileNotFoundError(f"{folder} holds neither adapter_model.safetensors nor {ADAPTER_FILE}")
    model = video_llm.model
    if adapter_file.is_file():
        from .adapter import load_video_adapter_state_dict

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        load_video_adapter_state_dict(base, load_file(str(adapter_file)))
    if peft_file.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(peft_file)))
        if result.unexpected_keys:
            raise ValueError(f"{peft_file} does not fit the model: unexpected keys {result.unexpected_keys[:5]}")



def write_json(path: Path, value: Any) -> None:
    """Write `value` as indented JSON to `path` atomically (a per-process temporary file, then os.replace)."""
    atomic_write_text(path, json.dumps(value, indent=2, default=str))


def check_own_checkpoint(path: str | Path, output_dir: str | Path) -> None:
    """Raise ValueError unless `path` is one of this run's checkpoints: a `checkpoint-N` folder directly in
    `output_dir` (both with symlinks resolved, so a link out of the run folder does not count).

    Resuming unpickles files of the checkpoint: under DeepSpeed its engine states (`global_stepN/*.pt`, read with
    `torch.load(weights_only=False)`); the plain Trainer reads optimizer / scheduler / RNG files with
    `weights_only=True`. Only folders this run wrote itself are loaded.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    root, real = Path(output_dir).resolve(), Path(path).resolve()
    if real.parent != root or not re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", real.name):
        raise ValueError(
            f"resume_from_checkpoint={str(path)!r} is not a checkpoint of this run: larp-train-llm resumes only from "
            f"the checkpoint-N folders in its own output_dir ({root}), because resuming unpickles the checkpoint's "
            f"DeepSpeed engine files (torch.load with weights_only=False), which can run any code their author put "
            f"there. Leave resume_from_checkpoint unset (the last checkpoint of output_dir), or set --output-dir to "
            f"the run folder that wrote it (copy a checkpoint into output_dir only if you trust where it came from)"
        )


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """Checkpoint to resume from: a path; None/"last" = the last checkpoint in output_dir (if any); "no" = none.
    Only this run's own checkpoints are accepted (`check_own_checkpoint`)."""
    from transformers.trainer_utils import get_last_checkpoint

    if value is not None and value.lower() in ("no", "none", "false"):
        return None
    if value is None or value.lower() in ("last", "auto", "true"):
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None and value is not None:
            raise FileNotFoundError(f"resume_from_checkpoint={value!r} but {output_dir} holds no checkpoint-N folder")
    else:
        last = value
    if last is not None:
        check_own_checkpoint(last, output_dir)
        if not Path(last).is_dir():
            raise FileNotFoundError(f"checkpoint folder {last} not found")
    return last
