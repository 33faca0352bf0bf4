"""Peak memory and time of one stage-2 LoRA training step: full-vocabulary loss vs video-row loss (issue #17, item 3).

    python bench/llm_train_memory.py                                   # CPU fp32: Qwen2.5-0.5B shape, B 2, 1100 tokens
    python bench/llm_train_memory.py --dtype bf16 --steps 5 --warmup 2 # on a GPU (bf16 weights, DeepSpeed-bf16-like)
    python bench/llm_train_memory.py --config cpu-small --steps 3      # a quick look (~1 min on 2 cores)

Model: a random LLM of the named shape (bench/generate_speed.py CONFIGS; "qwen2.5-0.5b" is Qwen2.5-0.5B's: hidden 896,
24 layers, 14 query / 2 KV heads, MLP 4864, 151936 vocabulary rows (151665 tokenizer tokens), tied embeddings, rope
theta 1e6), extended through the codebook adapter with a LARP-L-Long-shaped video block (K = 8192 codes of dim 16,
N = 1024 tokens per video; VideoVocab embedding_size 160192), LoRA r 64 / alpha 128 / dropout 0.05 on the 7
projections and gradient (activation) checkpointing, as in configs/llm/ucf101_class_cond.yaml. Batch: B sequences of
a random prompt + N codes + <|video_end|> (labels on the codes and the end token, as llm_adapters.data builds them).
Step: forward + llm_adapters.loss.VideoLoss (--losses: "full" = the loss before item 3, "video_rows" = after) + loss
/ targets + backward + AdamW step over the trainable parameters (LoRA and video adapter), in training mode.

Each loss runs in a fresh interpreter (subprocess, started before this driver imports torch). One JSON line per figure:
  step_peak_memory  CPU: peak RSS over all steps (ru_maxrss; the peak is reset through /proc/self/clear_refs after the
                    build when the kernel allows, see `peak_reset`) minus the RSS after the model is built; CUDA:
                    max_memory_allocated over all steps minus memory_allocated after the build.
  loss_saved_bytes  the loss part's activation memory: bytes of the distinct tensor storages autograd saves for
                    backward from the head's forward (a forward pre-hook on the output embedding) to the scalar loss
                    (saved_tensors_hooks; parameters and the head's input hidden excluded), in the last step.
  loss_peak_memory  CUDA only, one extra step: max_memory_allocated during head + loss minus allocated at the head.
  step_time         median seconds of the timed steps after the warm-up (CPU: also step_cpu_time, the process's
                    CPU seconds over all its threads, which other processes on shared cores disturb less).
  loss_part_time    seconds of the head + loss in the last step: forward (head pre-hook to the loss) + backward (from
                    backward() to the gradient of the head's input; CUDA: synchronised at both ends).
then `<figure>_full_over_video_rows` ratios and `step_peak_memory_reduction` (1 - video_rows / full).
On a CPU compare the ratios, not the bare seconds (2 shared cores are noisy).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

LOSSES = ("full", "video_rows")
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "llm" / "ucf101_class_cond.yaml"  # LoRA settings


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc/self/statm)."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (ru_maxrss follows it); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class LossPartMeter:
    """The loss part (head + loss) of one measured step: the bytes autograd saves for it, its time, and on CUDA its
    allocation peak. Active from a forward pre-hook on the head to `stop()` after the loss; its backward ends when
    the gradient of the head's input is formed (a tensor hook)."""

    def __init__(self, model, head):  # noqa: ANN001
        import torch

        self.torch, self.cuda = torch, torch.cuda.is_available()
        self.excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.active, self.context, self.saved = False, None, {}
        self.start_allocated, self.seconds, self.clock = 0, 0.0, 0.0
        head.register_forward_pre_hook(self._start)

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, module, args) -> None:  # noqa: ANN001
        if not self.active or self.context is not None:
            return
        hidden = args[0]
        self.excluded.add(hidden.untyped_storage().data_ptr())
        if hidden.requires_grad:
            hidden.register_hook(self._backward_done)
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            self.start_allocated = self.torch.cuda.memory_allocated()
        self.clock = self.now()
        self.context = self.torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.context.__enter__()

    def _pack(self, tensor):  # noqa: ANN001
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.excluded:
            self.saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def _backward_done(self, grad):  # noqa: ANN001
        self.seconds += self.now() - self.clock

    def stop(self) -> None:
        """Call after the loss: ends the forward part; the backward part is timed from here to the hook."""
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.seconds = self.now() - self.clock
            self.clock = self.now()
        self.active, self.context = False, None


def run_one(args: argparse.Namespace) -> None:
    """One loss in this (fresh) interpreter: build, step, print one JSON line per figure."""
    import torch
    from peft import LoraConfig, get_peft_model

    import yaml
    from generate_speed import RandomVideoLLM
    from llm_adapters.adapter import hf_model, video_adapter_parameters
    from llm_adapters.architectures import resolve_lora_targets
    from llm_adapters.loss import VideoLoss

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = device.type == "cuda"
    llm = RandomVideoLLM(args.config, args.codebook_size, args.num_tokens, "adapter", device, dtype)
    recipe = yaml.safe_load(RECIPE.read_text())
    lora = LoraConfig(r=recipe["lora_r"], lora_alpha=recipe["lora_alpha"], lora_dropout=recipe["lora_dropout"],
                      target_modules=resolve_lora_targets(llm.model, recipe["lora_target_modules"]),
                      task_type="CAUSAL_LM")
    model = get_peft_model(llm.model, lora)
    for p in video_adapter_parameters(hf_model(model)):
        p.requires_grad_(True)
    if not args.no_checkpointing:
        hf_model(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    vocab = llm.vocab
    gen = torch.Generator().manual_seed(0)
    prompt = args.seq_len - vocab.num_video_tokens - 1
    ids = torch.cat([torch.randint(3, vocab.text_vocab_size - 300, (args.batch, prompt), generator=gen),
                     vocab.codes_to_ids(torch.randint(0, vocab.codebook_size, (args.batch, vocab.num_video_tokens),
                                                      generator=gen)),
                     torch.full((args.batch, 1), vocab.video_end_id)], dim=1)  # (B, L)
    labels = ids.clone()
    labels[:, :prompt] = -100
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": labels.to(device)}
    video_loss = VideoLoss(model, vocab, mode=args.loss)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    meter = LossPartMeter(model, video_loss.head)

    def step(measure: bool = False) -> float:
        meter.active = measure
        terms = video_loss(model, batch)[0]  # the outputs (logits) are dropped before backward, as in the Trainer
        meter.stop()
        (terms.loss_sum / terms.num_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(terms.loss_sum.detach() / terms.num_targets)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        peak_reset = reset_peak_rss()
        base = rss_bytes()
    seconds, cpu_seconds = [], []
    total = args.warmup + args.steps
    for i in range(total):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step(measure=i == total - 1)  # the last (timed) step also measures the loss part
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
    if cuda:
        step_peak = torch.cuda.max_memory_allocated() - base
    else:
        import resource

        step_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # KiB on Linux
    saved, loss_seconds = sum(meter.saved.values()), meter.seconds
    label = torch.cuda.get_device_name(device) if cuda else f"cpu x{torch.get_num_threads()}"
    common = {"bench": "llm_train_memory", "device": label, "config": args.config, "loss": args.loss,
              "dtype": args.dtype, "batch": args.batch, "seq_len": args.seq_len, "num_tokens": vocab.num_video_tokens,
              "codebook_size": vocab.codebook_size, "embedding_size": vocab.embedding_size,
              "checkpointing": not args.no_checkpointing, "lora_r": lora.r, "last_loss": round(loss, 4)}
    peak_note = "max_memory_allocated" if cuda else ("peak RSS, reset after build" if peak_reset else
                                                     "peak RSS incl. the build (no clear_refs)")
    figures = [("step_peak_memory", step_peak / 2**20, "MiB", peak_note),
               ("loss_saved_bytes", saved / 2**20, "MiB", "saved for backward, head + loss")]
    if cuda:  # one more step: the loss part's allocation peak (resets the peak counter at the head)
        meter.saved.clear()
        step(measure=True)
        figures.append(("loss_peak_memory", (torch.cuda.max_memory_allocated() - meter.start_allocated) / 2**20, "MiB",
                        "max allocated during head + loss"))
    figures.append(("step_time", sorted(seconds)[len(seconds) // 2], "s", f"median of {len(seconds)}"))
    if not cuda:  # CPU seconds of all this process's threads: less sensitive to other processes on shared cores
        figures.append(("step_cpu_time", sorted(cpu_seconds)[len(cpu_seconds) // 2], "s", "process CPU time, median"))
    figures.append(("loss_part_time", loss_seconds, "s", "head + loss, forward and backward, last timed step"))
    for metric, value, unit, note in figures:
        print(json.dumps({**common, "metric": metric, "value": round(value, 4 if unit == "s" else 1), "unit": unit,
                          "note": note}), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="qwen2.5-0.5b", help="a shape of bench/generate_speed.py CONFIGS")
    p.add_argument("--losses", default=",".join(LOSSES), help=f"comma list of {LOSSES}")
    p.add_argument("--loss", choices=LOSSES, help=argparse.SUPPRESS)  # set for the per-loss child process
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1100, help="prompt + codes + end token")
    p.add_argument("--codebook-size", type=int, default=8192)
    p.add_argument("--num-tokens", type=int, default=1024)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="timed steps after the warm-up (the median is reported)")
    p.add_argument("--no-checkpointing", action="store_true", help="keep every layer's activations")
    args = p.parse_args(argv)
    if args.loss:  # child: torch is imported from here on
        run_one(args)
        return
    if args.seq_len <= args.num_tokens + 1:
        p.error("--seq-len must exceed --num-tokens + 1 (a prompt, the codes and the end token)")
    if args.device == "auto" or args.dtype == "auto":  # probe CUDA in a child: this driver never imports torch
        probe = subprocess.run([sys.executable, "-c", "import torch; print(int(torch.cuda.is_available()))"],
                               capture_output=True, text=True, check=True)
        has_cuda = probe.stdout.strip() == "1"
        args.device = ("cuda" if has_cuda else "cpu") if args.device == "auto" else args.device
        args.dtype = ("bf16" if args.device == "cuda" else "fp32") if args.dtype == "auto" else args.dtype
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k not in ("losses", "loss", "no_checkpointing")] + ["--no-checkpointing"] * args.no_checkpointing
    figures: dict[str, dict[str, float]] = {}
    for loss in args.losses.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), *passed, "--loss", loss]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{loss}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
                record = json.loads(line)
                figures.setdefault(loss, {})[record["metric"]] = record["value"]
    if set(LOSSES) <= set(figures):
        full, rows = figures["full"], figures["video_rows"]
        common = {"bench": "llm_train_memory", "config": args.config, "dtype": args.dtype, "batch": args.batch,
                  "seq_len": args.seq_len, "device": args.device}
        for metric in sorted(set(full) & set(rows)):
            if rows[metric] > 0:
                print(json.dumps({**common, "metric": f"{metric}_full_over_video_rows",
                                  "value": round(full[metric] / rows[metric], 2), "unit": "x"}))
        if full.get("step_peak_memory", 0) > 0:
            print(json.dumps({**common, "metric": "step_peak_memory_reduction",
                              "value": round(1 - rows["step_peak_memory"] / full["step_peak_memory"], 3),
                              "unit": "fraction (goal >= 0.30)"}))


if __name__ == "__main__":
    main()
