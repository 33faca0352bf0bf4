"""The demo's report: figures and pictures a reader can check at a glance (runs/demo/report.md, figures.json).

- reconstruction PSNR / SSIM of validation clips through the trained tokenizer (deterministic codes), and what the
  pixel attribute reader reads from the reconstructions (the ceiling of every video figure below)
- the three directions (directions.py): text -> video for seen and held-out attribute combinations, continuation
  (direction and centroid track), video -> text (attributes named by the answers); plain-text perplexity of
  SmolLM2 before and after training
- training curves (TensorBoard scalars of both stages) and grids of real / reconstructed / generated videos
"""
from __future__ import annotations

from pathlib import Path

import torch

import directions
from larp_mllm import LARPTokenizer
from larp_mllm.data.clips import ClipDataset, collate_clips
from larp_mllm.data.records import csv_records
from larp_mllm.data.synthetic import load_composition_split
from larp_mllm.eval.attributes import attribute_accuracy, parse_class_name, read_batch
from larp_mllm.runtime.files import atomic_write_json, atomic_write_text


def _clips(csv: Path, tok: LARPTokenizer, first_chunk_only: bool = False) -> tuple[torch.Tensor, list]:
    """Non-overlapping clips of a CSV at the tokenizer's size -> videos (M, 3, T, H, W) and their ClassSpecs."""
    _, t, h, _ = tok.video_shape
    records = csv_records(csv)
    ds = ClipDataset(records, num_frames=t, size=h, mode="chunks")
    batch = collate_clips([ds[i] for i in range(len(ds))])
    keep = (batch.chunk == 0) if first_chunk_only else torch.ones_like(batch.chunk, dtype=torch.bool)
    specs = [parse_class_name(records[int(i)].class_name) for i in batch.index[keep]]
    return batch.video[keep], specs


def _curves(out: Path, run_dirs: dict[str, Path]) -> Path | None:
    """Plot every scalar whose tag mentions 'loss' from the TensorBoard logs of each stage into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: list[tuple[str, str, list[int], list[float]]] = []
    for stage, run_dir in run_dirs.items():
        for events in sorted(run_dir.rglob("events.out.tfevents.*")):
            acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                if "loss" in tag.lower():
                    ev = acc.Scalars(tag)
                    series.append((stage, tag, [e.step for e in ev], [e.value for e in ev]))
            break
    if not series:
        return None
    stages = sorted({s for s, *_ in series})
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for s, tag, steps, values in series:
            if s == stage:
                ax.plot(steps, values, label=tag)
        ax.set_title(f"{stage} training")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pct(acc: dict) -> str:
    return (f"{acc['all_three']:.0%} (colour {acc['color']:.0%}, shape {acc['shape']:.0%}, "
            f"direction {acc['direction']:.0%}; {acc['items']})")


def write_report(out: Path, paths, val_csv: Path, heldout_csv: Path, timings: dict[str, float],  # noqa: ANN001
                 samples: int = 4, cfg_scale: float = 1.5) -> Path:
    """Compute every figure (directions.py) and write report.md, figures.json, grid.png / grid.gif, curves.png."""
    from larp_mllm.data.video_write import write_video, write_video_grid
    from larp_mllm.eval.metrics import psnr, ssim
    from llm_adapters.loading import load_video_llm
    from llm_adapters.tasks import load_text_rows

    tok = LARPTokenizer.from_pretrained(paths.tokenizer).eval()
    val, val_specs = _clips(val_csv, tok)
    with torch.no_grad():
        recon = tok.decode_codes(tok.tokenize(val)).clamp(0, 1)
    val_psnr, val_ssim = float(psnr(recon, val).mean()), float(ssim(recon, val).mean())
    recon_read = directions._accuracy(attribute_accuracy(read_batch(recon), val_specs))

    seen, held_out = load_composition_split(paths.data / "train")
    llm = load_video_llm(paths.llm)
    first, first_specs = _clips(val_csv, tok, first_chunk_only=True)
    unseen, unseen_specs = _clips(heldout_csv, tok, first_chunk_only=True)
    t2v = directions.text_to_video(llm, tok, seen, held_out, 1, samples, cfg_scale)
    cont = directions.continuation(llm, tok, first, first_specs)
    caption_seen, answers_seen = directions.captions(llm, tok, first, first_specs)
    caption_held, answers_held = directions.captions(llm, tok, unseen, unseen_specs)
    texts = [row.text for row in load_text_rows(paths.data / "text" / "eval.jsonl")]
    ppl = directions.perplexities(llm, texts)

    rows, labels = [], []
    for i in range(3):  # continuation: condition (what the model saw), predicted, real
        rows += [cont.conditions[i], cont.videos[i], first[i]]
        labels += [f"condition ({first_specs[i].name})", "continued", "real"]
    cut = len(seen)
    for j in range(0, min(len(held_out) * samples, 6 * samples), samples):  # one video per held-out caption  # videos of held-out captions
        rows.append(t2v.videos[cut + j])
        labels.append(f"held-out: {t2v.captions[cut + j].split(' over')[0]}")
    grid_png = write_video_grid(rows, out / "grid.png", labels=labels)
    grid_gif = write_video(torch.stack(rows), out / "grid.gif", fps=4)
    curves = _curves(out, {"tokenizer": out / "tokenizer", "llm": out / "llm"})

    figures = {"reconstruction_psnr_db": val_psnr, "reconstruction_ssim": val_ssim,
               "reconstruction_attributes": recon_read,
               **directions.summary(t2v, cont, caption_seen, caption_held, ppl),
               "num_seen_combinations": len(seen), "held_out_combinations": [s.name for s in held_out],
               "stage_seconds": timings}
    atomic_write_json(out / "figures.json", figures, indent=2)
    examples = [f"| {s.name} | {a} |" for s, a in list(zip(unseen_specs, answers_held))[:4]]
    lines = [
        "# larp-mllm demo report", "",
        f"Synthetic set: {len(seen)} (colour, shape, direction) combinations seen in training, {len(held_out)} held "
        f"out ({', '.join(s.name for s in held_out)}); clips {tuple(tok.video_shape)} (C, T, H, W); a tiny LARP "
        f"tokenizer ({tok.num_tokens} tokens, {tok.codebook_size} codes) and SmolLM2-135M-Instruct with one LoRA + "
        "codebook adapter for four tasks, all trained on this machine. Video figures come from a pixel-level "
        "attribute reader that knows the renderer (100% on real clips).", "",
        "| figure | value | goal |", "|---|---|---|",
        f"| reconstruction PSNR / SSIM (validation clips) | {val_psnr:.2f} dB / {val_ssim:.3f} | |",
        f"| attributes read from reconstructions (ceiling of the video figures) | {_pct(recon_read)} | |",
        f"| text -> video, seen combinations, each attribute | {_pct(t2v.seen)} | >= 95% |",
        f"| text -> video, held-out combinations, each attribute | {_pct(t2v.held_out)} | >= 80% |",
        f"| continuation: direction of the predicted clip ({cont.clips} clips) | {cont.direction_accuracy:.0%} | "
        ">= 90% |",
        f"| continuation: centroid error, predicted frames / condition frames | {cont.centroid_error_px:.2f} px / "
        f"{cont.centroid_error_condition_px:.2f} px | |",
        f"| video -> text, seen combinations: attributes named | {_pct(caption_seen)} | >= 90% |",
        f"| video -> text, held-out combinations: attributes named | {_pct(caption_held)} | |",
        f"| plain-text perplexity (Python docs, held out): base / trained | {ppl['base']:.2f} / {ppl['trained']:.2f} "
        f"({ppl['ratio'] - 1:+.1%}) | <= +10% |", "",
        "Stage times: " + ", ".join(f"{n} {s:.0f} s" for n, s in timings.items()), "",
        "## Answers about held-out clips (What is moving, and where to?)", "", "| clip | answer |", "|---|---|",
        *examples, "",
        "## Continued and generated videos (one row per video, frames left to right)", "",
        f"![grid]({grid_png.name})", "", f"Animated: [{grid_gif.name}]({grid_gif.name})", "",
    ]
    if curves is not None:
        lines += ["## Training curves", "", f"![curves]({curves.name})", ""]
    lines += ["The chat session's files (mp4, gif, PNG, codes) are in `generated/`; logs of every stage in `logs/`.",
              ""]
    return atomic_write_text(out / "report.md", "\n".join(lines))
