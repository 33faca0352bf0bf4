"""DeepSpeed glue of `larp-train-llm` (llm_adapters.train): the config the HF Trainer gets, ZeRO-3 helpers.

Used by ``llm_adapters.train``; the launch commands are the trainer's::

    larp-train-llm --config configs/llm/tiny_cpu.yaml --deepspeed configs/deepspeed/zero2.json   # one process
    deepspeed --num_gpus 8 --module llm_adapters.train --config configs/llm/ucf101_class_cond.yaml \
        --deepspeed configs/deepspeed/zero3.json

- `deepspeed_training_args`: ``use_cpu`` (set when there is no CUDA), the DeepSpeed config resolved with this
  stage's settings (larp_mllm.runtime.deepspeed: ``--bf16`` / ``--fp16`` ask for DeepSpeed's bf16 / fp16 weights;
  the batch sizes and clipping stay "auto" for the HF Trainer, which fills them with the same meaning) and the
  single-process environment a launcher would otherwise set (larp_mllm.runtime.distributed).
- `gather_trainable`: under ZeRO-3 the base is loaded already partitioned (llm_adapters.zero3_load, or transformers
  building it inside DeepSpeed's ``zero.Init``): no rank ever holds the whole model, not even while `extend_llm` reads
  the statistics of its embedding and head rows (from each rank's part). Only the trainable parameters are gathered,
  to save them whole.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from larp_mllm.runtime.deepspeed import StageSettings, resolve_deepspeed_config
from larp_mllm.runtime.distributed import ensure_distributed_env

# "auto" keys the HF Trainer fills from TrainingArguments (transformers.integrations.deepspeed,
# HfTrainerDeepSpeedConfig.trainer_config_process / trainer_config_finalize).
HF_TRAINER_FILLS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps", "optimizer.params.weight_decay",
    "scheduler.params.warmup_min_lr", "scheduler.params.warmup_max_lr", "scheduler.params.total_num_steps",
    "scheduler.params.warmup_num_steps", "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
})
PRECISION_HINT = ("larp-train-llm asks for mixed precision with --bf16 (or --fp16): DeepSpeed's bf16 (fp16) weights "
                  "with an fp32 master copy, through the HF Trainer; it does not autocast over fp32 weights.")


def stage_settings(training: dict[str, Any]) -> StageSettings:
    """This stage's DeepSpeed settings from `TrainingArguments` keyword values (``use_cpu`` already decided)."""
    weights = "fp32"
    if training.get("bf16") or training.get("bf16_full_eval"):
        weights = "bf16"
    elif training.get("fp16") or training.get("fp16_full_eval"):
        weights = "fp16"
    return StageSettings(on_gpu=torch.cuda.is_available() and not training.get("use_cpu"), weights=weights,
                         precision_hint=PRECISION_HINT, later_fills=HF_TRAINER_FILLS)


def deepspeed_training_args(training: dict[str, Any]) -> dict[str, Any]:
    """`TrainingArguments` keyword values with DeepSpeed prepared (a new dict; unchanged without ``deepspeed``).

    With ``deepspeed`` set: ``use_cpu`` becomes True when there is no CUDA (DeepSpeed then runs on the CPU with
    gloo), the config is resolved for this stage (`stage_settings`) and the single-process environment is set up
    (ensure_distributed_env) — before `TrainingArguments` is built, since building it initialises DeepSpeed's
    process group.
    """
    out = dict(training)
    if out.get("deepspeed"):
        out["use_cpu"] = bool(out.get("use_cpu")) or not torch.cuda.is_available()
        out["deepspeed"] = resolve_deepspeed_config(out["deepspeed"], stage_settings(out))
        ensure_distributed_env()
    return out


def join_deepspeed_comm(training_args: Any) -> None:
    """Under ZeRO-3, make DeepSpeed's communication layer use the process group the Trainer's arguments created, before
    the base is built inside ``zero.Init`` (which reads the world size from it; on the CPU that group is gloo and
    DeepSpeed would otherwise count a world of one)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    import deepspeed

    training_args.world_size  # noqa: B018  (the property sets the process group up)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    deepspeed.init_distributed(dist_backend=backend)


def gather_trainable(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Under ZeRO-3, gather the trainable (LoRA + adapter) parameters on every rank; otherwise do nothing."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad], modifier_rank=None)


def held_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model): equal for an ordinary model; under ZeRO-3 each
    rank holds its partition (``ds_tensor``) of every partitioned parameter and the whole of the others."""
    held = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):
            total += p.ds_numel
            held += p.ds_tensor.numel() if p.ds_tensor is not None else 0
        else:
            total += p.numel()
            held += p.numel()
    return held, total
