"""Extend a Hugging Face causal LM with LARP video tokens (+ LoRA), save/load the bundle, export a merged model.

`merge_bundle` writes one plain HF checkpoint (LoRA merged, video rows materialised) from a training bundle; its CLI is
``larp-merge-llm`` (`llm_adapters.merge`).

A bundle folder holds: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft: LoRA and, for the "rows"
adapter, the trainable token rows), ``video_adapter.safetensors`` (the codebook adapter), the tokenizer with its added
tokens, ``video_vocab.json`` (the id layout) and ``video_llm.json`` (which adapter, the base model's shape and name,
the GGUF file name when the base came from one, the resolved LoRA targets: bundles without those fields load as
before). Which architectures extend, and which layers LoRA adapts: `llm_adapters.architectures`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch import nn

from larp_mllm.runtime.files import temporary_sibling

from .adapter import (
    HybridEmbedding,
    hf_model,
    hybrid_modules,
    install_video_adapter,
    load_video_adapter_state_dict,
    materialize,
    resize_for_rows,
    video_adapter_parameters,
    video_adapter_state_dict,
)
from .architectures import (AUTO_TARGETS, build_lora_config, check_extendable, exclude_adapter_layers,
                            recorded_targets)
from .prompts import build_prompt_ids
from .vocab import VOCAB_FILE, VideoVocab

ADAPTERS = ("codebook", "rows")
LORA_DEFAULTS = MappingProxyType(dict(
    r=64, lora_alpha=128, lora_dropout=0.05,
    target_modules=AUTO_TARGETS,  # peft's default for the architecture, else every linear layer of the decoder
))
ADAPTER_FILE = "video_adapter.safetensors"
CONFIG_FILE = "video_llm.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class VideoLLMConfig:
    """What `from_pretrained` needs besides the base model: the adapter kind and the base's shape."""

    adapter: str
    lora: bool
    text_rows: int  # rows of the base model's embedding before extension
    tie_word_embeddings: bool
    base_model: str = ""  # name_or_path of the base model (default base when loading the bundle from a script)
    gguf_file: str | None = None  # GGUF file name inside base_model when the base was loaded from one (else None)
    lora_target_modules: list[str] | str | None = None  # the resolved LoRA targets (None: no LoRA, or older bundle)

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")


@dataclass
class TrainableSummary:
    """Trainable parameter counts by group."""

    lora: int = 0
    video_adapter: int = 0  # codebook MLPs, shift/scale, temperature
    control_rows: int = 0
    trainable_tokens: int = 0  # peft trainable-token rows ("rows" adapter)
    other: int = 0  # anything else that trains (should be 0)
    total: int = 0  # all parameters, trainable or not
    names: list[str] = field(default_factory=list, repr=False)

    @property
    def trainable(self) -> int:
        return self.lora + self.video_adapter + self.control_rows + self.trainable_tokens + self.other

    def __str__(self) -> str:
        return (f"trainable {self.trainable:,} / {self.total:,} ({100 * self.trainable / max(1, self.total):.2f}%): "
                f"lora {self.lora:,}, video adapter {self.video_adapter:,}, control rows {self.control_rows:,}, "
                f"trainable tokens {self.trainable_tokens:,}, other {self.other:,}")


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is module)


@dataclass
class VideoLLM:
    """An LLM extended with video tokens: `.model` (HF causal LM, peft-wrapped or plain), `.tokenizer`, `.vocab`."""

    model: nn.Module
    tokenizer: Any
    vocab: VideoVocab
    config: VideoLLMConfig

    # ---- introspection -------------------------------------------------------------------------------------
    def trainable_parameters(self) -> TrainableSummary:
        """Counts of the parameters that train, by group (LoRA, video adapter, control rows, trainable tokens)."""
        base = hf_model(self.model)
        control: set[int] = set()
        adapter: set[int] = set()
        if self.config.adapter == "codebook":
            embed, head = hybrid_modules(base)
            control = {id(embed.control), id(head.control)}
            adapter = {id(p) for p in video_adapter_parameters(base)} - control
        summary = TrainableSummary()
        for name, p in self.model.named_parameters():
            summary.total += p.numel()
            if not p.requires_grad:
                continue
            summary.names.append(name)
            if "lora_" in name:
                summary.lora += p.numel()
            elif id(p) in control:
                summary.control_rows += p.numel()
            elif id(p) in adapter:
                summary.video_adapter += p.numel()
            elif "trainable_tokens_" in name:
                summary.trainable_tokens += p.numel()
            else:
                summary.other += p.numel()
        return summary

    # ---- persistence ---------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the bundle into `folder`; each file lands atomically, other files in the folder are kept."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tmp = temporary_sibling(folder / "bundle", suffix="")  # folder/.bundle.tmp-<pid>-<random>
        tmp.mkdir(parents=True)
        try:
            if self.config.lora or self.config.adapter == "rows":
                self.model.save_pretrained(tmp, save_embedding_layers=False)
            if self.config.adapter == "codebook":
                state = video_adapter_state_dict(hf_model(self.model))
                state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
                save_file(state, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "adapter": "codebook"})
            self.tokenizer.save_pretrained(tmp)
            self.vocab.save(tmp)
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
            for stale in (*PEFT_FILES, ADAPTER_FILE):  # files of an earlier, different bundle in the same folder
                if (folder / stale).exists() and not (tmp / stale).exists():
                    (folder / stale).unlink()
            written = sorted(p for p in tmp.rglob("*") if p.is_file())
            for path in sorted(written, key=lambda p: p.name == CONFIG_FILE):  # video_llm.json last
                target = folder / path.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    revision: str | None = None, commit_message: str = "Upload VideoLLM bundle") -> str:
        """Upload the bundle (`save_pretrained`'s files) to the Hub model repo `repo_id` (created when missing) in one
        commit on branch `revision`; adapter files of an earlier, different bundle there are deleted in it. Returns
        huggingface_hub's CommitInfo (a str subclass: the commit URL)."""
        from larp_mllm.runtime.hub import push_folder

        return push_folder(self.save_pretrained, repo_id, private=private, token=token, revision=revision,
                           commit_message=commit_message, delete_patterns=[*PEFT_FILES, ADAPTER_FILE])

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        base_model: str | Path | nn.Module,
        larp_tokenizer: Any = None,
        gguf_file: str | None = None,
        dtype: torch.dtype | None = None,
        is_trainable: bool = False,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
    ) -> "VideoLLM":
        """Restore a bundle (a folder, or a Hub repo id read at `revision` through huggingface_hub's cache in
        `cache_dir`: a local folder of that name wins) on top of its base model (a path/hub id, or an already loaded,
        unextended model).

        `gguf_file` None: the GGUF file name recorded in the bundle (``video_llm.json``) is used when `base_model` is
        the recorded base or a folder holding that file (see `recorded_gguf_file`).

        Raises ValueError when `larp_tokenizer`'s codebook hash differs from the bundle's, or when the base model's
        shape differs from the one the bundle was made for.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from larp_mllm.runtime.hub import SAFE_PATTERNS, resolve_folder

        folder = resolve_folder(folder, revision=revision, cache_dir=cache_dir, token=token,
                                allow_patterns=SAFE_PATTERNS, what="VideoLLM bundle")
        if not (folder / CONFIG_FILE).is_file() or not (folder / VOCAB_FILE).is_file():
            raise FileNotFoundError(f"expected a VideoLLM bundle ({CONFIG_FILE}, {VOCAB_FILE}, ...) in {folder}")
        vocab = VideoVocab.load(folder)
        config = VideoLLMConfig(**json.loads((folder / CONFIG_FILE).read_text()))
        if larp_tokenizer is not None and larp_tokenizer.codebook_hash() != vocab.codebook_hash:
            raise ValueError(
                f"LARP codebook mismatch: the bundle {folder} was trained on codebook {vocab.codebook_hash} "
                f"({vocab.larp_checkpoint or 'unnamed checkpoint'}), the given LARP tokenizer has "
                f"{larp_tokenizer.codebook_hash()}"
            )
        tokenizer = AutoTokenizer.from_pretrained(folder)
        vocab.check_tokenizer(tokenizer)
        if isinstance(base_model, nn.Module):
            model = base_model
        else:
            if gguf_file is None:
                gguf_file = recorded_gguf_file(config, base_model)
            model = AutoModelForCausalLM.from_pretrained(base_model, gguf_file=gguf_file, dtype=dtype)
        rows = model.get_input_embeddings().num_embeddings
        if isinstance(model.get_input_embeddings(), HybridEmbedding) or rows != config.text_rows:
            raise ValueError(
                f"base model has {rows} embedding rows (or is already extended); the bundle expects an unextended "
                f"base with {config.text_rows} rows ({config.base_model or 'unknown base'})"
            )
        model.requires_grad_(False)
        if config.adapter == "codebook":
            from safetensors.torch import load_file

            state = load_file(str(folder / ADAPTER_FILE))
            install_video_adapter(model, vocab, state["embed.video.codebook"])
            load_video_adapter_state_dict(model, state)
        else:
            resize_for_rows(model, vocab, mean_resizing=False)
        if config.lora or config.adapter == "rows":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, folder, is_trainable=is_trainable)
        if config.adapter == "codebook":  # after peft, which freezes everything but its own adapters
            for p in video_adapter_parameters(hf_model(model)):
                p.requires_grad_(is_trainable)
        model.eval()
        return cls(model=model, tokenizer=tokenizer, vocab=vocab, config=config)


def recorded_gguf_file(config: VideoLLMConfig, base_model: str | Path) -> str | None:
    """The bundle's recorded GGUF file name when it applies to `base_model`, else None.

    It applies when `base_model` is the recorded base model, or a folder that holds a file of that name; another base
    (e.g. an HF folder given instead of the recorded GGUF) loads without it.
    """
    if not config.gguf_file:
        return None
    if str(base_model) == config.base_model or (Path(base_model) / config.gguf_file).is_file():
        return config.gguf_file
    return None


def extend_llm(
    model: nn.Module,
    tokenizer: Any,
    larp_tokenizer: Any,
    adapter: str = "codebook",
    lora: Mapping[str, Any] | Any | None = LORA_DEFAULTS,
    larp_checkpoint: str | None = None,
    pad_to_multiple_of: int | None = 64,
    gguf_file: str | None = None,
) -> VideoLLM:
    """Add LARP's codes to an LLM's vocabulary (tokenizer and model are changed in place).

    Args:
        model: any HF causal LM (fp32/bf16) with an nn.Embedding input embedding (possibly scaling its rows by a
            constant, as Gemma's) and an nn.Linear head, tied or not (`architectures.check_extendable`; a model
            without them is refused before anything changes).
        tokenizer: its tokenizer (gets the control, code and filler tokens).
        larp_tokenizer: provides codebook() (K, d), codebook_hash(), num_tokens, codebook_size.
        adapter: "codebook" (rows computed from the codebook by trainable MLPs) or "rows" (mean-initialised rows
            trained through peft's trainable tokens).
        lora: LoRA options (a dict overriding LORA_DEFAULTS, or a peft LoraConfig); None: no LoRA. Its
            target_modules ("auto", "all-linear" or names) are resolved by `architectures.resolve_lora_targets`
            (never the embedding, head or video adapter) and recorded in video_llm.json.
        larp_checkpoint: identity of the LARP checkpoint recorded in video_vocab.json.
        gguf_file: the GGUF file name inside the base model's folder when `model` was loaded from one; recorded in
            video_llm.json so the bundle reloads its base without being told the file again.

    Before training, the logits of the original vocabulary are unchanged. Trainable: LoRA, the adapter networks and
    the control rows ("codebook"), or LoRA and the new rows ("rows"); everything else is frozen.

    Under ZeRO-3 (a model built partitioned, llm_adapters.zero3_load) every rank calls this: the embedding and head
    are never gathered whole, their row statistics come from each rank's part and an all-reduce ("codebook" only).
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    if hasattr(model, "peft_config") or isinstance(model.get_input_embeddings(), HybridEmbedding):
        raise ValueError("extend_llm expects a plain HF model (not peft-wrapped, not already extended)")
    from .zero3_load import is_partitioned

    if adapter == "rows" and is_partitioned(model.get_input_embeddings().weight):
        raise ValueError("adapter 'rows' (a resized embedding) is not supported on a ZeRO-3 partitioned model; use "
                         "the default adapter 'codebook'")
    check_extendable(model, adapter)  # refusals first: nothing is changed before them
    lora_config = None if lora is None else build_lora_config(model, lora, LORA_DEFAULTS)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    text_rows = embed.num_embeddings
    tied = head.weight is embed.weight
    vocab = VideoVocab.extend_tokenizer(
        tokenizer, max(text_rows, int(model.config.get_text_config().vocab_size)), larp_tokenizer.codebook_size,
        larp_tokenizer.num_tokens, larp_tokenizer.codebook_hash(),
        larp_checkpoint if larp_checkpoint is not None else str(getattr(larp_tokenizer, "name_or_path", "") or ""),
        pad_to_multiple_of=pad_to_multiple_of,
    )
    config = VideoLLMConfig(adapter=adapter, lora=lora is not None, text_rows=text_rows, tie_word_embeddings=tied,
                            base_model=str(getattr(model, "name_or_path", "") or ""), gguf_file=gguf_file or None,
                            lora_target_modules=recorded_targets(lora_config))
    model.requires_grad_(False)
    if adapter == "codebook":
        install_video_adapter(model, vocab, larp_tokenizer.codebook())
        if lora_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, exclude_adapter_layers(model, lora_config))
        for p in video_adapter_parameters(hf_model(model)):
            p.requires_grad_(True)
    else:
        from peft import TrainableTokensConfig, get_peft_model

        resize_for_rows(model, vocab, mean_resizing=True)
        names = [_module_name(model, model.get_input_embeddings())]
        if not tied:
            names.append(_module_name(model, model.get_output_embeddings()))
        if lora_config is not None:
            peft_config = dataclasses.replace(lora_config, trainable_token_indices={n: vocab.new_ids for n in names})
        else:
            peft_config = TrainableTokensConfig(token_indices=vocab.new_ids, target_modules=names)
        model = get_peft_model(model, peft_config)
    return VideoLLM(model=model, tokenizer=tokenizer, vocab=vocab, config=config)


# ---- merge / export -------------------------------------------------------------------------------------------
def check_inputs(tokenizer: Any, vocab: VideoVocab) -> list[torch.Tensor]:
    """A fixed batch for logit checks: prompts + a video span + end token, one (1, L) int64 tensor per prompt."""
    out = []
    for i, text in enumerate(["a person playing the violin", None]):
        codes = (torch.arange(vocab.num_video_tokens) * (7 + 2 * i) + i) % vocab.codebook_size  # (N,)
        ids = build_prompt_ids(tokenizer, vocab, text) + vocab.codes_to_ids(codes).tolist() + [vocab.video_end_id]
        out.append(torch.tensor([ids]))
    return out


@torch.no_grad()
def _logits(model: nn.Module, batch: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in batch]


def merge_bundle(bundle: str | Path, base_model: str | Path | nn.Module, out: str | Path, gguf_file: str | None = None,
                 dtype: torch.dtype = torch.float32, atol: float = 1e-4) -> Path:
    """Load a bundle in fp32, merge LoRA, materialise the video rows, check logits, save a plain HF checkpoint."""
    video_llm = VideoLLM.from_pretrained(bundle, base_model, gguf_file=gguf_file, dtype=torch.float32)
    video_llm.model.float().eval()
    batch = check_inputs(video_llm.tokenizer, video_llm.vocab)
    reference = _logits(video_llm.model, batch)
    merged = materialize(video_llm).eval()
    for want, got in zip(reference, _logits(merged, batch)):
        diff = (want - got).abs().max().item()
        if diff > atol * max(1.0, want.abs().max().item()):
            raise RuntimeError(f"merged logits differ from the unmerged model's by {diff:.3g} (> {atol} relative)")
    merged.hf_quantizer = None  # a GGUF-loaded base is dequantized: save it as a plain checkpoint
    for config in (merged.config, merged.config.get_text_config()):
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    merged.to(dtype)
    out = Path(out)
    merged.save_pretrained(out)
    video_llm.tokenizer.save_pretrained(out)
    video_llm.vocab.save(out)
    return out
