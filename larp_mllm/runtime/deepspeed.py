"""DeepSpeed JSON configs: the "auto" fields, with one meaning per key for both training stages.

    ds = resolve_deepspeed_config("configs/deepspeed/zero2.json", StageSettings(on_gpu=False, batch=layout, ...))

Both trainers (`larp-train-tokenizer`, `larp-train-llm`) read the same JSONs (configs/deepspeed/zero{0,2,3}.json or
the user's). Each passes what its own arguments say (`StageSettings`); `resolve_deepspeed_config` fills every
"auto" from it, adds the precision section the arguments ask for, and refuses an explicit value that contradicts
them, naming the key and why. What each key means, in both stages:

- ``train_batch_size`` / ``train_micro_batch_size_per_gpu`` / ``gradient_accumulation_steps``: samples per
  optimizer step over all processes = per process per forward x accumulation steps x processes. "auto": the
  stage's batch layout (left "auto" when the stage has none: the HF Trainer fills it with the same meaning).
- ``gradient_clipping``: max global gradient norm, 0 = no clipping. "auto": the stage's value (or the HF
  Trainer's ``max_grad_norm``).
- ``bf16.enabled`` / ``fp16.enabled``: DeepSpeed keeps the weights in bf16 / fp16 (fp32 master copy in the
  optimizer). "auto" or no section: on exactly when the stage's arguments ask for bf16 / fp16 weights (the LLM
  stage's ``--bf16`` / ``--fp16``; never the tokenizer stage, whose SVQ and prior run as fp32 islands).
- ``torch_autocast.enabled`` / ``.dtype``: fp32 weights, operations autocast to dtype. "auto" or no section: on,
  with the dtype, exactly when the stage's arguments ask for autocast (the tokenizer stage's ``precision: bf16`` /
  ``fp16``; never the LLM stage).
- ``zero_optimization.stage``: the ZeRO stage; "auto" = 2; no key = 0 (DeepSpeed's default); a stage's own
  override (the tokenizer's ``zero_stage``) wins. A stage refuses the ZeRO stages it does not support.
- ``zero_optimization.overlap_comm``: overlap gradient reduction with the backward; "auto" = on a GPU only.
- ``optimizer.params.torch_adam``: set (unless given) on the CPU, so DeepSpeed does not build its fused Adam.
- ``optimizer`` / ``scheduler``: refused by a stage that builds its optimizer and schedule itself (the tokenizer).

Any "auto" left over that the stage does not hand to a later filler (`StageSettings.later_fills`) is an error.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

__all__ = ["ZERO2_DEFAULT", "BatchLayout", "StageSettings", "resolve_deepspeed_config", "auto_keys"]

# The config a stage uses without a JSON: equal to configs/deepspeed/zero2.json (a test keeps them equal).
ZERO2_DEFAULT: dict = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 2, "overlap_comm": "auto", "contiguous_gradients": True,
                          "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000},
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPE_NAMES = {  # DeepSpeed's spellings of a torch_autocast dtype (deepspeed.runtime.config.DtypeEnum)
    "bf16": {"bf16", "bfloat16", "torch.bfloat16"},
    "fp16": {"fp16", "float16", "half", "torch.float16"},
}
_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch is split: global_batch = micro_batch * grad_accum * world."""

    global_batch: int
    micro_batch: int
    grad_accum: int
    world: int

    @classmethod
    def split(cls, global_batch: int, world: int, micro_batch: Optional[int] = None) -> "BatchLayout":
        """The layout of `global_batch` samples over `world` processes, `micro_batch` (default: global / world)
        per forward. Raises ValueError when the global batch is not a multiple of micro_batch x world."""
        micro = micro_batch or (global_batch // world)
        if micro < 1 or global_batch % (micro * world):
            raise ValueError(f"global_batch_size {global_batch} must be a multiple of micro_batch_size {micro} x "
                             f"{world} processes")
        return cls(global_batch, micro, global_batch // (micro * world), world)


@dataclass(frozen=True)
class StageSettings:
    """What one trainer's own arguments say about the keys a DeepSpeed JSON may leave "auto" (module docstring)."""

    on_gpu: bool
    batch: Optional[BatchLayout] = None  # None: the batch keys stay "auto" (a later filler owns them)
    gradient_clipping: Optional[float] = None  # max global grad norm, 0 = none; None: stays "auto"
    weights: str = "fp32"  # the precision DeepSpeed keeps the weights in: fp32, bf16 or fp16
    autocast: str = "fp32"  # torch autocast over fp32 weights: fp32 (off), bf16 or fp16
    zero_stage: Optional[int] = None  # the trainer's own ZeRO-stage override (wins over the JSON)
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)  # the ZeRO stages the trainer supports
    builds_optimizer: bool = False  # the trainer builds its optimizer and lr schedule (no such JSON sections)
    precision_hint: str = ""  # how this trainer asks for mixed precision (appended to precision refusals)
    later_fills: frozenset[str] = frozenset()  # "auto" keys a later step fills (the HF Trainer's); others: errors

    def __post_init__(self) -> None:
        if self.weights not in PRECISIONS or self.autocast not in PRECISIONS:
            raise ValueError(f"weights and autocast must be one of {PRECISIONS}, got {self.weights!r}, "
                             f"{self.autocast!r}")
        if "fp32" not in (self.weights, self.autocast):
            raise ValueError("low-precision weights and autocast over fp32 weights exclude each other")


def auto_keys(node: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted names of the fields whose value is "auto" (nested sections included)."""
    for key, value in node.items():
        if isinstance(value, Mapping):
            yield from auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            yield prefix + key


def load_deepspeed_json(source: str | Path | Mapping | None) -> dict:
    """A fresh dict: `source` read (a JSON path) or deep-copied (a mapping); None -> `ZERO2_DEFAULT`."""
    if source is None:
        return copy.deepcopy(ZERO2_DEFAULT)
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} not found (expected a JSON such as "
                                f"configs/deepspeed/zero2.json)")
    return json.loads(path.read_text())


def _fill(node: dict, key: str, value: Any, source: str) -> None:
    """node[key] = value where it is "auto" or absent; an explicit other value is refused."""
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value:
        raise ValueError(f"DeepSpeed config sets {key}={current!r} but {source} gives {value!r}; set it to \"auto\"")


def _refuse_precision(key: str, value: Any, wanted: Any, stage: StageSettings) -> ValueError:
    asked = f"weights {stage.weights}, autocast {stage.autocast}"
    return ValueError(f"DeepSpeed config sets {key}={value!r}, but the training arguments ask for {wanted!r} "
                      f"({asked}); set it to \"auto\" or remove it. {stage.precision_hint}".rstrip())


def _resolve_precision(ds: dict, stage: StageSettings) -> None:
    """bf16 / fp16 sections: low-precision weights; torch_autocast: autocast over fp32 weights (module docstring)."""
    if "bfloat16" in ds:  # DeepSpeed's other name of the bf16 section
        if "bf16" in ds:
            raise ValueError("DeepSpeed config has both 'bf16' and 'bfloat16' sections; keep one ('bf16')")
        ds["bf16"] = ds.pop("bfloat16")
    for name in ("bf16", "fp16"):
        wanted = stage.weights == name
        section = ds.get(name)
        if section is None:
            if wanted:
                ds[name] = {"enabled": True}
            continue
        enabled = section.get("enabled", False)
        if enabled == "auto":
            section["enabled"] = wanted
        elif bool(enabled) != wanted:
            raise _refuse_precision(f"{name}.enabled", enabled, wanted, stage)
    wanted = stage.autocast != "fp32"
    section = ds.get("torch_autocast")
    if section is None:
        if wanted:
            ds["torch_autocast"] = {"enabled": True, "dtype": _TORCH_DTYPE[stage.autocast]}
        return
    enabled = section.get("enabled", False)
    if enabled == "auto":
        section["enabled"] = enabled = wanted
    elif bool(enabled) != wanted:
        raise _refuse_precision("torch_autocast.enabled", enabled, wanted, stage)
    dtype = section.get("dtype", "auto")
    if not enabled:
        if dtype == "auto":
            section.pop("dtype", None)
    elif dtype == "auto":
        section["dtype"] = _TORCH_DTYPE[stage.autocast]
    elif str(dtype) not in _DTYPE_NAMES[stage.autocast]:
        raise _refuse_precision("torch_autocast.dtype", dtype, _TORCH_DTYPE[stage.autocast], stage)


def resolve_deepspeed_config(source: str | Path | Mapping | None, stage: StageSettings) -> dict:
    """The DeepSpeed config for one stage: `source` (a JSON path, a dict, or None for `ZERO2_DEFAULT`) with its
    "auto" fields filled from `stage` and its precision section added (module docstring). `source` is not changed.

    Raises FileNotFoundError for a missing file and ValueError for a value the stage cannot honour."""
    ds = load_deepspeed_json(source)
    where = "the training arguments"
    if "fp16" in (stage.weights, stage.autocast) and not stage.on_gpu:
        raise ValueError("fp16 needs a GPU (DeepSpeed's fp16 loss scaling is GPU-only); use bf16 or fp32")
    if stage.builds_optimizer and ("optimizer" in ds or "scheduler" in ds):
        raise ValueError("DeepSpeed config: remove 'optimizer'/'scheduler'; this trainer builds its optimizer and "
                         "sets the learning rate itself from its schedule")
    if stage.batch is not None:
        b = stage.batch
        _fill(ds, "train_batch_size", b.global_batch, f"{where} (global batch)")
        _fill(ds, "train_micro_batch_size_per_gpu", b.micro_batch, f"{where} (micro batch)")
        _fill(ds, "gradient_accumulation_steps", b.grad_accum, f"{where} (global / (micro x {b.world} processes))")
    if stage.gradient_clipping is not None:
        _fill(ds, "gradient_clipping", stage.gradient_clipping, f"{where} (max grad norm)")
    _resolve_precision(ds, stage)
    zero = ds.setdefault("zero_optimization", {})
    if stage.zero_stage is not None:
        zero["stage"] = stage.zero_stage
    elif zero.get("stage") == "auto":
        zero["stage"] = 2
    zero.setdefault("stage", 0)
    if zero["stage"] not in stage.zero_stages:
        raise ValueError(f"ZeRO stage {zero['stage']!r} is not supported here (supported: "
                         f"{', '.join(map(str, stage.zero_stages))})")
    if zero.get("overlap_comm") == "auto":
        zero["overlap_comm"] = stage.on_gpu
    if "optimizer" in ds and not stage.on_gpu:  # no fused-Adam JIT build on the CPU
        ds["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)
    leftover = sorted(set(auto_keys(ds)) - stage.later_fills)
    if leftover:
        raise ValueError(f"DeepSpeed config: cannot fill \"auto\" for {leftover}; give values")
    return ds
