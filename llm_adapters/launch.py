"""DeepSpeed / launcher glue of `larp-train-llm` (llm_adapters.train): configs, process environment, ZeRO-3 helpers.

Used by ``llm_adapters.train``; the launch commands are the trainer's::

    larp-train-llm --config configs/llm/tiny_cpu.yaml --deepspeed configs/deepspeed/zero2.json   # one process
    deepspeed --num_gpus 8 --module llm_adapters.train --config configs/llm/ucf101_class_cond.yaml \
        --deepspeed configs/deepspeed/zero3.json

- `resolve_deepspeed_config`: the project's DeepSpeed JSONs hold "auto" fields the HF Trainer cannot fill
  (``torch_autocast``, ``overlap_comm``); they are resolved here, and the CPU gets ``torch_adam``.
- `deepspeed_training_args`: ``use_cpu`` (set when there is no CUDA), the resolved config and the single-process
  environment (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR and a free MASTER_PORT) a launcher would otherwise set.
- `full_weights_on_load` / `gather_trainable`: under ZeRO-3, load the base unpartitioned (extend_llm needs the
  embedding rows) and gather the trainable parameters to save them whole.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

import torch

DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_distributed_env() -> None:
    """Single-process defaults for the variables a DeepSpeed/torch.distributed launcher would set (a free port).

    Nothing changes when RANK and WORLD_SIZE are already set (a launcher started this process); otherwise each of
    RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1, MASTER_PORT=<free port> is set unless present.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    port = free_port()
    for key, value in zip(DISTRIBUTED_ENV, (0, 1, 0, "127.0.0.1", port)):
        os.environ.setdefault(key, str(value))


def resolve_deepspeed_config(config: str | Path | dict, use_cpu: bool) -> dict:
    """A DeepSpeed config the HF Trainer accepts: the project's "auto" fields it cannot fill are resolved here.

    - ``torch_autocast`` with "auto" (the tokenizer stage's engines fill it themselves) -> ``bf16.enabled: "auto"``,
      which the Trainer fills from ``--bf16`` (DeepSpeed's bf16 mode: bf16 weights, fp32 master copy).
    - ``zero_optimization.overlap_comm: "auto"`` -> True on GPUs, False on the CPU.
    - on the CPU, an optimizer given in the JSON gets ``torch_adam: true`` (no fused-Adam JIT build).

    `config` is a JSON file path or a dict (copied, never changed). Raises FileNotFoundError for a missing file.
    """
    if isinstance(config, dict):
        cfg = json.loads(json.dumps(config))
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {path} not found (expected e.g. configs/deepspeed/zero2.json)")
        cfg = json.loads(path.read_text())
    autocast = cfg.get("torch_autocast")
    if isinstance(autocast, dict) and "auto" in (autocast.get("enabled"), autocast.get("dtype")):
        cfg.pop("torch_autocast")
        cfg.setdefault("bf16", {"enabled": "auto"})
    zero = cfg.get("zero_optimization", {})
    if zero.get("overlap_comm") == "auto":
        zero["overlap_comm"] = bool(torch.cuda.is_available() and not use_cpu)
    if "optimizer" in cfg and (use_cpu or not torch.cuda.is_available()):
        cfg["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)
    return cfg


def deepspeed_training_args(training: dict[str, Any]) -> dict[str, Any]:
    """`TrainingArguments` keyword values with DeepSpeed prepared (a new dict; unchanged without ``deepspeed``).

    With ``deepspeed`` set: ``use_cpu`` becomes True when there is no CUDA (DeepSpeed then runs on the CPU with
    gloo), the config is resolved (resolve_deepspeed_config) and the single-process environment is set up
    (ensure_distributed_env) — before `TrainingArguments` is built, since building it initialises DeepSpeed's
    process group.
    """
    out = dict(training)
    if out.get("deepspeed"):
        out["use_cpu"] = bool(out.get("use_cpu")) or not torch.cuda.is_available()
        out["deepspeed"] = resolve_deepspeed_config(out["deepspeed"], out["use_cpu"])
        ensure_distributed_env()
    return out


@contextlib.contextmanager
def full_weights_on_load(training_args: Any) -> Iterator[None]:
    """Load the base unpartitioned even under a ZeRO-3 config (transformers would load it inside zero.Init):
    extend_llm needs the embedding rows. DeepSpeed partitions the extended model when the Trainer starts the engine
    (each rank holds the full base in CPU memory until then). A no-op without a DeepSpeed config."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    config = getattr(training_args, "hf_deepspeed_config", None)
    if config is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(config)


def gather_trainable(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Under ZeRO-3, gather the trainable (LoRA + adapter) parameters on every rank; otherwise do nothing."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad], modifier_rank=None)
