"""The demo's figures for the three directions, read with the pixel attribute reader (larp_mllm.eval.attributes).

- text -> video: captions of seen and of held-out attribute combinations; each attribute of the generated videos
  (colour, shape, direction) against the caption's.
- video -> video (continuation): held-out clips' first 5 frames (the 5th repeated) -> codes -> the model writes the
  whole clip; direction of the predicted clip, and its centroid track against the real clip's over the frames the
  model predicted (pixels at the tokenizer's size).
- video -> text: a question about held-out clips; each attribute the caption names against the clip's.
- plain text: perplexity of the base model (LoRA off) and of the trained one on held-out text, over the text rows.

    figures = all_direction_figures(video_llm, larp, seen, held_out, val_clips, val_specs, heldout_clips,
                                    heldout_specs, eval_texts)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from larp_mllm.data.continuation import DEFAULT_CONDITION_FRAMES, condition_clip
from larp_mllm.data.synthetic import ClassSpec
from larp_mllm.eval.attributes import AttributeAccuracy, attribute_accuracy, parse_caption, read_batch
from llm_adapters import generate_video_codes
from llm_adapters.answers import continue_video_codes, generate_text, text_perplexity
from llm_adapters.tasks import CAPTION_QUESTIONS, question_prompt

BACKGROUND = "plain"  # the demo's clips: captions read "... over a plain background"


def _accuracy(acc: AttributeAccuracy) -> dict[str, float]:
    return {"color": acc.color, "shape": acc.shape, "direction": acc.direction, "all_three": acc.all_three,
            "items": acc.count}


def _decode(larp: Any, codes: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([larp.decode_codes(codes[i:i + batch_size]).clamp(0, 1)
                          for i in range(0, len(codes), batch_size)])


def _tokenize(larp: Any, videos: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([larp.tokenize(videos[i:i + batch_size]) for i in range(0, len(videos), batch_size)])


@dataclass
class TextToVideo:
    seen: dict[str, float]
    held_out: dict[str, float]
    videos: torch.Tensor  # (S, 3, T, H, W) the generated clips, seen captions first
    captions: list[str]


def text_to_video(llm: Any, larp: Any, seen: Sequence[ClassSpec], held_out: Sequence[ClassSpec], seen_samples: int,
                  held_out_samples: int, cfg_scale: float, seed: int = 0) -> TextToVideo:
    """Videos of the caption of every seen and held-out combination; attribute accuracy of each group."""
    expected = [s for s in seen for _ in range(seen_samples)] + [s for s in held_out for _ in range(held_out_samples)]
    captions = [s.caption(BACKGROUND) for s in expected]
    codes = generate_video_codes(llm, captions, cfg_scale=cfg_scale, seed=seed, batch_size=16)
    videos = _decode(larp, codes)
    read = read_batch(videos)
    cut = len(seen) * seen_samples
    return TextToVideo(_accuracy(attribute_accuracy(read[:cut], expected[:cut])),
                       _accuracy(attribute_accuracy(read[cut:], expected[cut:])), videos, captions)


@dataclass
class Continuation:
    direction_accuracy: float
    centroid_error_px: float  # mean distance of the predicted clip's centroids to the real clip's, predicted frames
    centroid_error_condition_px: float  # the same over the condition frames (regenerated, not copied)
    clips: int
    videos: torch.Tensor  # (B, 3, T, H, W) predicted clips
    conditions: torch.Tensor  # (B, 3, T, H, W) condition clips (what the model saw)


def continuation(llm: Any, larp: Any, clips: torch.Tensor, specs: Sequence[ClassSpec], seed: int = 0,
                 cond_frames: int = DEFAULT_CONDITION_FRAMES) -> Continuation:
    """Continue every clip (B, 3, T, H, W) from its first `cond_frames` frames; score direction and centroids."""
    conditions = condition_clip(clips, cond_frames)
    codes = continue_video_codes(llm, _tokenize(larp, conditions), seed=seed, batch_size=16)
    videos = _decode(larp, codes)
    predicted, real = read_batch(videos), read_batch(clips)
    direction = float(np.mean([p.direction == s.direction for p, s in zip(predicted, specs)]))
    errors: dict[str, list[float]] = {"after": [], "before": []}
    for p, r in zip(predicted, real):
        d = np.linalg.norm(np.asarray(p.centroids, dtype=np.float64) - np.asarray(r.centroids, dtype=np.float64),
                           axis=-1)  # (T,) pixels; NaN where a frame has no object
        errors["before"] += [x for x in d[:cond_frames] if np.isfinite(x)]
        errors["after"] += [x for x in d[cond_frames:] if np.isfinite(x)]
    mean = {k: float(np.mean(v)) if v else float("nan") for k, v in errors.items()}
    return Continuation(direction, mean["after"], mean["before"], len(clips), videos, conditions)


def captions(llm: Any, larp: Any, clips: torch.Tensor, specs: Sequence[ClassSpec]) -> tuple[dict[str, float], list[str]]:
    """Ask CAPTION_QUESTIONS[1] about every clip; attribute accuracy of what the answers name."""
    codes = _tokenize(larp, clips)
    answers = generate_text(llm, [question_prompt(c, CAPTION_QUESTIONS[1]) for c in codes], max_new_tokens=24)
    return _accuracy(attribute_accuracy([parse_caption(a) for a in answers], list(specs))), answers


def perplexities(llm: Any, texts: Sequence[str]) -> dict[str, float]:
    """Plain-text perplexity of the base model (LoRA switched off) and of the trained model, over the text rows."""
    rows = llm.vocab.text_vocab_size
    trained = text_perplexity(llm.model, llm.tokenizer, texts, text_vocab_size=rows)
    if hasattr(llm.model, "disable_adapter"):  # peft: the base model's text logits (the video rows are not text)
        with llm.model.disable_adapter():
            base = text_perplexity(llm.model, llm.tokenizer, texts, text_vocab_size=rows)
    else:
        base = float("nan")
    return {"base": base, "trained": trained, "ratio": trained / base}


def summary(t2v: TextToVideo, cont: Continuation, caption_seen: dict, caption_held: dict, ppl: dict) -> dict:
    """The JSON figures of the three directions."""
    return {"text_to_video": {"seen": t2v.seen, "held_out": t2v.held_out},
            "continuation": {k: v for k, v in asdict(cont).items() if not isinstance(v, torch.Tensor)},
            "video_to_text": {"seen_combinations": caption_seen, "held_out_combinations": caption_held},
            "plain_text_perplexity": ppl}
