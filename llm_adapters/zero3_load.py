"""Loading a base model under ZeRO-3 so that no process ever holds it whole, not even while reading the checkpoint.

transformers' own ZeRO-3 path builds the model inside DeepSpeed's ``zero.Init`` (partitioned as it is built), but then
reads the whole checkpoint on rank 0 and broadcasts every tensor, and re-initialises every weight on the way (each
parameter gathered whole in turn). `load_partitioned` builds the model the same way without initialising it or
broadcasting its (meaningless) initial values, then
each process reads from the safetensors files only the flat range of each parameter that it owns, in row chunks,
with the file mapped only while a chunk is read. Used by larp-train-llm for a local folder of safetensors files; any
other source (a hub id, a GGUF file, a checkpoint whose names differ from the model's) goes through transformers.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("llm_adapters.train")
CHUNK_ELEMENTS = 1 << 23  # elements read per step (32 MiB of fp32): bounds the transient memory of a read


def safetensors_index(folder: str | Path) -> dict[str, Path] | None:
    """{tensor name: file} of a folder's safetensors checkpoint (one file or an index), or None when it has none."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def _checkpoint_name(name: str, names: dict[str, Path], prefix: str) -> str | None:
    for candidate in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
        if candidate in names:
            return candidate
    return None


@torch.no_grad()
def _fill_partition(param: torch.Tensor, file: Path, key: str, rank: int) -> None:
    """Copy this rank's flat range of checkpoint tensor `key` into the ZeRO-3 partition `param.ds_tensor`."""
    from safetensors import safe_open

    part = param.ds_tensor  # (partition_size,) flat: elements [rank * size, (rank + 1) * size) of the whole
    size = part.numel()
    start, end = rank * size, min((rank + 1) * size, param.ds_numel)
    shape = tuple(param.ds_shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1  # elements per leading index
    pos = start
    while pos < end:
        first = pos // row
        last = min(math.ceil(end / row), first + max(1, CHUNK_ELEMENTS // row))  # leading indices [first, last)
        with safe_open(str(file), framework="pt") as f:  # mapped only for this chunk
            block = f.get_slice(key)[first:last].reshape(-1)  # ((last - first) * row,) flat
        take = min(end, last * row) - pos
        offset = pos - first * row
        part[pos - start: pos - start + take].copy_(block[offset: offset + take].to(part.dtype))
        pos += take


@torch.no_grad()
def load_partitioned(source: str | Path, dtype: torch.dtype, **model_kwargs: Any) -> torch.nn.Module | None:
    """The causal LM of a local safetensors folder, built partitioned under the active ZeRO-3 config, each process
    reading only its own part of every parameter; None when the folder's names do not cover the model (the caller
    then loads through transformers).

    Requires the HF DeepSpeed config to be set (``is_deepspeed_zero3_enabled()``) and the process group joined.
    """
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations import deepspeed_config
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    names = safetensors_index(source)
    if names is None:
        return None
    config = AutoConfig.from_pretrained(source)
    class PartitionOnly(deepspeed.zero.Init):
        """zero.Init that partitions each new parameter without first broadcasting rank 0's values to every rank
        (a whole-tensor buffer per parameter on each rank): every weight is read from the checkpoint right after."""

        def _zero_init_param(self, param: torch.nn.Parameter) -> None:
            self._convert_to_deepspeed_param(param)
            param.partition()

    # what from_pretrained does under ZeRO-3, without initialising the weights (every weight is read below)
    with no_init_weights(), prevent_arange_dtype_change(), PartitionOnly(config_dict_or_path=deepspeed_config()), \
            set_zero3_state():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **model_kwargs)
    model.tie_weights()  # a tied head shares the embedding's parameter (not in the checkpoint under its own name)
    prefix = getattr(model, "base_model_prefix", "")
    params = dict(model.named_parameters())
    keys = {name: _checkpoint_name(name, names, prefix) for name in params}
    missing = sorted(n for n, k in keys.items() if k is None)
    if missing:
        logger.warning("checkpoint names do not cover %d parameters (e.g. %s): loading through transformers",
                       len(missing), missing[:3])
        return None
    rank = torch.distributed.get_rank()
    for name, param in params.items():
        _fill_partition(param, names[keys[name]], keys[name], rank)
    from safetensors import safe_open

    for name, buffer in model.named_buffers():  # persistent buffers kept in the checkpoint (small): read whole
        key = _checkpoint_name(name, names, prefix)
        if key is not None:
            with safe_open(str(names[key]), framework="pt") as f:
                buffer.copy_(f.get_tensor(key))
    if (Path(source) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(source)
    model.eval()
    return model
