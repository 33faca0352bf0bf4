"""The whole pipeline on an embedded default, as `make demo` runs it (CPU minutes; a GPU is used when present).

    python examples/quickstart/demo.py --output-dir runs/demo      # what `make demo` runs, from the repository root

Stages (each is a real command a user would run; a stage whose output exists is reused on the next run):
  1. a synthetic video set of coloured shapes moving in a direction: every (colour, shape, direction) combination
     but 6 held out, whose clips are rendered apart (for evaluation only); plain-text rows from Python's docs
                                                                              larp-make-synthetic
  2. a tiny LARP tokenizer trained under DeepSpeed (ZeRO-2)                   python -m tokenizer_training.train
  3. codes of every training clip, and of its first 5 frames (continuation)  python -m tokenizer_training.extract_codes
  4. SmolLM2-135M-Instruct extended with the codes, one LoRA trained under DeepSpeed on four tasks: caption ->
     video, continuation, video -> caption, plain text                      python -m llm_adapters.train
  5. the chat REPL: videos of held-out captions, a held-out clip continued and described   python -m llm_adapters.chat
  6. runs/demo/report.md: each direction's figure (pixel attribute reader), perplexity, curves, grids
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root: the stages read configs/ from there
ATTRIBUTES = ("--colors", "red,green,blue", "--shapes", "circle,square,triangle", "--directions", "right,left,up,down")
HELD_OUT = 6  # of the 36 combinations: never seen in training, asked for by caption
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = 1
TOKENIZER_CONFIG = "configs/tokenizer/larp_tiny_cpu.yaml"


@dataclass(frozen=True)
class DemoPaths:
    """Where each stage writes under the run folder (configs/llm/tiny_cpu.yaml names these for `runs/demo`)."""

    data: Path  # the synthetic set: data/{train,val,heldout}/synthetic.csv, data/text/{train,eval}.jsonl
    tokenizer_run: Path  # the tokenizer's training run (checkpoints, logs)
    tokenizer: Path  # the trained tokenizer folder (config.json + model.safetensors)
    codes: Path  # code shards of the training clips: codes / "train"
    llm: Path  # the LoRA-trained LLM bundle
    generated: Path  # videos written by larp-chat

    @classmethod
    def under(cls, out: Path) -> "DemoPaths":
        return cls(out / "data", out / "tokenizer", out / "tokenizer" / "final", out / "codes", out / "llm",
                   out / "generated")


def banner(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def run(cmd: list[str], log: Path, stdin: str | None = None) -> None:
    """Run one stage's command, streaming its output to the console and a log file; stop the demo on failure."""
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
        if stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.close()
        for line in proc.stdout:
            fh.write(line)
            if "\r" not in line:  # keep tqdm redraws out of the console echo
                sys.stdout.write("  " + line)
        rc = proc.wait()
    if rc:
        raise SystemExit(f"stage failed (exit {rc}); see {log}")


def csv_paths(csv: Path):
    """Absolute video paths of a larp-make-synthetic CSV, in order."""
    from larp_mllm.data.records import csv_records

    return (Path(r.path) for r in csv_records(csv))  # resolved against the CSV's folder


def write_text_rows(folder: Path, eval_rows: int = 24, max_chars: int = 700) -> None:
    """Plain-text rows from Python's own documentation (pydoc_data, shipped with every Python): paragraphs of
    200..max_chars characters; every 5th topic is held out for the perplexity figure (eval.jsonl)."""
    import pydoc_data.topics

    from larp_mllm.runtime.files import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {"train": [], "eval": []}
    for i, topic in enumerate(sorted(pydoc_data.topics.topics)):
        for para in pydoc_data.topics.topics[topic].split("\n\n"):
            text = " ".join(para.split())
            if 200 <= len(text) <= max_chars:
                rows["eval" if i % 5 == 0 else "train"].append(json.dumps({"text": text}))
    rows["eval"] = rows["eval"][:eval_rows]
    for name, lines in rows.items():
        atomic_write_text(folder / f"{name}.jsonl", "\n".join(lines) + "\n")


def stage_done(marker: Path, what: str) -> bool:
    if marker.exists():
        print(f"(reusing {what}: {marker})", flush=True)
        return True
    return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="runs/demo", help="run folder (reused by a second run)")
    ap.add_argument("--tokenizer-steps", type=int, default=2000)
    ap.add_argument("--llm-steps", type=int, default=120)
    ap.add_argument("--samples-per-class", type=int, default=4, help="videos per held-out caption (chat, report)")
    args = ap.parse_args(argv)

    out = (REPO / args.output_dir).resolve() if not Path(args.output_dir).is_absolute() else Path(args.output_dir)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t_start = time.time()
    timings: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        t0 = time.time()
        fn()
        timings[name] = time.time() - t0

    paths = DemoPaths.under(out)
    data, tok_run, tok_final, codes, llm_run, gen = (paths.data, paths.tokenizer_run, paths.tokenizer, paths.codes,
                                                      paths.llm, paths.generated)

    banner(f"1/6 synthetic video set: 36 combinations, {HELD_OUT} held out; {TRAIN_PER_CLASS} train + {VAL_PER_CLASS} "
           "validation clips per seen combination, clips of the held-out ones apart; plain-text rows")

    def make_data() -> None:
        for split, per_class, seed, extra in (("train", TRAIN_PER_CLASS, 0, ()), ("val", VAL_PER_CLASS, 1, ()),
                                              ("heldout", 2, 2, ("--only-held-out",))):
            if not stage_done(data / split / "synthetic.csv", f"{split} set"):
                run([py, "-m", "larp_mllm.data.make_synthetic", "--output-dir", str(data / split), *ATTRIBUTES,
                     "--hold-out", str(HELD_OUT), *extra, "--per-class", str(per_class), "--seed", str(seed),
                     "--frames", "16", "--size", "64", "--background", "plain", "--object-size", "large"],
                    logs / f"synthetic_{split}.log")
        if not stage_done(data / "text" / "eval.jsonl", "text rows"):
            write_text_rows(data / "text")

    timed("data", make_data)
    train_csv = data / "train" / "synthetic.csv"
    val_csv = data / "val" / "synthetic.csv"
    heldout_csv = data / "heldout" / "synthetic.csv"

    banner("2/6 training a tiny LARP tokenizer under DeepSpeed (ZeRO-2, CPU unless a GPU is present)")

    def train_tokenizer() -> None:
        if stage_done(tok_final / "model.safetensors", "trained tokenizer"):
            return
        run([py, "-m", "tokenizer_training.train", "--config", TOKENIZER_CONFIG,
             "--deepspeed", "configs/deepspeed/zero2.json", "--output-dir", str(tok_run),
             "--train-data", str(train_csv), "--val-data", str(val_csv), "--max-steps", str(args.tokenizer_steps),
             "--resume", "auto"], logs / "tokenizer.log")

    timed("tokenizer", train_tokenizer)

    banner("3/6 extracting the codes of every training clip (8-frame chunks) and of its first 5 frames (conditions)")

    def extract() -> None:
        if stage_done(codes / "train" / "manifest.json", "codes"):
            return
        run([py, "-m", "tokenizer_training.extract_codes", "--larp-tokenizer", str(tok_final), "--csv", str(train_csv),
             "--output-dir", str(codes / "train"), "--mode", "chunks", "--condition-frames", "5",
             "--workers", "0",
             "--batch-size", "32"],
            logs / "extract.log")

    timed("extract", extract)

    banner("4/6 extending SmolLM2-135M-Instruct with the LARP codes; one LoRA for four tasks under DeepSpeed (ZeRO-2)")

    def train_llm() -> None:
        if stage_done(llm_run / "video_vocab.json", "trained LLM bundle"):
            return
        run([py, "-m", "llm_adapters.train", "--config", "configs/llm/tiny_cpu.yaml",
             "--deepspeed", "configs/deepspeed/zero2.json", "--larp-tokenizer", str(tok_final),
             "--code-dir", str(codes / "train"), "--text-data", str(data / "text" / "train.jsonl"),
             "--output-dir", str(llm_run), "--max-steps", str(args.llm_steps)],
            logs / "llm.log")

    timed("llm", train_llm)

    banner("5/6 the chat REPL (stdin): videos of held-out captions, a held-out clip continued and described")
    held_out = json.loads((data / "train" / "held_out.json").read_text())["held_out"]
    first_val = next(csv_paths(val_csv))

    def chat() -> None:
        if stage_done(gen / "done", "chat session"):
            return
        captions = [f"a {c['color']} {c['shape']} moving {c['direction']} over a plain background" for c in held_out]
        script = (f"/samples {args.samples_per_class}\n" + "".join(f"{c}\n" for c in captions[:2])
                  + f"/video {first_val}\n/samples 1\nWhat is moving, and where to?\n/continue\n/quit\n")
        run([py, "-m", "llm_adapters.chat", "--model", str(llm_run), "--larp-tokenizer", str(tok_final),
             "--output-dir", str(gen), "--formats", "mp4,gif,png,codes", "--cfg-scale", "1.5", "--seed", "0"],
            logs / "chat.log", stdin=script)
        (gen / "done").write_text("ok\n")

    timed("chat", chat)

    banner("6/6 writing the report: each direction's figure, perplexity, reconstruction, curves, grids")
    from report import write_report  # beside this script

    t0 = time.time()
    report = write_report(out, paths, val_csv=val_csv, heldout_csv=heldout_csv, timings=timings,
                          samples=args.samples_per_class)  # the seen captions: one video each
    timings["report"] = time.time() - t0
    print(f"\nreport: {report}\ntotal {time.time() - t_start:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})", flush=True)


if __name__ == "__main__":
    main()
