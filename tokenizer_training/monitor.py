"""What the tokenizer trainer reports: running loss averages, code usage, validation metrics, sample videos.

Everything here runs on every process where a collective is involved (all-reduces over the default group) and
writes files on rank 0 only. Validation runs under a forked RNG, so logging never changes the training stream.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from larp_mllm.runtime.files import atomic_write_text

logger = logging.getLogger("larp.train")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_process(flag: bool, device: torch.device) -> bool:
    """True when `flag` is set on at least one process (one small all-reduce)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


@dataclass
class RunningStats:
    """Sums of named scalars and a code histogram over a logging window; `summary` all-reduces them."""

    codebook_size: int
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    codes: Optional[torch.Tensor] = None

    def add(self, values: dict[str, torch.Tensor | float], codes: torch.Tensor) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        hist = torch.bincount(codes.flatten(), minlength=self.codebook_size).double()  # (K,)
        self.codes = hist if self.codes is None else self.codes + hist

    def summary(self, device: torch.device) -> dict[str, float]:
        """Means over the window and all processes, plus code usage (fraction of codes seen) and perplexity."""
        keys = sorted(self.sums)
        vec = torch.tensor([self.sums[k] for k in keys] + [float(self.count)], dtype=torch.float64, device=device)
        vec = all_reduce_sum(vec)
        out = {k: (vec[i] / vec[-1].clamp_min(1)).item() for i, k in enumerate(keys)}
        hist = all_reduce_sum((self.codes if self.codes is not None
                               else torch.zeros(self.codebook_size, dtype=torch.float64)).to(device))
        p = hist / hist.sum().clamp_min(1)
        out["codes/usage"] = (hist > 0).double().mean().item()
        out["codes/perplexity"] = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
        self.sums, self.count, self.codes = {}, 0, None
        return out


def replicas_agree(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether every process holds the same weights (per-tensor float64 sums compared across processes)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    sums = torch.stack([p.detach().double().sum() for p in module.parameters()]).to(device)  # (P,)
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    return all(torch.equal(g, gathered[0]) for g in gathered)


class Reporter:
    """Console + TensorBoard + `log.jsonl` (one JSON object per call) on rank 0; TensorBoard imported lazily.

    A run that starts at `start_step` (resumed from that checkpoint, or 0) drops what an earlier attempt logged after
    it: rows of `log.jsonl` with a larger step are removed and TensorBoard purges its events from that step on, so a
    killed and resumed run logs every step once.
    """

    def __init__(self, out_dir: Path, rank: int, start_step: int = 0):
        self.rank = rank
        self.writer = None
        self.jsonl = out_dir / "log.jsonl"
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            dropped = self._drop_rows_after(start_step)
            if dropped:
                logger.warning("log.jsonl: dropped %d rows after step %d, logged by an attempt that did not finish",
                               dropped, start_step)
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)

    def _drop_rows_after(self, step: int) -> int:
        if not self.jsonl.is_file():
            return 0
        def keep(row: str) -> bool:  # a row cut short by the kill is dropped too
            try:
                return json.loads(row).get("step", 0) <= step
            except ValueError:
                return False

        rows = self.jsonl.read_text().splitlines()
        kept = [r for r in rows if keep(r)]
        if len(kept) != len(rows):
            atomic_write_text(self.jsonl, "".join(r + "\n" for r in kept))
        return len(rows) - len(kept)

    def scalars(self, step: int, values: dict[str, float], console: bool = True) -> None:
        if self.rank != 0:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        if console:
            shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
            logger.info("step %d %s", step, shown)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def validate(tok: torch.nn.Module, batches: list[torch.Tensor], amp, perceptual: Optional[torch.nn.Module],
             device: torch.device) -> tuple[dict[str, float], Optional[torch.Tensor]]:
    """PSNR / SSIM / perceptual of deterministic (argmax) reconstructions of this process's validation batches,
    averaged over all processes. Returns the metrics and the reconstructions of the first batch (B,3,T,H,W)."""
    from larp_mllm.eval.metrics import reconstruction_metrics

    was_training = tok.training
    tok.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # psnr, ssim, perceptual, count
    first = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for video in batches:
            video = video.to(device)
            with amp():
                codes = tok.tokenize(video, deterministic=True)
                recon = tok.decode_codes(codes).float()
            m = reconstruction_metrics(recon, video, perceptual)
            perc = m.perceptual.sum().item() if m.perceptual is not None else 0.0
            totals += torch.tensor([m.psnr.sum().item(), m.ssim.sum().item(), perc, video.shape[0]],
                                   dtype=torch.float64, device=device)
            first = recon if first is None else first
    tok.train(was_training)
    totals = all_reduce_sum(totals)
    n = totals[3].clamp_min(1)
    out = {"val/psnr": (totals[0] / n).item(), "val/ssim": (totals[1] / n).item()}
    if perceptual is not None:
        out["val/perceptual"] = (totals[2] / n).item()
    return out, first


def write_samples(out_dir: Path, step: int, real: torch.Tensor, recon: torch.Tensor, max_videos: int = 4) -> None:
    """`samples/step_XXXXXXXX.mp4` (real | reconstruction side by side) and a PNG grid (rows: real, recon, ...)."""
    from larp_mllm.data.video_write import write_video, write_video_grid

    real, recon = real[:max_videos].float().cpu(), recon[:max_videos].float().clamp(0, 1).cpu()
    folder = out_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    side = torch.cat([real, recon], dim=-1)  # (B, 3, T, H, 2W)
    write_video(side, folder / f"step_{step:08d}.mp4")
    rows, labels = [], []
    for i in range(real.shape[0]):
        rows += [real[i], recon[i]]
        labels += [f"real {i}", f"recon {i}"]
    write_video_grid(rows, folder / f"step_{step:08d}.png", labels=labels)
