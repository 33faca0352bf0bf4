"""Train the LARP tokenizer (larp-spec 3): generator and discriminator as two DeepSpeed engines.

    deepspeed --module tokenizer_training.train --config configs/tokenizer/larp_l_long.yaml \
        --deepspeed configs/deepspeed/zero2.json                     # one or many GPUs / nodes (--hostfile)
    torchrun --nproc-per-node 2 -m tokenizer_training.train --config configs/tokenizer/larp_tiny_cpu.yaml
    larp-train-tokenizer --config configs/tokenizer/larp_tiny_cpu.yaml --max-steps 50   # one plain process
    larp-train-tokenizer --config ... --resume auto                  # continue exactly from the last checkpoint
On a busy CPU machine set OMP_NUM_THREADS=1 (torchrun does that itself): oversubscribed threads thrash.

Per optimizer step (`gradient accumulation` micro-batches each): the tokenizer forward (with the scheduled-sampling
ratio of the step); every `disc_every` steps a discriminator step on the detached reconstructions; then the
generator step with the discriminator frozen. Learning rates follow warmup + cosine as pure functions of the step.
Outputs under `output_dir`: checkpoints/step_*/ (resumable; model/ loads with LARPTokenizer.from_pretrained),
final/ (the trained tokenizer), tensorboard/, samples/.

Data faults (larp_mllm.data.faults): before any engine exists every training and validation file is stat'ed, and
the run stops (exit status 2, one error line with the counts and the first missing paths) when more than
`max_bad_data_fraction` of them are missing. While training, clips that cannot be used are skipped and counted by
kind (missing, unreadable, too_short, wrong_size; scalars data/*, epoch lines, the final summary); a micro-batch
without a readable clip is skipped as a data fault, not as a non-finite loss; the run stops (after a checkpoint when
it made progress) once more than `max_bad_data_fraction` of an epoch's clips were bad.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from larp_mllm.data.faults import DataFaultError, min_items_to_judge
from larp_mllm.runtime.deepspeed import BatchLayout
from larp_mllm.runtime.distributed import ensure_distributed_env
from larp_mllm.runtime.processes import loader_workers
from larp_mllm.eval.perceptual import build_perceptual
from tokenizer_training.arguments import (
    DEFAULT_PRESET, TrainConfig, deepspeed_config, model_config_overrides, parse_config,
)
from tokenizer_training.checkpointing import (
    ResumableSampler, TrainerState, load_checkpoint, recover_checkpoints, resume_checkpoint, save_checkpoint,
)
from tokenizer_training.data import build_datasets, fault_counter, preflight, read_val_batches
from tokenizer_training.discriminator import DiscriminatorConfig, TransformerDiscriminator
from tokenizer_training.losses import LeCamEMA, TokenizerLoss
from tokenizer_training.monitor import (
    Reporter, RunningStats, all_reduce_sum, any_process, logger, replicas_agree, validate, write_samples,
)
from tokenizer_training.schedules import disc_step_due, lr_multiplier, ss_ratio

if TYPE_CHECKING:
    from larp_mllm import LARPTokenizer

NAN_HOOK_ENV = "LARP_TEST_NAN_LOSS_FROM_STEP"  # test hook: every loss from this optimizer step on is NaN


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device_pref: str) -> Dist:
    """Join (or, for a plain single process, create) the process group: gloo on CPU, nccl on GPU."""
    ensure_distributed_env()  # plain `python -m` / console script: a group of one
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no GPU is visible")
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed

    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


SHAPE_FIELDS = ("input_size", "frame_num", "in_channels", "patch_size", "temporal_patch_size", "num_tokens",
                "encoder_hidden_size", "encoder_depth", "encoder_num_heads", "decoder_hidden_size", "decoder_depth",
                "decoder_num_heads", "codebook_size", "codebook_dim", "prior", "prior_max_len")


def build_tokenizer(cfg: TrainConfig) -> LARPTokenizer:
    """The LARPTokenizer this run trains: the init_from checkpoint, or a random init of the preset (DEFAULT_PRESET
    unless set). With both, the checkpoint's architecture must be the preset's. The config fields the run sets
    explicitly (model_config_overrides) replace the checkpoint's / preset's; the others keep their values."""
    from larp_mllm import TOKENIZER_PRESETS, LARPTokenizer

    m = cfg.model
    if m.init_from:
        tok = LARPTokenizer.from_pretrained(m.init_from)
    else:
        tok = LARPTokenizer.from_preset(m.preset or DEFAULT_PRESET)
    if m.init_from and m.preset:
        preset = TOKENIZER_PRESETS[m.preset]
        differ = [f"{k}={getattr(tok.config, k)!r} (preset: {getattr(preset, k)!r})" for k in SHAPE_FIELDS
                  if getattr(tok.config, k) != getattr(preset, k)]
        if differ:
            raise ValueError(f"init_from {m.init_from} is not a {m.preset!r} tokenizer: {'; '.join(differ)}. Set "
                             f"preset to its size, or leave preset unset (the checkpoint's config.json decides)")
    tok.config = dataclasses.replace(tok.config, **model_config_overrides(cfg))  # checked; saved with the model
    tok.check_inputs = False  # the loader yields [0, 1] floats; skip the host-syncing range check
    tok.encoder.gradient_checkpointing = tok.decoder.gradient_checkpointing = m.gradient_checkpointing
    return tok


def make_engine(module: torch.nn.Module, groups: list[dict], cfg: TrainConfig, ds_config: dict):
    import deepspeed

    opt = torch.optim.Adam(groups, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2))
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=dict(ds_config))
    if cfg.train.compile:
        engine.compile()
    return engine


def forward_or_none(engine, video: torch.Tensor, ratio: float, with_prior: bool,
                    entropy_temperature: Optional[float] = None):
    """The tokenizer's training forward, or None for an empty batch. Non-finite activations come back as
    non-finite losses (the SVQ samples uniformly from NaN rows), which the caller counts and skips."""
    if video.shape[0] == 0:
        return None
    return engine(video, ss_ratio=ratio, with_prior=with_prior, entropy_temperature=entropy_temperature)


def set_lrs(engine, base_lr: float, group_mults: list[float]) -> None:
    for group, mult in zip(engine.optimizer.param_groups, group_mults):
        group["lr"] = base_lr * mult


def train(argv: Optional[list[str]] = None) -> None:
    """Parse the config (`--config file.yaml` and flags) and train; see the module docstring."""
    cfg = parse_config(argv)
    t, lcfg = cfg.train, cfg.loss
    dist = init_distributed(t.device)
    logging.basicConfig(level=logging.INFO if dist.rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    from larp_mllm.data.clips import collate_clips

    out_dir = Path(t.output_dir)
    ckpt_root = out_dir / "checkpoints"
    if dist.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for action in recover_checkpoints(ckpt_root):  # what a run killed while checkpointing left behind
            logger.warning("checkpoints: %s", action)
    layout = BatchLayout.split(t.global_batch_size, dist.world, t.micro_batch_size)
    ds_config = deepspeed_config(cfg, layout, dist.device.type == "cuda")

    # ---------------------------------------------------------------- models (same init on every process)
    seed_all(t.seed)
    tok = build_tokenizer(cfg)
    c = tok.config
    use_prior = lcfg.prior_weight > 0 and tok.prior_model is not None
    entropy_temperature = lcfg.entropy_temperature if lcfg.entropy_weight > 0 else None
    if tok.prior_model is not None and not use_prior:
        tok.prior_model.requires_grad_(False)
    use_gan = lcfg.gan_weight > 0 and t.disc_every > 0
    disc = TransformerDiscriminator(DiscriminatorConfig(
        input_size=c.input_size, frame_num=c.frame_num, in_channels=c.in_channels, patch_size=c.patch_size,
        temporal_patch_size=c.temporal_patch_size, dim=cfg.model.disc_dim, depth=cfg.model.disc_depth,
        num_heads=cfg.model.disc_heads)) if use_gan else None
    frames, size = cfg.data.num_frames or c.frame_num, cfg.data.size or c.input_size
    if (frames, size) != (c.frame_num, c.input_size):
        raise ValueError(f"clips of {frames}x{size}^2 do not fit the tokenizer "
                         f"({cfg.model.init_from or cfg.model.preset or DEFAULT_PRESET}: "
                         f"{c.frame_num}x{c.input_size}^2)")
    train_ds, val_ds = build_datasets(cfg, out_dir, dist.rank, dist.barrier, frames, size)  # record lists only
    preflight(cfg, train_ds, val_ds)  # too many missing files: stop before any engine or checkpoint exists

    groups = [{"params": [p for p in tok.tokenizer_parameters() if p.requires_grad]}]
    group_mults = [1.0]
    if use_prior:
        groups.append({"params": list(tok.prior_parameters())})
        group_mults.append(t.prior_lr_mult)
    g_engine = make_engine(tok, groups, cfg, ds_config)
    d_engine = make_engine(disc, [{"params": list(disc.parameters())}], cfg, ds_config) if use_gan else None
    engines = {"generator": g_engine, "discriminator": d_engine}
    perceptual = build_perceptual(lcfg.perceptual_backend, lcfg.perceptual_weights, dist.device)
    loss_fn = TokenizerLoss(lcfg, perceptual)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    amp = partial(torch.autocast, device_type=dist.device.type, dtype=amp_dtype) if amp_dtype else nullcontext

    # ---------------------------------------------------------------- data
    sampler = ResumableSampler(len(train_ds), layout.micro_batch, dist.rank, dist.world, t.seed)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=layout.micro_batch, sampler=sampler, collate_fn=collate_clips,
        generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG
        pin_memory=dist.device.type == "cuda", **loader_workers(cfg.data.num_workers))  # spawned, not forked
    steps_per_epoch = max(1, sampler.batches_per_epoch // layout.grad_accum)
    total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = min(total, t.warmup_steps if t.warmup_steps is not None else round(t.warmup_epochs * steps_per_epoch))
    val_batches = []
    if val_ds is not None:
        val_sampler = ResumableSampler(len(val_ds), max(1, min(layout.micro_batch, len(val_ds) // dist.world)),
                                       dist.rank, dist.world, t.seed, shuffle=False)
        val_loader = torch.utils.data.DataLoader(val_ds, batch_size=val_sampler.batch_size, sampler=val_sampler,
                                                 collate_fn=collate_clips)
        val_faults = fault_counter("validation data", cfg, min_items_to_judge(val_sampler.batch_size, len(val_ds)),
                                   dist.device)
        val_batches = read_val_batches(val_loader, cfg.data.val_batches, val_faults)
    faults = fault_counter("training data", cfg, min_items_to_judge(layout.global_batch, len(train_ds)), dist.device)

    # ---------------------------------------------------------------- state (fresh or resumed)
    seed_all(t.seed + dist.rank)  # per-process sampling streams (SVQ, scheduled sampling, GAN label noise)
    state = TrainerState(config=cfg.to_dict())
    resume_from = resume_checkpoint(t.resume, out_dir)  # only this run's own checkpoints (they hold pickles)
    if resume_from is not None:
        state = load_checkpoint(resume_from, engines, dist.rank)
        state.config = cfg.to_dict()  # checkpoints from here on carry the config this run actually uses
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.step, state.epoch,
                    state.batch_in_epoch)
    lecam = LeCamEMA(state.lecam_real, state.lecam_fake, lcfg.lecam_ema_decay)
    reporter = Reporter(out_dir, dist.rank, start_step=state.step)
    stats = RunningStats(tok.codebook_size)
    if dist.rank == 0:
        n_g = sum(p.numel() for p in tok.parameters())
        logger.info("tokenizer %.2fM params, discriminator %.2fM; %d steps (%d/epoch), warmup %d; batch %d = %d x %d "
                    "accum x %d processes; precision %s; ZeRO-%d; scheduled sampling 0 -> %g over %g of the steps",
                    n_g / 1e6, sum(p.numel() for p in disc.parameters()) / 1e6 if disc else 0, total, steps_per_epoch,
                    warmup, layout.global_batch, layout.micro_batch, layout.grad_accum, dist.world, t.precision,
                    ds_config["zero_optimization"]["stage"], c.ss_max_ratio, c.ss_peak_fraction)

    def export(folder: Path) -> None:  # params are fp32 on every process (ZeRO <= 2, autocast for bf16/fp16)
        if dist.rank == 0:
            tok.save_pretrained(folder)

    def checkpoint() -> Path:
        state.lecam_real, state.lecam_fake = lecam.real, lecam.fake
        if not replicas_agree(tok, dist.device):
            raise RuntimeError("the tokenizer weights differ between processes; the checkpoint would be inconsistent")
        reporter.scalars(state.step, {"replicas_agree": 1.0}, console=False)
        return save_checkpoint(ckpt_root, state, engines, export, t.keep_last, dist.rank, dist.barrier)

    def data_stop(err: DataFaultError) -> DataFaultError:  # keeps the steps made before the data went bad
        return DataFaultError(f"{err}; state saved to {checkpoint()}") if state.step > max(saved_at, 0) else err

    def zero_loss() -> torch.Tensor:  # a finite zero connected to every trainable parameter
        return sum((p.sum() * 0.0 for p in tok.parameters() if p.requires_grad), torch.zeros((), device=dist.device))

    # ---------------------------------------------------------------- the loop
    from tqdm import tqdm

    bar = tqdm(total=total, initial=state.step, disable=dist.rank != 0, desc="train", dynamic_ncols=True)
    micro = 0  # micro-batches accumulated into the current optimizer step
    nan_from = int(os.environ[NAN_HOOK_ENV]) if os.environ.get(NAN_HOOK_ENV) else None
    saved_at = state.step if resume_from is not None else -1
    while state.step < total:
        train_ds.set_epoch(state.epoch)
        sampler.set_position(state.epoch, state.batch_in_epoch)
        for batch in loader:
            state.batch_in_epoch += 1
            try:
                faults.update(batch)  # counts summed over the processes: all stop together
            except DataFaultError as err:
                raise data_stop(err) from None
            step = state.step
            mult = lr_multiplier(step, total, warmup, t.min_lr_mult)
            set_lrs(g_engine, t.lr * mult, group_mults)
            ratio = ss_ratio(step, total, c.ss_peak_fraction, c.ss_max_ratio)
            d_due = use_gan and disc_step_due(step, t.disc_every, t.disc_start)
            video = batch.video.to(dist.device, non_blocking=True)
            with amp():
                out = forward_or_none(g_engine, video, ratio, use_prior, entropy_temperature)
                g_loss = loss_fn.generator(video, out) if out is not None else None  # all but the GAN term
                d_due = d_due and out is not None
                d_loss = loss_fn.discriminator(d_engine, video, out.recon, lecam) if d_due else None
            if g_loss is not None and nan_from is not None and step >= nan_from:  # test hook
                g_loss = dataclasses.replace(g_loss, total=g_loss.total * float("nan"))
            bad = g_loss is None or not torch.isfinite(g_loss.total) or (
                d_loss is not None and not torch.isfinite(d_loss.total))
            if any_process(bad, dist.device):  # every process skips this micro-batch (no engine call at all)
                if any_process(out is None, dist.device):  # no readable clip: data faults, counted above
                    continue
                state.bad_steps += 1
                logger.warning("step %d: non-finite loss on some process; skipped (%d so far)", step, state.bad_steps)
                if state.bad_steps > t.max_bad_steps:
                    path = checkpoint()
                    raise RuntimeError(f"aborting: {state.bad_steps} micro-batches had a non-finite loss (limit "
                                       f"max_bad_steps={t.max_bad_steps}); state saved to {path}. Lower lr, use fp32 "
                                       f"or check the data.")
                continue
            if d_loss is not None:  # discriminator first, on the detached reconstructions
                set_lrs(d_engine, t.disc_lr * mult, [1.0])
                d_engine.backward(d_loss.total)
                d_engine.step()
                means = all_reduce_sum(torch.stack([d_loss.logits_real, d_loss.logits_fake]).double()) / dist.world
                lecam.update(means[0].item(), means[1].item())  # the same EMA on every process
            if use_gan and step >= t.disc_start:
                disc.requires_grad_(False)  # frozen for the generator step
                with amp():
                    g_loss = loss_fn.add_adversarial(g_loss, disc(out.recon))
            if any_process(not torch.isfinite(g_loss.total), dist.device):
                state.bad_steps += 1  # the fresh D made the adversarial term blow up: a zero update keeps
                g_engine.backward(zero_loss())  # both engines' micro-step counters in step
            else:
                g_engine.backward(g_loss.total)
            if disc is not None:
                disc.requires_grad_(True)
            g_engine.step()
            values = {"loss/total": g_loss.total.detach(), "loss/l1": g_loss.l1, "loss/l2": g_loss.l2,
                      "loss/perceptual": g_loss.perceptual,
                      "loss/gan_g": g_loss.gan, "loss/vq": g_loss.vq, "loss/prior": g_loss.prior,
                      "loss/entropy": g_loss.entropy}
            if use_prior:
                values.update({"prior/top1": out.prior_top1, "prior/top5": out.prior_top5})
            if d_loss is not None:
                values.update({"loss/disc": d_loss.gan, "loss/lecam": d_loss.lecam,
                               "disc/logits_real": d_loss.logits_real, "disc/logits_fake": d_loss.logits_fake})
            stats.add(values, out.codes)
            micro += 1
            if micro < layout.grad_accum:
                continue
            # ------------------------------------------------ one optimizer step done
            micro = 0
            state.step += 1
            bar.update(1)
            if state.step % t.log_every == 0 or state.step == total:
                summary = stats.summary(dist.device)
                summary.update({"lr/generator": t.lr * mult, "lr/discriminator": t.disc_lr * mult,
                                "schedule/ss_ratio": ratio, "skipped_batches": float(state.bad_steps),
                                **faults.scalars()})
                reporter.scalars(state.step, summary)
                bar.set_postfix(l1=f"{summary.get('loss/l1', 0):.4f}", l2=f"{summary.get('loss/l2', 0):.4f}")
            if val_batches and (state.step == total or (t.val_every and state.step % t.val_every == 0)):
                metrics, recon = validate(tok, val_batches, amp, perceptual, dist.device)
                reporter.scalars(state.step, metrics)
                if dist.rank == 0 and recon is not None:
                    write_samples(out_dir, state.step, val_batches[0], recon)
            if state.step % t.checkpoint_every == 0 or state.step == total:
                checkpoint()
                saved_at = state.step
            if state.step >= total:
                break
        else:  # the epoch's batches are exhausted
            try:
                faults.end_epoch(state.epoch)  # the whole epoch judged; its counts logged
            except DataFaultError as err:
                raise data_stop(err) from None
            state.epoch += 1
            state.batch_in_epoch = 0
            continue
        break
    bar.close()
    if saved_at != state.step:
        checkpoint()
    if dist.rank == 0:
        tok.save_pretrained(out_dir / "final")
        logger.info("done: %d steps, %d micro-batches skipped for a non-finite loss; training data: %s; tokenizer "
                    "written to %s", state.step, state.bad_steps, faults.summary(), out_dir / "final")
    reporter.close()
    dist.barrier()


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry (larp-train-tokenizer): ``train``, with a data fault reported as one error line (the counts by
    kind and a few paths) and exit status 2 instead of a traceback."""
    try:
        train(argv)
    except DataFaultError as err:
        logger.error("%s", err)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
