"""Configuration of `larp-train-tokenizer`: dataclasses parsed from a YAML file plus command-line overrides
(larp_mllm.runtime.config), and the DeepSpeed config they imply (larp_mllm.runtime.deepspeed).

    larp-train-tokenizer --config configs/tokenizer/larp_tiny_cpu.yaml --lr 3e-4 --max-steps 200

The YAML is flat: every key is the name of one field below (the YAML maps 1:1 onto the dataclasses). Unknown or
misspelled keys, in the YAML or on the command line, are rejected with the list of valid ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from larp_mllm.data.synthetic import BACKGROUNDS, OBJECT_SIZES
from larp_mllm.runtime.config import parse_config_and_flags
from larp_mllm.runtime.deepspeed import BatchLayout, StageSettings, resolve_deepspeed_config

__all__ = [
    "ModelArguments", "DataArguments", "LossArguments", "TrainArguments", "TrainConfig", "parse_config",
    "model_config_overrides", "deepspeed_config", "DEFAULT_PRESET",
]


DEFAULT_PRESET = "larp-tiny"  # the tokenizer trained without preset and init_from


def _f(default, help: str, **kw):  # noqa: A002 - mirrors argparse's name
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelArguments:
    """Tokenizer (preset or checkpoint, and fields of its config) and discriminator architecture."""

    preset: Optional[str] = _f(None, f"tokenizer preset (a key of larp_mllm.TOKENIZER_PRESETS; default "
                                     f"{DEFAULT_PRESET}): a random init, or with init_from the size it must have")
    init_from: Optional[str] = _f(None, "start from this LARPTokenizer folder (ours or the reference's) instead of a "
                                        "random init; its config.json sets the architecture")
    gradient_checkpointing: bool = _f(False, "recompute encoder/decoder blocks in backward (saves memory)")
    # Fields of the tokenizer's config (LARPTokenizerConfig): None keeps the preset's or init_from's value; a value
    # set here overrides it and is saved with the trained model (model_config_overrides).
    prior_ce_temperature: Optional[float] = _f(
        None, "temperature of the prior's cosine logits (default: the tokenizer config's; the reference's 1.0, where "
              "the prior CE cannot fall far below ln K; lower values let it approach the codes' real NLL)")
    ss_peak_fraction: Optional[float] = _f(
        None, "the prior's scheduled-sampling ratio ramps 0 -> ss_max_ratio over this fraction of the steps "
              "(default: the tokenizer config's: the preset's 0.3, or init_from's, e.g. a reference checkpoint's "
              "mix_ss_peak_steps_ratio)")
    ss_max_ratio: Optional[float] = _f(
        None, "final scheduled-sampling ratio of the prior (default: the tokenizer config's: the preset's 0.5, or "
              "init_from's, e.g. a reference checkpoint's mix_ss_max_ratio)")
    disc_dim: int = _f(512, "discriminator width (reference reproduce script: 512)")
    disc_depth: int = _f(12, "discriminator blocks (reference: 12)")
    disc_heads: int = _f(8, "discriminator attention heads (reference: 8)")


@dataclass
class DataArguments:
    """Where the clips come from. `train_data` is a reference-format CSV (id,path,action,label), a folder of videos
    (one subfolder per class), or 'synthetic' (a small generated set, written under output_dir)."""

    train_data: str = _f("synthetic", "CSV file(s) or video folder(s), comma-separated, or 'synthetic'")
    val_data: Optional[str] = _f(None, "CSV/folder for validation; None -> held-out synthetic set or no validation")
    data_root: Optional[str] = _f(None, "root the CSV paths are relative to (default: the CSV's folder)")
    num_frames: Optional[int] = _f(None, "frames per clip (default: the preset's frame_num)")
    size: Optional[int] = _f(None, "clip height = width (default: the preset's input_size)")
    flip: bool = _f(True, "random horizontal flip of training clips (reference: on)")
    num_workers: int = _f(0, "DataLoader workers per process")
    synthetic_classes: int = _f(4, "synthetic set: number of motion classes")
    synthetic_per_class: int = _f(16, "synthetic set: clips per class (train); val uses a quarter, other seed")
    synthetic_background: str = _f("textured", "synthetic set: background style (larp_mllm.data.synthetic.BACKGROUNDS)",
                                   choices=list(BACKGROUNDS))
    synthetic_object_size: str = _f("small",
                                    "synthetic set: shape radius range (larp_mllm.data.synthetic.OBJECT_SIZES)",
                                    choices=sorted(OBJECT_SIZES))
    val_batches: int = _f(2, "validation batches (per process) for PSNR/SSIM/perceptual")


@dataclass
class LossArguments:
    """L = l1 * |x - x^| + l2 * (x - x^)^2 + perceptual * LPIPS + gan * L_G + vq * loss_q + prior * L_prior
    + entropy * L_entropy.

    The reference (larp-spec 3.1) has no l2 term. Without the perceptual term, L1 alone drives a small model to the
    per-pixel median (the background: small moving objects vanish), so the CPU config trains with l2 instead."""

    l1_weight: float = _f(1.0, "L1 reconstruction weight")
    l2_weight: float = _f(0.0, "squared-error reconstruction weight (not in the reference; the tiny CPU config's)")
    perceptual_weight: float = _f(1.0, "perceptual (LPIPS) weight")
    perceptual_backend: str = _f("stlpips", "'stlpips' (weights ship with stlpips-pytorch), 'lpips-vgg', 'none'",
                                 choices=["stlpips", "lpips-vgg", "none"])
    perceptual_weights: Optional[str] = _f(None, "lpips-vgg: path to the user's VGG16+LPIPS weights file")
    gan_weight: float = _f(0.3, "fixed generator GAN weight (reference: 0.3, not adaptive); 0 disables the GAN")
    gan_label_noise: float = _f(0.15, "'ns_smooth' label noise scale: targets 1-|N(0,1)|*s (>=0.7), |N|*s (<=0.3)")
    lecam_weight: float = _f(0.001, "LeCam regularizer weight (intended value)")
    lecam_ema_decay: float = _f(0.999, "EMA decay of the mean real/fake D logits for LeCam")
    lecam_reference_double_weight: bool = _f(False, "reproduce the reference bug: weight applied twice (1e-6)")
    vq_weight: float = _f(0.1, "weight of loss_q = 0.25*commit + 1.0*codebook")
    prior_weight: float = _f(0.06, "weight of the prior CE; 0 trains without the prior (its params frozen)")
    entropy_weight: float = _f(0.0, "codebook-usage (entropy) term: mean token entropy - entropy of the batch's "
                               "mean code distribution, on softmax(cos / entropy_temperature); 0 = off (reference)")
    entropy_temperature: float = _f(0.01, "temperature of the entropy term's softmax (reference config: 0.01)")


@dataclass
class TrainArguments:
    """Optimisation, precision, schedule, checkpoints and logging."""

    output_dir: str = _f("runs/tokenizer", "run folder: checkpoints/, tensorboard/, samples/, final/")
    seed: int = _f(66667, "seed; each process adds its rank for its sampling RNGs (reference: 66667 + rank)")
    max_steps: Optional[int] = _f(None, "optimizer steps; None -> epochs * steps_per_epoch")
    epochs: float = _f(1.0, "epochs (used when max_steps is None)")
    global_batch_size: int = _f(8, "clips per optimizer step over all processes (reference: 128)")
    micro_batch_size: Optional[int] = _f(None, "clips per process per forward; None -> global / world (no accum)")
    lr: float = _f(1e-4, "generator peak learning rate")
    disc_lr: float = _f(3e-5, "discriminator peak learning rate")
    adam_beta1: float = _f(0.5, "Adam beta1 (reference: 0.5)")
    adam_beta2: float = _f(0.9, "Adam beta2 (reference: 0.9)")
    warmup_steps: Optional[int] = _f(None, "warmup steps; None -> warmup_epochs * steps_per_epoch")
    warmup_epochs: float = _f(0.0, "warmup length in epochs (reference: 8)")
    min_lr_mult: float = _f(0.01, "warmup starts and cosine ends at min_lr_mult * lr")
    prior_lr_mult: float = _f(1.0, "prior lr = lr * this (1.0 = the reference's effective behaviour)")
    disc_every: int = _f(5, "one discriminator step every k optimizer steps (reference: 5); 0 disables the GAN")
    disc_start: int = _f(0, "first step of the GAN (D updates and the G adversarial term)")
    precision: str = _f("fp32", "'fp32', 'bf16', or 'fp16' (GPU only; dynamic loss scaling): torch autocast over fp32 "
                        "weights (DeepSpeed's torch_autocast section); the SVQ and prior stay fp32 islands",
                        choices=["fp32", "bf16", "fp16"])
    grad_clip: float = _f(0.0, "max global grad norm; 0 = no clipping (reference)")
    compile: bool = _f(False, "torch.compile the tokenizer and discriminator (DeepSpeed engine.compile)")
    deepspeed: Optional[str] = _f(None, "DeepSpeed JSON (default: built-in ZeRO-2 = configs/deepspeed/zero2.json); its "
                                        "'auto' fields are filled from this config (larp_mllm.runtime.deepspeed)")
    zero_stage: Optional[int] = _f(None, "override the JSON's ZeRO stage (0, 1 or 2)")
    device: str = _f("auto", "'auto' (cuda when available), 'cpu' or 'cuda'", choices=["auto", "cpu", "cuda"])
    checkpoint_every: int = _f(1000, "write a resumable checkpoint every N steps (and at the end)")
    keep_last: int = _f(3, "keep the last K checkpoints")
    resume: Optional[str] = _f(None, "'auto' (latest checkpoint in output_dir, if any) or one of this run's "
                               "checkpoint folders (output_dir/checkpoints/step_*; nothing from elsewhere: it holds "
                               "pickles)")
    log_every: int = _f(10, "console/TensorBoard scalars every N steps")
    val_every: int = _f(0, "validation (PSNR/SSIM/perceptual) + reconstruction videos every N steps; 0 = end only")
    max_bad_steps: int = _f(20, "abort (after a checkpoint) when more than this many non-finite losses were skipped")
    max_bad_data_fraction: float = _f(
        0.5, "data faults (larp_mllm.data.faults): clips that are missing, unreadable, too short or of the wrong size "
             "are skipped and counted by kind; the run stops with the counts when more than this share of the "
             "training (or validation) files is missing before the first step, or of an epoch's clips was bad (after "
             "a checkpoint); 1 stops only when no clip at all is readable")
    local_rank: int = _f(-1, "set by the deepspeed launcher; the LOCAL_RANK environment variable wins")


@dataclass
class TrainConfig:
    model: ModelArguments
    data: DataArguments
    loss: LossArguments
    train: TrainArguments

    def to_dict(self) -> dict:
        """Flat {field: value} (the YAML layout)."""
        out: dict = {}
        for part in (self.model, self.data, self.loss, self.train):
            out.update(dataclasses.asdict(part))
        return out


_GROUPS = (ModelArguments, DataArguments, LossArguments, TrainArguments)


def parse_config(argv: Optional[list[str]] = None) -> TrainConfig:
    """`--config file.yaml` (optional) then `--field value` overrides -> a checked TrainConfig."""
    cfg = TrainConfig(*parse_config_and_flags(_GROUPS, argv, description=__doc__))
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Value checks that need no data or processes (one clear ValueError)."""
    from larp_mllm import TOKENIZER_PRESETS

    t, lo = cfg.train, cfg.loss

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"config: {msg}")

    need(cfg.model.preset is None or cfg.model.preset in TOKENIZER_PRESETS,
         f"preset must be one of {sorted(TOKENIZER_PRESETS)}, got {cfg.model.preset!r}")
    need(cfg.model.prior_ce_temperature is None or cfg.model.prior_ce_temperature > 0,
         f"prior_ce_temperature must be > 0, got {cfg.model.prior_ce_temperature}")
    need(cfg.model.ss_max_ratio is None or 0 <= cfg.model.ss_max_ratio <= 1,
         f"ss_max_ratio must be in [0, 1], got {cfg.model.ss_max_ratio}")
    need(cfg.model.ss_peak_fraction is None or cfg.model.ss_peak_fraction >= 0,
         f"ss_peak_fraction must be >= 0, got {cfg.model.ss_peak_fraction}")
    need(t.global_batch_size >= 1, f"global_batch_size must be >= 1, got {t.global_batch_size}")
    need(t.micro_batch_size is None or t.micro_batch_size >= 1, "micro_batch_size must be >= 1")
    need(t.max_steps is None or t.max_steps >= 1, f"max_steps must be >= 1, got {t.max_steps}")
    need(t.epochs > 0, f"epochs must be > 0, got {t.epochs}")
    need(t.lr > 0 and t.disc_lr > 0, "lr and disc_lr must be > 0")
    need(0 <= t.min_lr_mult <= 1, f"min_lr_mult must be in [0, 1], got {t.min_lr_mult}")
    need(t.prior_lr_mult > 0, f"prior_lr_mult must be > 0, got {t.prior_lr_mult}")
    need(t.zero_stage in (None, 0, 1, 2), f"zero_stage must be 0, 1 or 2 (ZeRO-3 is not supported), got {t.zero_stage}")
    need(t.checkpoint_every >= 1 and t.keep_last >= 1, "checkpoint_every and keep_last must be >= 1")
    need(t.grad_clip >= 0, f"grad_clip must be >= 0, got {t.grad_clip}")
    need(0 <= t.max_bad_data_fraction <= 1, f"max_bad_data_fraction must be in [0, 1], got {t.max_bad_data_fraction}")
    need(0 <= lo.lecam_ema_decay < 1, "lecam_ema_decay must be in [0, 1)")
    need(t.precision in ("fp32", "bf16", "fp16"), f"precision must be fp32, bf16 or fp16, got {t.precision!r}")
    need(t.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {t.device!r}")
    need(lo.perceptual_backend in ("stlpips", "lpips-vgg", "none"),
         f"perceptual_backend must be stlpips, lpips-vgg or none, got {lo.perceptual_backend!r}")
    need(lo.perceptual_backend != "lpips-vgg" or lo.perceptual_weights is not None,
         "perceptual_backend 'lpips-vgg' needs perceptual_weights (a path to the user's LPIPS-VGG weights)")
    weights = (lo.l1_weight, lo.l2_weight, lo.perceptual_weight, lo.gan_weight, lo.lecam_weight, lo.vq_weight,
               lo.prior_weight, lo.entropy_weight)
    need(min(weights) >= 0, "loss weights must be >= 0")
    need(lo.entropy_temperature > 0, f"entropy_temperature must be > 0, got {lo.entropy_temperature}")
    if t.resume and t.resume != "auto":  # a checkpoint folder holds pickles: only this run's own are loaded
        from tokenizer_training.checkpointing import check_own_checkpoint

        check_own_checkpoint(t.resume, t.output_dir)


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer config and the DeepSpeed config this run asks for
# ----------------------------------------------------------------------------------------------------------------------
def model_config_overrides(cfg: TrainConfig) -> dict:
    """The LARPTokenizerConfig fields this run sets explicitly. Fields left None keep the value of the tokenizer's
    own config: the preset's, or the init_from checkpoint's (a reference checkpoint's mix_ss_* and
    latent_ce_temperature). Applied to the model's config, they are saved with it."""
    m = cfg.model
    values = {"prior_ce_temperature": m.prior_ce_temperature, "ss_max_ratio": m.ss_max_ratio,
              "ss_peak_fraction": m.ss_peak_fraction}
    return {k: v for k, v in values.items() if v is not None}


PRECISION_HINT = ("The tokenizer trainer keeps fp32 weights (the SVQ and the prior run as fp32 islands); ask for mixed "
                  "precision with `precision: bf16` or `fp16` in the training config (torch autocast).")


def deepspeed_config(cfg: TrainConfig, layout: BatchLayout, on_gpu: bool) -> dict:
    """The JSON of `--deepspeed` (or the built-in ZeRO-2 default) with every "auto" filled from this config
    (larp_mllm.runtime.deepspeed): the batch layout, grad_clip, precision as torch autocast, zero_stage."""
    t = cfg.train
    return resolve_deepspeed_config(t.deepspeed, StageSettings(
        on_gpu=on_gpu, batch=layout, gradient_clipping=t.grad_clip, autocast=t.precision, zero_stage=t.zero_stage,
        zero_stages=(0, 1, 2), builds_optimizer=True, precision_hint=PRECISION_HINT))
