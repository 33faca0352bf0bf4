"""Loading a base model under ZeRO-3 so that no process ever holds it whole, not even while reading the checkpoint,
and reading a partitioned weight's rows without gathering it.

transformers' own ZeRO-3 path builds the model inside DeepSpeed's ``zero.Init`` (partitioned as it is built), but then
reads the whole checkpoint on rank 0 and broadcasts every tensor, and re-initialises every weight on the way (each
parameter gathered whole in turn). `load_partitioned` builds the model the same way without initialising it,
broadcasting its (meaningless) initial values or copying them into the partitions, then each process reads from the
safetensors files only the flat range of each parameter that it owns, in row chunks, with the file mapped only while
a chunk is read. Used by larp-train-llm for a local folder of safetensors files; any other source (a hub id, a GGUF
file, a checkpoint whose names differ from the model's) goes through transformers.

`partitioned_row_sums` and `partitioned_rows` read statistics and single rows of a partitioned (rows, h) weight from
each rank's part and one all-reduce: extend_llm's row statistics under ZeRO-3, without gathering the embedding whole.
"""
from __future__ import annotations

import gc
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("llm_adapters.train")
CHUNK_ELEMENTS = 1 << 20  # elements read per step (4 MiB of fp32): bounds the transient memory of a read
STATS_CHUNK_ROWS = 1024  # rows summed per step by `partitioned_row_sums` (a float64 copy: 7 MiB for h = 896)


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


# ---- the part of a partitioned parameter this rank holds ---------------------------------------------------------
def is_partitioned(param: torch.Tensor) -> bool:
    """Whether `param` is a ZeRO-3 parameter whose values are now spread over the ranks (not gathered whole)."""
    if getattr(param, "ds_tensor", None) is None:
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.NOT_AVAILABLE


def _owned_range(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's partition (size,) flat, start, end): it holds elements [start, end) of the flattened whole."""
    part = param.ds_tensor
    start = torch.distributed.get_rank(group=param.ds_process_group) * part.ds_numel
    return part, start, min(start + part.ds_numel, param.ds_numel)


@torch.no_grad()
def partitioned_row_sums(weight: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums (h,) and column sums of squares (h,) of `weight[:rows]`, float64, of a partitioned (R, h) weight:
    each rank sums the elements it holds, then one all-reduce (every rank of the weight's group must call this)."""
    part, start, end = _owned_range(weight)
    h = weight.ds_shape[1]
    sums = torch.zeros(2, h, dtype=torch.float64, device=part.device)  # (2, h): sums, sums of squares
    stop = min(end, rows * h)

    def add(flat: torch.Tensor, column: int) -> None:  # a run of one row's elements, from `column` on
        sums[:, column: column + flat.numel()] += torch.stack([flat.double(), flat.double().square()])

    if start < stop:
        whole_from = min(stop, -(-start // h) * h)  # the first element of a whole row, or stop
        whole_to = max(whole_from, stop // h * h)
        add(part[: whole_from - start], start % h)  # the end of the row the part starts in
        step = STATS_CHUNK_ROWS * h
        for pos in range(whole_from, whole_to, step):
            block = part[pos - start: min(whole_to, pos + step) - start].view(-1, h).to(torch.float64, copy=True)
            sums[0] += block.sum(0)  # block: (c, h)
            sums[1] += block.square_().sum(0)
        add(part[whole_to - start: stop - start], 0)  # the start of the row the part ends in
    torch.distributed.all_reduce(sums, group=weight.ds_process_group)
    return sums[0], sums[1]


@torch.no_grad()
def partitioned_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `weight[ids]` (p, h) of a partitioned (R, h) weight, in its dtype: each rank writes the elements it holds
    into zeros, then one all-reduce (a sum with exactly one non-zero term per element)."""
    part, start, end = _owned_range(weight)
    h = weight.ds_shape[1]
    out = torch.zeros(len(ids), h, dtype=part.dtype, device=part.device)  # (p, h)
    for i, row in enumerate(ids.tolist()):
        lo, hi = max(start, row * h), min(end, (row + 1) * h)
        if lo < hi:
            out[i, lo - row * h: hi - row * h] = part[lo - start: hi - start]
    torch.distributed.all_reduce(out, group=weight.ds_process_group)
    return out


# ---- loading -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def _fill_partition(param: torch.Tensor, file: Path, key: str) -> None:
    """Copy this rank's flat range of checkpoint tensor `key` into the ZeRO-3 partition `param.ds_tensor`."""
    from safetensors import safe_open

    part, start, end = _owned_range(param)  # elements [start, end) of the whole, flat
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
        del block  # freed before the next chunk is read


def _partition_only_init() -> type:
    import deepspeed
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus

    class PartitionOnly(deepspeed.zero.Init):
        """zero.Init that partitions each new parameter without broadcasting rank 0's values to every rank (a
        whole-size buffer per parameter on each rank) and without copying its (uninitialised) values into the
        partition: the partition's memory is first written when the checkpoint is read into it. A parameter that is
        never read (a tied head's own weight, replaced by the embedding's) thus never occupies memory."""

        def _zero_init_param(self, param: torch.nn.Parameter) -> None:
            self._convert_to_deepspeed_param(param)
            plain = (self.remote_device != "nvme" and not self.pin_memory and not self.quantized_nontrainable_weights
                     and self.zero_param_process_group is None)
            if plain:  # what DeepSpeed's _partition_param sets up for a new partition, less the copy
                aligned = self._aligned_size(param)
                part = torch.empty(aligned // self._partition_world_size(param), dtype=param.dtype,
                                   device=self.remote_device)
                part.requires_grad = False
                part.ds_numel, part.status, part.final_location = part.numel(), PartitionedParamStatus.AVAILABLE, None
                param.ds_tensor, param.ds_numel_aligned = part, aligned
            param.partition()  # with the partition in place DeepSpeed only frees the whole-size data

    return PartitionOnly


@torch.no_grad()
def load_partitioned(source: str | Path, dtype: torch.dtype, **model_kwargs: Any) -> torch.nn.Module | None:
    """The causal LM of a local safetensors folder, built partitioned under the active ZeRO-3 config, each process
    reading only its own part of every parameter; None when the folder's names do not cover the model (the caller
    then loads through transformers).

    Requires the HF DeepSpeed config to be set (``is_deepspeed_zero3_enabled()``) and the process group joined.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations import deepspeed_config
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    names = safetensors_index(source)
    if names is None:
        return None
    ds_config = deepspeed_config()
    if ds_config is None:  # transformers holds it weakly: zero.Init would fall back to its own defaults (bf16 on CPU)
        raise RuntimeError("no DeepSpeed config is set: keep the TrainingArguments that carry it alive")
    config = AutoConfig.from_pretrained(source)
    # what from_pretrained does under ZeRO-3, without initialising the weights (every weight is read below)
    with no_init_weights(), prevent_arange_dtype_change(), _partition_only_init()(config_dict_or_path=ds_config), \
            set_zero3_state():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **model_kwargs)
    model.tie_weights()  # a tied head shares the embedding's parameter (not in the checkpoint under its own name)
    gc.collect()  # the head's own parameter, now unused, is held by DeepSpeed's reference cycles until a collection
    prefix = getattr(model, "base_model_prefix", "")
    params = dict(model.named_parameters())
    keys = {name: _checkpoint_name(name, names, prefix) for name in params}
    missing = sorted(n for n, k in keys.items() if k is None)
    if missing:
        logger.warning("checkpoint names do not cover %d parameters (e.g. %s): loading through transformers",
                       len(missing), missing[:3])
        return None
    for name, param in params.items():
        _fill_partition(param, names[keys[name]], keys[name])
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
