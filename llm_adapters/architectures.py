"""Per-architecture facts for extending a causal LM: can it be extended, what its embedding does to a row, which
layers LoRA adapts.

Everything here only reads the model: `check_extendable` and `resolve_lora_targets` run before `extend_llm` changes
anything, so a refused model (and its tokenizer) is left as it was.

    check_extendable(model, adapter)           ValueError naming what is missing, or None
    embedding_row_scale(embedding)             the factor the embedding applies to its rows (Gemma: sqrt(h)), or None
    resolve_lora_targets(model, "auto")        peft's default for config.model_type, else every linear of the decoder
    exclude_adapter_layers(model, config)      LoRA leaves the layers under the embedding / head alone
    build_lora_config(model, lora, defaults)   a peft LoraConfig with resolved targets
"""
from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .zero3_load import is_partitioned, partitioned_rows

AUTO_TARGETS = "auto"  # peft's per-model default, else every linear / Conv1D layer of the decoder
ALL_LINEAR = "all-linear"  # every linear / Conv1D layer of the decoder (never the embedding, head or video adapter)
TARGET_KEYWORDS = (AUTO_TARGETS, ALL_LINEAR)


def _conv1d() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def linear_types() -> tuple[type, ...]:
    """The layer types of "all-linear" (peft's set): nn.Linear and transformers' Conv1D (GPT-2's projections)."""
    return nn.Linear, _conv1d()


def lora_layer_types() -> tuple[type, ...]:
    """The layer types peft's LoRA wraps (a target that names another module type is refused)."""
    return (*linear_types(), nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


# ---- the embedding and the head ---------------------------------------------------------------------------
def _rows_only(embedding: nn.Embedding, rows: torch.Tensor) -> nn.Embedding:
    """A shallow copy of `embedding` (same class and attributes: a scaled embedding keeps its factor) whose weight is
    `rows` (p, h) alone; the original is left as it is."""
    probe = copy.copy(embedding)
    probe._parameters = {"weight": nn.Parameter(rows, requires_grad=False)}  # its own dict: the original's is shared
    probe.num_embeddings, probe.padding_idx = rows.shape[0], None  # the padding row is no row of `rows`
    return probe


@torch.no_grad()
def embedding_row_scale(embedding: nn.Embedding, probe: int = 16) -> torch.Tensor | None:
    """The constant factor, a (1,) tensor in the weight's dtype, by which `embedding(ids)` scales `weight[ids]`, or
    None when it returns the rows unchanged (nn.Embedding).

    Scaled embeddings (Gemma 1/2/3: ``* sqrt(h)``) multiply the rows they look up; new rows must get the same
    factor so that rows written into the same module later (materialisation) give the same forward. The factor is
    fitted (least squares) on `probe` rows spread over the vocabulary and rounded to the weight's dtype, which
    recovers the module's own factor; ValueError when `weight[ids] * factor` does not reproduce `embedding(ids)`
    (the module transforms rows otherwise, e.g. normalises them, and cannot be extended).

    A ZeRO-3 embedding that is partitioned is not gathered: the probed rows are read from each rank's part
    (`zero3_load.partitioned_rows`; every rank must call this) and the module's forward runs on them alone.
    """
    weight = embedding.weight
    ids = torch.linspace(0, embedding.num_embeddings - 1, min(probe, embedding.num_embeddings),
                         device=weight.device).long()  # (p,)
    if is_partitioned(weight):
        rows = partitioned_rows(weight, ids)  # (p, h)
        out = _rows_only(embedding, rows)(torch.arange(len(ids), device=rows.device))  # (p, h)
    else:
        out, rows = embedding(ids), weight[ids]  # (p, h) each
    if torch.equal(out, rows):
        return None
    energy = rows.double().square().sum()
    fitted = (out.double() * rows.double()).sum() / energy if energy > 0 else torch.zeros((), dtype=torch.float64)
    scale = fitted.to(weight.dtype).reshape(1)  # (1,)
    if out.shape != rows.shape or not torch.allclose(out, rows * scale, rtol=1e-3, atol=0):
        raise ValueError(
            f"the input embedding {type(embedding).__name__} transforms the rows it looks up other than by a "
            "constant factor; expected embedding(ids) == embedding.weight[ids] * factor, so the video rows cannot "
            "go through the same transform"
        )
    return scale


def check_extendable(model: nn.Module, adapter: str = "codebook") -> None:
    """Raise ValueError (naming what is missing) unless `model` has what `extend_llm` needs; changes nothing.

    Needs: an ``nn.Embedding`` input embedding (no ``max_norm``) that returns its rows, possibly scaled by a constant
    factor (refused: Inkling's normalised rows); an ``nn.Linear`` output head (tied or not) that computes only
    ``hidden @ weight.T + bias`` (refused: Dory's per-row logit scale), with one output per embedding row. Logits the
    model scales or soft-caps after the head (Gemma 2/3, Cohere, Granite) are fine: that applies to every row.
    """
    name = type(model).__name__
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(embed, nn.Embedding):
        raise ValueError(f"{name} cannot be extended: expected its input embedding (get_input_embeddings()) to be an "
                         f"nn.Embedding, got {type(embed).__name__}")
    if embed.max_norm is not None:
        raise ValueError(f"{name} cannot be extended: its input embedding renormalises rows (max_norm="
                         f"{embed.max_norm}); expected an embedding that returns its rows")
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{name} cannot be extended: expected an nn.Linear output head (get_output_embeddings()), "
                         f"got {type(head).__name__}")
    if type(head).forward is not nn.Linear.forward:
        raise ValueError(f"{name} cannot be extended: its output head {type(head).__name__} computes more than "
                         "hidden @ weight.T + bias (it overrides nn.Linear.forward); expected a plain linear head")
    if head.out_features != embed.num_embeddings:
        raise ValueError(f"{name} cannot be extended: its output head has {head.out_features} rows, its input "
                         f"embedding {embed.num_embeddings}; expected one head row per embedding row")
    try:
        scale = embedding_row_scale(embed)
    except ValueError as err:
        raise ValueError(f"{name} cannot be extended: {err}") from None
    marked = isinstance(getattr(embed, "embed_scale", None), (torch.Tensor, int, float))
    if adapter == "rows" and scale is not None and not marked:  # peft's trainable tokens apply `embed_scale` only
        raise ValueError(f"{name} cannot use the 'rows' adapter: its embedding scales rows without an `embed_scale` "
                         "attribute, which peft's trainable tokens need to scale the new rows; use adapter='codebook'")


# ---- LoRA targets -----------------------------------------------------------------------------------------
def _keyword(requested: Any) -> str | None:
    if requested is None:
        return AUTO_TARGETS
    if isinstance(requested, str):
        return requested if requested in TARGET_KEYWORDS else None
    items = list(requested)
    return items[0] if len(items) == 1 and items[0] in TARGET_KEYWORDS else None


def _outer_paths(model: nn.Module) -> list[str]:
    """Module paths of the input embedding and output head (their subtrees are never LoRA targets)."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [name for name, m in model.named_modules() if any(m is w for w in wanted if w is not None)]


def _inside(name: str, paths: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in paths)


def _matcher(target: str | list[str]) -> Callable[[str], bool]:
    """Whether peft adapts a module of this name for `target` (module names / suffixes, or a regex string)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    if isinstance(target, str):
        try:
            re.compile(target)
        except re.error as err:
            raise ValueError(f"LoRA target_modules {target!r} is not a valid regular expression: {err}") from None
    config = LoraConfig(target_modules=target)
    return lambda key: bool(check_target_module_exists(config, key))


def _decoder_linears(model: nn.Module) -> list[str]:
    """Short names of the linear / Conv1D layers outside the embedding and head ("all-linear"); a short name that
    also names a module of another type there is replaced by the full names of its linear layers."""
    outer, kinds = _outer_paths(model), linear_types()
    modules = [(n, m) for n, m in model.named_modules() if n and not _inside(n, outer)]
    by_short: dict[str, list[str]] = {}
    for name, module in modules:
        if isinstance(module, kinds):
            by_short.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    targets = []
    for short, names in sorted(by_short.items()):
        clash = any(not isinstance(m, kinds) and (n == short or n.endswith("." + short)) for n, m in modules)
        targets += names if clash else [short]
    return targets


def _check_targets(model: nn.Module, targets: str | list[str]) -> None:
    outer, kinds = _outer_paths(model), lora_layer_types()
    named = [(n, m) for n, m in model.named_modules() if n]
    for target in [targets] if isinstance(targets, str) else targets:
        matches = _matcher(target if isinstance(targets, str) else [target])
        hits = [(n, m) for n, m in named if matches(n)]
        bad = [n for n, _ in hits if _inside(n, outer)]
        if bad:
            raise ValueError(f"LoRA target {target!r} matches the input embedding / output head ({bad[0]}); LoRA "
                             "must leave them alone (the video adapter trains their new rows)")
        if not hits:
            raise ValueError(f"LoRA target {target!r} matches no layer of {type(model).__name__}'s decoder; its "
                             f"linear layers are {_decoder_linears(model)} (or use {TARGET_KEYWORDS})")
        wrong = [(n, m) for n, m in hits if not isinstance(m, kinds)]
        if wrong:
            raise ValueError(f"LoRA target {target!r} matches {wrong[0][0]} ({type(wrong[0][1]).__name__}), which "
                             "LoRA cannot adapt; expected linear, Conv1D, embedding or convolution layers")


def resolve_lora_targets(model: nn.Module, requested: str | Sequence[str] | None = AUTO_TARGETS) -> list[str] | str:
    """The LoRA `target_modules` for `model` (read only; ValueError before any change when a target is wrong).

    `requested`: "auto" (or None) = peft's default for ``config.model_type``
    (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``), else every linear / Conv1D layer of the decoder;
    "all-linear" = every linear / Conv1D layer of the decoder (peft's "all-linear" without the output head, the
    input embedding or the video adapter); a one-element list of either keyword works the same (CLI form); a list
    of module names / suffixes or a regex (peft's forms) is checked: each must match a layer LoRA can adapt and
    never the input embedding or the output head. Returns a list of names (or the regex string).
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    keyword = _keyword(requested)
    if keyword == AUTO_TARGETS:
        default = PEFT_DEFAULTS.get(getattr(model.config, "model_type", None))
        if default is not None:
            default = default if isinstance(default, str) else list(default)
            try:
                _check_targets(model, default)
                return default
            except ValueError:
                pass  # peft's default names layers this model lacks: fall back to every linear layer
        keyword = ALL_LINEAR
    if keyword == ALL_LINEAR:
        return _decoder_linears(model)
    if isinstance(requested, str):
        targets: str | list[str] = requested
    else:
        targets = list(requested)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"LoRA target_modules must be non-empty module names, got {requested!r}")
    _check_targets(model, targets)
    return targets


def exclude_adapter_layers(model: nn.Module, config: Any) -> Any:
    """`config` (a peft LoraConfig) with the modules inside the input embedding / output head that its targets also
    match (the video adapter's own MLP layers, e.g. ``fc1``/``fc2`` next to Phi's) added to ``exclude_modules``."""
    outer, matches = _outer_paths(model), _matcher(config.target_modules if isinstance(config.target_modules, str)
                                                   else sorted(config.target_modules))
    names = [n for n, _ in model.named_modules() if _inside(n, outer) and matches(n)]
    if not names:
        return config
    theirs = config.exclude_modules
    if isinstance(theirs, str):  # a regex: one more alternative per name
        exclude: str | list[str] = "|".join([f"(?:{theirs})", *map(re.escape, names)])
    else:
        exclude = sorted({*(theirs or ()), *names})
    return dataclasses.replace(config, exclude_modules=exclude)


def build_lora_config(model: nn.Module, lora: Mapping[str, Any] | Any, defaults: Mapping[str, Any]) -> Any:
    """A peft LoraConfig from `lora` (options over `defaults`, or a LoraConfig), its target_modules resolved for
    `model` by `resolve_lora_targets` (ValueError before anything changes when a target is wrong); task CAUSAL_LM."""
    from peft import LoraConfig

    requested = lora.target_modules if isinstance(lora, LoraConfig) else {**defaults, **dict(lora)}["target_modules"]
    targets = resolve_lora_targets(model, sorted(requested) if isinstance(requested, set) else requested)
    if isinstance(lora, LoraConfig):
        config = dataclasses.replace(lora, target_modules=targets)
    else:
        config = LoraConfig(**{**defaults, **dict(lora), "target_modules": targets})
    if config.task_type is None:
        config.task_type = "CAUSAL_LM"
    return config


def recorded_targets(config: Any) -> list[str] | str | None:
    """A LoraConfig's target_modules as video_llm.json records them: a sorted list (peft holds a set), a regex
    string, or None without a config (no LoRA)."""
    if config is None:
        return None
    return config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
