"""Tokenizer checkpoint folders: ours and the reference implementation's.

A folder holds `config.json` and `model.safetensors` (never pickles). Our config.json is the
`LARPTokenizerConfig` fields plus `"format": "larp-mllm"`. The reference's config.json (written by
huggingface_hub's PyTorchModelHubMixin) holds its constructor's keyword arguments; `config_from_reference` maps
every option it may contain onto ours, and refuses values we do not implement with an error naming them.
State-dict key names are identical in both formats. Those two files are all a folder needs, so a Hub download of a
checkpoint fetches only `TOKENIZER_FILES` (`LARPTokenizer.from_pretrained` with a repo id).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from .prior import PRIOR_PRESETS
from ..runtime.files import atomic_write_folder

if TYPE_CHECKING:
    from .tokenizer import LARPTokenizer, LARPTokenizerConfig

FORMAT = "larp-mllm"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
TOKENIZER_FILES = (CONFIG_NAME, WEIGHTS_NAME)  # what a checkpoint folder holds (and a Hub download fetches)
_NONE_NAMES = {None, "", "none", "no", "null"}

# Reference option -> the only value we implement (anything else is refused).
_REFERENCE_FIXED = {
    "transformer_name": "transformer_encoder_parallel",
    "learned_encoder_patch_pe": False,
    "learned_encoder_latent_query_embed": True,
    "learned_decoder_latent_pe": False,
    "learned_decoder_patch_query_embed": False,
    "use_encoder_patch_token_type_embed": False,
    "use_encoder_latent_query_token_type_embed": False,
    "use_decoder_latent_token_type_embed": False,
    "use_decoder_patch_query_token_type_embed": True,
    "encoder_query_gaussian_init": True,
}
_REFERENCE_RENAMED = {  # reference name -> ours
    "input_size": "input_size", "frame_num": "frame_num", "in_channels": "in_channels",
    "patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size",
    "bottleneck_token_num": "num_tokens", "encoder_hidden_size": "encoder_hidden_size",
    "encoder_depth": "encoder_depth", "encoder_num_heads": "encoder_num_heads",
    "decoder_hidden_size": "decoder_hidden_size", "decoder_depth": "decoder_depth",
    "decoder_num_heads": "decoder_num_heads", "query_init_std": "query_init_std",
    "latent_pe_scale_factor": "latent_pe_base",
}


def is_reference_config(raw: dict[str, Any]) -> bool:
    return raw.get("format") != FORMAT and "bottleneck" in raw


def config_from_reference(raw: dict[str, Any]) -> "LARPTokenizerConfig":
    """Translate the reference's constructor kwargs into a LARPTokenizerConfig, refusing what we do not implement."""
    from .tokenizer import LARPTokenizerConfig

    refused: list[str] = []
    unknown: list[str] = []
    out: dict[str, Any] = {}

    def expect(name: str, value: Any, allowed: Any) -> None:
        ok = value in allowed if isinstance(allowed, (set, tuple)) else value == allowed
        if not ok:
            refused.append(f"{name}={value!r} (supported: {allowed!r})")

    for key, value in raw.items():
        if key in _REFERENCE_RENAMED:
            out[_REFERENCE_RENAMED[key]] = value
        elif key in _REFERENCE_FIXED:
            expect(key, value, _REFERENCE_FIXED[key])
        elif key in ("encoder_name", "decoder_name"):
            if value not in _NONE_NAMES and value != "transformer_encoder_parallel":
                refused.append(f"{key}={value!r} (supported: none / transformer_encoder_parallel)")
        elif key in ("decoder_patch_size", "decoder_temporal_patch_size"):
            pass  # checked against the encoder's below
        elif key in ("bottleneck", "prior_model"):
            pass
        else:
            unknown.append(key)

    for dec, enc in (("decoder_patch_size", "patch_size"), ("decoder_temporal_patch_size", "temporal_patch_size")):
        if dec in raw and raw[dec] != raw.get(enc, raw[dec]):
            refused.append(f"{dec}={raw[dec]!r} != {enc}={raw.get(enc)!r} (decoder patches must equal the encoder's)")

    bottleneck = raw.get("bottleneck") or {}
    expect("bottleneck.name", bottleneck.get("name"), "bottleneck")
    b_args = dict(bottleneck.get("args") or {})
    reg = b_args.pop("regularizer", {}) or {}
    out["codebook_dim"] = b_args.pop("bottleneck_dim", 16)
    expect("bottleneck.args.norm", b_args.pop("norm", "none"), {"none", None})
    unknown += [f"bottleneck.args.{k}" for k in b_args]
    expect("bottleneck.args.regularizer.name", reg.get("name"), "vq")
    r_args = dict(reg.get("args") or {})
    out["codebook_size"] = r_args.pop("codebook_size", 8192)
    out["commitment_weight"] = r_args.pop("commitment_loss_weight", 0.25)
    out["codebook_weight"] = r_args.pop("codebook_loss_weight", 1.0)
    out["vq_temperature"] = r_args.pop("stochastic_temperature", 0.03)
    expect("regularizer.l2_normalized", r_args.pop("l2_normalized", True), True)
    expect("regularizer.stochastic", r_args.pop("stochastic", True), True)
    expect("regularizer.entropy_loss_weight", r_args.pop("entropy_loss_weight", 0.0), {0, 0.0})
    r_args.pop("entropy_loss_temperature", None)  # only used by the entropy loss, which must be off
    unknown += [f"bottleneck.args.regularizer.args.{k}" for k in r_args]

    prior = dict(raw.get("prior_model") or {})
    name = prior.pop("name", "none")
    if name in _NONE_NAMES:
        out["prior"] = "none"
        prior.clear()
    elif name not in PRIOR_PRESETS:
        refused.append(f"prior_model.name={name!r} (supported: {sorted(PRIOR_PRESETS)})")
    else:
        out["prior"] = name
    p_args = dict(prior.pop("args", None) or {})
    expect("prior_model.args.l2_normalized", p_args.pop("l2_normalized", True), True)
    unknown += [f"prior_model.args.{k}" for k in p_args]
    if prior:
        out["prior_dropout"] = 0.0 if prior.pop("no_dropout", False) else 0.1
        out["prior_ce_temperature"] = prior.pop("latent_ce_temperature", 1.0)
        out["prior_rounds"] = prior.pop("n_rounds", 2)
        out["ss_max_ratio"] = prior.pop("mix_ss_max_ratio", 0.5)
        out["ss_peak_fraction"] = prior.pop("mix_ss_peak_steps_ratio", 0.3)
        expect("prior_model.avg_loss_over_rounds", prior.pop("avg_loss_over_rounds", True), True)
        expect("prior_model.no_grad_before_last_round", prior.pop("no_grad_before_last_round", False), False)
        expect("prior_model.use_mix_ss", prior.pop("use_mix_ss", True), True)
        unknown += [f"prior_model.{k}" for k in prior]
    out["prior_max_len"] = 1024  # the reference's gptc always has a 1024-long learned PE

    if refused or unknown:
        parts = []
        if refused:
            parts.append("options with values we do not implement: " + "; ".join(refused))
        if unknown:
            parts.append("unknown options: " + ", ".join(sorted(unknown)))
        raise ValueError("cannot load this reference LARP checkpoint: " + " | ".join(parts))
    out["extra"] = {"source": "reference"}
    return LARPTokenizerConfig(**out)


def config_from_ours(raw: dict[str, Any]) -> "LARPTokenizerConfig":
    from .tokenizer import LARPTokenizerConfig

    fields = {f.name for f in dataclasses.fields(LARPTokenizerConfig)}
    body = {k: v for k, v in raw.items() if k != "format"}
    unknown = sorted(set(body) - fields)
    if unknown:
        raise ValueError(f"unknown LARPTokenizerConfig fields in config.json: {unknown}; valid: {sorted(fields)}")
    return LARPTokenizerConfig(**body)


def load_tokenizer_folder(
    folder: str | Path, map_location: str | torch.device = "cpu"
) -> tuple["LARPTokenizerConfig", dict[str, torch.Tensor]]:
    """Read config.json + model.safetensors from a folder (ours or the reference's)."""
    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer checkpoint folder not found: {folder}")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"expected {cfg_path} (the tokenizer's configuration)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    config = config_from_reference(raw) if is_reference_config(raw) else config_from_ours(raw)
    if is_reference_config(raw):
        config.extra["path"] = str(folder)
    if not weights.is_file():
        others = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        hint = f"; found {others}, but only safetensors are loaded (no pickles)" if others else ""
        raise FileNotFoundError(f"expected {weights}{hint}")
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as e:  # safetensors raises its own error types on truncated/corrupt files
        raise ValueError(f"cannot read {weights}: {e}") from e
    return config, state


def save_tokenizer_folder(model: "LARPTokenizer", folder: str | Path) -> None:
    """config.json (our format) + model.safetensors, written atomically."""
    config = dataclasses.asdict(model.config)

    def write(tmp: Path) -> None:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps({"format": FORMAT, **config}, indent=2, sort_keys=True))

    atomic_write_folder(folder, write)
