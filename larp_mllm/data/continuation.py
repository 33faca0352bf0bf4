"""Continuation (frame prediction) pairs: the condition clip a model sees and the clip it should produce.

The LARP reference's frame-prediction protocol (K600; its AR-FP trainer and ``sample.py --fp``):

- condition: the first ``cond_frames`` (5) frames of a T-frame clip, followed by T - 5 copies of frame 5, so that the
  condition is an ordinary T-frame clip; the LARP tokenizer turns it into N condition codes;
- target: the N codes of the whole clip (the first 5 frames are generated again, not copied).

Both are tokenized with deterministic VQ (argmax), as the reference's training does. The reference's ``sample.py``
never switches its tokenizer to deterministic VQ for ``--fp``, so its condition codes are *sampled* (tau = 0.03): a
slip, not part of the protocol; we use deterministic codes at both ends.

    cond = condition_clip(video)                    # video (B, 3, T, H, W) -> same shape, frames 5.. = frame 5
    cond_codes = tok.tokenize(cond, deterministic=True)      # (B, N)
    target = tok.tokenize(video, deterministic=True)         # (B, N)

``larp-extract-codes --condition-frames 5`` stores ``cond_codes`` beside the codes of every clip.
"""
from __future__ import annotations

import torch

__all__ = ["DEFAULT_CONDITION_FRAMES", "condition_clip"]

DEFAULT_CONDITION_FRAMES = 5  # the reference's frame-prediction condition (K600, 16-frame clips)


def condition_clip(video: torch.Tensor, cond_frames: int = DEFAULT_CONDITION_FRAMES) -> torch.Tensor:
    """The condition clip of ``video``: frames ``[0, cond_frames)`` kept, every later frame a copy of frame
    ``cond_frames - 1``.

    video: (3, T, H, W) or (B, 3, T, H, W), any dtype (frames on dim -3). Returns a new tensor of the same shape,
    dtype and device. ValueError for another shape, or ``cond_frames`` outside [1, T].
    """
    if not isinstance(video, torch.Tensor) or video.ndim not in (4, 5) or video.shape[-4] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"expected a video tensor (3, T, H, W) or (B, 3, T, H, W), got {shape}")
    t = video.shape[-3]
    if isinstance(cond_frames, bool) or not isinstance(cond_frames, int) or not 1 <= cond_frames <= t:
        raise ValueError(f"cond_frames must be an int in [1, T] = [1, {t}], got {cond_frames!r}")
    kept = video[..., :cond_frames, :, :]  # (..., 3, K, H, W)
    last = video[..., cond_frames - 1 : cond_frames, :, :]  # (..., 3, 1, H, W)
    repeats = last.expand(*last.shape[:-3], t - cond_frames, *last.shape[-2:])  # (..., 3, T - K, H, W)
    return torch.cat([kept, repeats], dim=-3)  # (..., 3, T, H, W)
