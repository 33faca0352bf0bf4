"""Stage 2: LARP video codes in an LLM's vocabulary (extend, train, generate, load, merge).

    from llm_adapters import VideoLLM, extend_llm, generate_video_codes
    video_llm = extend_llm(model, tokenizer, larp_tokenizer, adapter="codebook", lora=dict(r=16))  # in place
    video_llm.save_pretrained("runs/llm");  VideoLLM.from_pretrained("runs/llm", base_model=...)
    codes = generate_video_codes(video_llm, ["apply eye makeup", None], cfg_scale=1.25, seed=0)  # (2, N) int64

Importing this package loads torch (and tqdm); transformers, peft and safetensors are imported where they are used,
DeepSpeed never (it belongs to `larp-train-llm`: `llm_adapters.train` / `.launch`). The CLIs are `llm_adapters.train`,
`.chat`, `.merge` and `.benchmark`.
"""
from .adapter import materialize
from .generate import VideoSpanConstraint, generate_video_codes
from .loading import decode_videos, load_larp, load_video_llm
from .model import VideoLLM, extend_llm, merge_bundle
from .prompts import build_prompt_ids, class_name_to_text
from .vocab import VideoVocab

__all__ = [
    "VideoLLM",
    "VideoSpanConstraint",
    "VideoVocab",
    "build_prompt_ids",
    "class_name_to_text",
    "decode_videos",
    "extend_llm",
    "generate_video_codes",
    "load_larp",
    "load_video_llm",
    "materialize",
    "merge_bundle",
]
