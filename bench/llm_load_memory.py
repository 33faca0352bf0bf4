"""Peak memory of loading a ~0.5B-parameter base for stage 2: one process vs ZeRO-3 over two CPU processes (gloo).

    python bench/llm_load_memory.py                      # builds a random Qwen2.5-0.5B-shaped base once, then measures
    python bench/llm_load_memory.py --model-dir DIR      # any HF folder (with its tokenizer)

Each measurement runs in a fresh interpreter (this driver never imports torch; two ranks through torch.distributed.run)
and goes through larp-train-llm's own loading path: `load_base_model` (tokenizer, then the model; under ZeRO-3 each
rank builds it partitioned and reads only its own part of every weight, llm_adapters.zero3_load), then `extend_llm`
(under ZeRO-3 it reads the embedding's row statistics from each rank's part, never gathering it). One JSON line per
figure; `peak_rss_mb` is the process's high-water mark (resource.getrusage, MiB) after each stage:

- ``imports``: torch, transformers, peft, larp_mllm and llm_adapters.train imported and the TrainingArguments built
  (the same imports in both modes); under ZeRO-3 also deepspeed, its CPU comm op and the gloo group.
- ``load``: the tokenizer and the model. One process: transformers maps the checkpoint lazily, so few weights are
  resident yet. ZeRO-3: the rank's partitions filled (its half of every weight, in memory).
- ``load_resident`` (one process): every weight read once, as the first training step reads them: the checkpoint's
  pages resident. This is the single-process figure the ZeRO-3 ranks are compared with.
- ``extend``: `extend_llm` with the larp-tiny codebook (the tokenizer grows by the video tokens; adapter and LoRA).

`held_mb` is the size of the parameters each process holds (all of them in one process, its partitions under ZeRO-3).
The summary lines give the ZeRO-3 ranks' peak over the single process's, and the same for the growth over
``imports``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INCLUDES = {  # what the peaks compared in the summary lines hold (module docstring)
    "load": "imports + tokenizer + weights (single: every weight read once; ZeRO-3: the rank's partitions)",
    "extend": "the load, then extend_llm (tokenizer grown by the video tokens, adapter, LoRA)",
}


def build_base(folder: Path) -> None:
    """A random Qwen2.5-0.5B-shaped model in fp32 (safetensors) with SmolLM2's tokenizer (from its shipped GGUF)."""
    import torch
    from generate_speed import CONFIGS  # the shared table of model shapes (bench/generate_speed.py)
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from larp_mllm.assets import smollm2_gguf

    torch.manual_seed(0)
    _, fields = CONFIGS["qwen2.5-0.5b"]  # Qwen2.5-0.5B's shape: 24 layers, hidden 896, 14 / 2 heads, 151936 rows
    model = Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
                                         **fields))
    model.save_pretrained(folder, max_shard_size="1GB")
    gguf = smollm2_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)


def worker(model_dir: str, zero3: bool, out: str) -> None:
    """Load (and extend) the base as larp-train-llm does; print one JSON line per figure."""
    import resource
    import tempfile

    import torch

    from larp_mllm import LARPTokenizer
    from llm_adapters.launch import held_parameters, join_deepspeed_comm
    from llm_adapters.model import extend_llm
    from llm_adapters.train import ModelArguments, build_training_arguments, load_base_model

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    training = {"output_dir": tempfile.mkdtemp(prefix="load-bench-"), "per_device_train_batch_size": 1,
                "report_to": "none"}
    if zero3:
        training["deepspeed"] = str(REPO / "configs/deepspeed/zero3.json")
    args = build_training_arguments(training)
    join_deepspeed_comm(args)
    rank = int(os.environ.get("RANK", "0"))
    mode = "zero3_2proc" if zero3 else "single"
    start = peak_mb()
    model, tokenizer = load_base_model(ModelArguments(base_model=model_dir))
    held, total = held_parameters(model)
    size = next(model.parameters()).element_size()
    rows = [dict(figure="peak_rss_mb", after="imports", value=round(start, 1)),
            dict(figure="peak_rss_mb", after="load", value=round(peak_mb(), 1)),
            dict(figure="parameters_held", after="load", value=held, of=total),
            dict(figure="held_mb", after="load", value=round(held * size / 2**20, 1))]
    if not zero3:  # transformers maps the file lazily: a training step reads every weight, so count them resident
        for param in model.parameters():
            param.detach().sum()
        rows.append(dict(figure="peak_rss_mb", after="load_resident", value=round(peak_mb(), 1)))
    torch.manual_seed(0)
    larp = LARPTokenizer.from_preset("larp-tiny").eval()
    extend_llm(model, tokenizer, larp)
    rows.append(dict(figure="peak_rss_mb", after="extend", value=round(peak_mb(), 1)))
    with open(out, "a") as fh:
        for row in rows:
            fh.write(json.dumps(dict(bench="llm_load_memory", mode=mode, rank=rank, **row)) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # no comm thread left running at exit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="HF folder of the base (default: build a random 0.5B one)")
    p.add_argument("--cache", default=str(REPO / "runs/bench/qwen2.5-0.5b-random"),
                   help="where the random base is built once")
    p.add_argument("--worker", choices=["single", "zero3"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.model_dir, args.worker == "zero3", args.out)

    model_dir = Path(args.model_dir or args.cache)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not (model_dir / "config.json").is_file():
        if args.model_dir:
            raise SystemExit(f"{model_dir} holds no config.json")
        code = f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'bench')!r}]; " \
               f"from llm_load_memory import build_base; from pathlib import Path; build_base(Path({str(model_dir)!r}))"
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
    out = model_dir.parent / "load_memory.jsonl"
    out.unlink(missing_ok=True)
    me = [str(Path(__file__).resolve()), "--model-dir", str(model_dir), "--out", str(out)]
    subprocess.run([sys.executable, *me, "--worker", "single"], check=True, env=env, cwd=REPO)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                    *me, "--worker", "zero3"], check=True, env=env, cwd=REPO)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        print(json.dumps(row))

    def peak(mode: str, after: tuple[str, ...]) -> float:
        return max(r["value"] for r in rows
                   if r["mode"] == mode and r["figure"] == "peak_rss_mb" and r["after"] in after)

    base = {m: peak(m, ("imports",)) for m in ("single", "zero3_2proc")}
    for stage, single_after in (("load", ("load", "load_resident")), ("extend", ("extend",))):
        single, ranks = peak("single", single_after + ("load_resident",)), peak("zero3_2proc", (stage,))
        print(json.dumps(dict(bench="llm_load_memory", figure=f"zero3_rank_peak_over_single_{stage}",
                              value=round(ranks / single, 3), goal="< 0.6", single_peak_rss_mb=single,
                              zero3_rank_peak_rss_mb=ranks, includes=INCLUDES[stage])))
        print(json.dumps(dict(bench="llm_load_memory", figure=f"zero3_rank_growth_over_single_{stage}",
                              value=round((ranks - base["zero3_2proc"]) / (single - base["single"]), 3),
                              note="peak minus the RSS after imports")))


if __name__ == "__main__":
    main()
