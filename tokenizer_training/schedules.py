"""Training schedules as pure functions of the optimizer step (the trainer owns time).

Reference recipe (larp-spec 2.4, 3.2):
  * learning rate: linear warmup from ``min_mult * lr`` to ``lr`` over ``warmup_steps``, then cosine down to
    ``min_mult * lr`` at ``total_steps``; the discriminator uses the same multiplier on its own base lr;
  * scheduled sampling for the prior: ``min(max_ratio * step / (peak_fraction * total), max_ratio)``;
  * one discriminator update every ``every`` steps, starting at step ``start``.

Steps count optimizer (global) steps from 0; ``step`` is the index of the step about to be taken.
"""
from __future__ import annotations

import math

__all__ = ["lr_multiplier", "ss_ratio", "disc_step_due"]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_mult: float = 0.01) -> float:
    """Multiplier in [min_mult, 1] applied to a base learning rate at optimizer step ``step``.

    Warmup: ``min_mult -> 1`` linearly over ``warmup_steps`` (step 0 gives exactly ``min_mult``).
    Then cosine from 1 (at ``warmup_steps``) to ``min_mult`` (at ``total_steps``); constant ``min_mult`` after.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0.0 <= min_mult <= 1.0:
        raise ValueError(f"min_mult must be in [0, 1], got {min_mult}")
    step = max(int(step), 0)
    if step < warmup_steps:
        return min_mult + (1.0 - min_mult) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps == 0:
        return 1.0 if step < total_steps else min_mult
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_mult + (1.0 - min_mult) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ss_ratio(step: int, total: int, peak_fraction: float, max_ratio: float) -> float:
    """Scheduled-sampling ratio of the prior: linear ramp 0 -> ``max_ratio`` over the first ``peak_fraction`` of
    ``total`` steps, then constant ``max_ratio`` (reference ``mix_ss``: 0.3 and 0.5, the LARPTokenizerConfig
    defaults; the trainer passes its tokenizer config's ``ss_peak_fraction`` and ``ss_max_ratio``)."""
    if total <= 0:
        raise ValueError(f"total must be > 0, got {total}")
    if not 0.0 <= max_ratio <= 1.0:
        raise ValueError(f"max_ratio must be in [0, 1], got {max_ratio}")
    if peak_fraction <= 0.0:
        return max_ratio
    return min(max_ratio * max(int(step), 0) / (peak_fraction * total), max_ratio)


def disc_step_due(step: int, every: int, start: int = 0) -> bool:
    """Whether the discriminator is updated at optimizer step ``step`` (every ``every`` steps from ``start``).

    ``every <= 0`` disables the discriminator (no GAN)."""
    if every <= 0 or step < start:
        return False
    return (step - start) % every == 0
