"""Video-token generation speed: tokens/s and seconds per video, CFG on, plain vs fast path, at several batch sizes.

    python bench/generate_speed.py --config cpu-small --num-tokens 128 --batch-sizes 1,8 --repeats 3   # CPU, ~2 min
    python bench/generate_speed.py --config qwen2.5-0.5b --dtype bf16 --batch-sizes 1,64          # GPU vs benchmarks.md
    python bench/generate_speed.py --model runs/llm/final --base-model BASE --batch-sizes 1,64    # a trained bundle

`--config` builds a randomly initialised LLM of a given shape, extended with a video block of `--codebook-size` codes
(`--num-tokens` per video) through the codebook adapter (`--head adapter`) or materialised into a plain resized
lm_head (`--head merged`, what a served checkpoint looks like). Prompts are class names through a byte-level
stand-in tokenizer (about 40 tokens, the length of a chat-template class prompt). Reference on one H200
(benchmarks.md): 632M AR, 1024 tokens, CFG 1.25: 21.1 s per video at batch 1 (48 tokens/s), 3371 tokens/s at batch 64;
targets <= 2 s per video at batch 1, >= 2x the reference at batch 64. Figures count video tokens (not CFG rows).
One JSON line per figure; on a CPU compare the paths' ratio, not the seconds.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from llm_adapters.adapter import install_video_adapter, materialize
from llm_adapters.generate import generate_video_codes
from llm_adapters.vocab import VideoVocab

CONFIGS = {  # name -> (architecture, config fields)
    "tiny": ("llama", dict(vocab_size=700, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "cpu-small": ("qwen2", dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                                   rope_theta=1_000_000.0)),
}
CLASS_PROMPTS = ["apply eye makeup", "basketball", "playing violin", "horse riding", "sky diving", "yo yo"]


class ByteTokenizer:
    """A stand-in tokenizer (bytes + 3 specials, no chat template) for randomly initialised models."""

    chat_template = None
    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [1] * add_special_tokens + [3 + b for b in text.encode()]}


class RandomVideoLLM:
    """A random LLM of a named shape with a K-code video block (codebook adapter or materialised head)."""

    def __init__(self, name: str, codebook_size: int, num_tokens: int, head: str, device: torch.device,
                 dtype: torch.dtype, seed: int = 0):
        from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

        arch, fields = CONFIGS[name]
        config = (LlamaConfig if arch == "llama" else Qwen2Config)(max_position_embeddings=4096, **fields)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        base = config.vocab_size
        self.vocab = VideoVocab(base=base, codebook_size=codebook_size, num_video_tokens=num_tokens,
                                codebook_hash="random", embedding_size=-(-(base + 3 + codebook_size) // 64) * 64)
        codebook = torch.nn.functional.normalize(torch.randn(codebook_size, 16), dim=-1)
        install_video_adapter(model, self.vocab, codebook)
        with torch.no_grad():  # a context-dependent spread over the codes (random init gives equal logits)
            model.get_output_embeddings().video.rows.scale.normal_(0, 1.0)
        self.model = (materialize(model) if head == "merged" else model).to(device=device, dtype=dtype).eval()
        self.tokenizer = ByteTokenizer()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_runs(llm, batch: int, paths: list[str], cfg_scale: float, device: torch.device, warmup: bool,
               repeats: int) -> dict[str, float]:
    """Median seconds to generate `batch` videos (one batch) per path ('plain', 'fast', 'fast-compiled').

    The paths take turns within each repeat, so that load drifting on a shared machine hits all of them alike.
    """
    prompts = [CLASS_PROMPTS[i % len(CLASS_PROMPTS)] for i in range(batch)]

    def once(path: str, seed: int) -> float:
        sync(device)
        start = time.perf_counter()
        codes = generate_video_codes(llm, prompts, cfg_scale=cfg_scale, seed=seed, batch_size=batch, progress=False,
                                     fast=path != "plain", compile=path == "fast-compiled")
        sync(device)
        assert codes.shape == (batch, llm.vocab.num_video_tokens)
        return time.perf_counter() - start

    if warmup:  # compiles / captures graphs for this shape, warms the allocator and kernels
        for path in paths:
            once(path, 1000)
    times: dict[str, list[float]] = {path: [] for path in paths}
    for r in range(repeats):
        for path in paths:
            times[path].append(once(path, r))
    return {path: sorted(t)[len(t) // 2] for path, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cpu-small", choices=sorted(CONFIGS), help="random model of this shape")
    p.add_argument("--model", help="a VideoLLM bundle or merged checkpoint instead of --config")
    p.add_argument("--base-model", help="base model of a bundle")
    p.add_argument("--head", default="merged", choices=["merged", "adapter"])
    p.add_argument("--codebook-size", type=int, default=8192)
    p.add_argument("--num-tokens", type=int, default=1024, help="codes per video (random models)")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--paths", default="auto", help="comma list of plain,fast,fast-compiled (auto: by device)")
    p.add_argument("--cfg-scale", type=float, default=1.25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per figure (the median is reported)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "fp32": torch.float32,
             "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.model:
        from llm_adapters import load_video_llm

        llm, name = load_video_llm(args.model, args.base_model, device=device, dtype=dtype), args.model
    else:
        llm = RandomVideoLLM(args.config, args.codebook_size, args.num_tokens, args.head, device, dtype)
        name = f"random:{args.config}:{args.head}"
    paths = args.paths.split(",") if args.paths != "auto" else \
        (["plain", "fast", "fast-compiled"] if device.type == "cuda" else ["plain", "fast"])
    params = sum(p.numel() for p in llm.model.parameters())
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    n = llm.vocab.num_video_tokens
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        seconds = timed_runs(llm, batch, paths, args.cfg_scale, device, not args.no_warmup, args.repeats)
        for path in paths:
            common = {"bench": "generate_speed", "device": label, "model": name, "params": params, "batch": batch,
                      "path": path, "num_tokens": n, "cfg_scale": args.cfg_scale, "dtype": str(dtype)[6:]}
            print(json.dumps({**common, "metric": "seconds_per_video", "value": round(seconds[path] / batch, 4),
                              "unit": "s/video"}), flush=True)
            print(json.dumps({**common, "metric": "tokens_per_second", "value": round(batch * n / seconds[path], 1),
                              "unit": "tokens/s"}), flush=True)
        for path in paths[1:]:
            print(json.dumps({"bench": "generate_speed", "device": label, "model": name, "batch": batch,
                              "metric": f"speedup_{path}_vs_plain", "value": round(seconds["plain"] / seconds[path], 3)
                              if "plain" in seconds else None, "unit": "x", "num_tokens": n}), flush=True)


if __name__ == "__main__":
    main()
