"""`larp-continuation-bench`: K600 frame-prediction (continuation) FVD, the LARP reference protocol.

    larp-continuation-bench --model runs/llm/final --larp-tokenizer runs/tok/final --csv data/metadata/k600_val.csv \
        --i3d i3d_torchscript.pt --output-dir runs/k600_fp              # one process: draw, predict, merge, report
    for i in $(seq 0 7); do CUDA_VISIBLE_DEVICES=$i larp-continuation-bench ... --shard $i/8 & done; wait
    larp-continuation-bench --merge --output-dir runs/k600_fp --larp-tokenizer runs/tok/final
    python -m llm_adapters.continuation_benchmark ...                                  # same CLI

Reference (hywang66/LARP, README ``sample.py --fp --num_cond_frames 5 --num_samples 50000 --dataset_csv k600_val.csv
--dataset_split_seed 42``; ``predict_frames``, sample.py l.228-386): ``VideoDataset(frame_num=16, crop_size=128,
frame_rate='native', use_all_frames=True)`` (l.283-297) sorts the CSV paths as strings (datasets/video_dataset.py
l.163), cuts each video into ``len(decord.VideoReader) // 16`` non-overlapping chunks of consecutive native-rate
frames (video_dataset.py l.265-271; none from a shorter video), resized (short side 128, antialiased) + center-cropped
to 128 (video_dataset.py l.47-48, l.172-174: split 'train', no flip); ``random.Random(42).sample(range(num_chunks),
50000)`` (sample.py l.300) raises if more are asked for than exist.
Condition ``repeat_to_m_frames(x[:, :, :5], 16)`` (l.334) tokenized in fp32 (l.266, l.335) + SEP; no CFG (asserted,
l.251), temperature 1, top-k/p off; the whole clip is generated, decoded in fp32, clamped. Predicted and real chunk
both get ``torchvision Resize((64, 64))`` (l.321-328, l.351-352), then the StyleGAN-V I3D; FVD of the summed stats
(l.484). Published: FVD 5.1 (LARP-L-Long + its 632M AR-FP).

Here the same clips (``real_set.draw_chunks(allow_fewer=False)``: too many are refused, as ``random.sample`` does),
frames (``video_io.resize_center_crop``), condition (``condition_clip``), ``continue_video_codes`` (all N codes, no
CFG, clip j seeded --seed + j) and resize (``i3d_ready(..., 64)`` = ``F.interpolate(mode="bilinear", antialias=True,
align_corners=False)``, what torchvision >= 0.17 ``Resize`` does to tensors; older versions did not antialias them
and the reference pins none). Deviations: (1) deterministic VQ for the condition codes, as the reference trains
(cfgs/larp_ar_fp.yaml ``eval_deterministic``, trainers/larp_ar_fp_trainer.py l.66-68); its sample.py never calls
``set_vq_eval_deterministic`` and samples them (SVQ, tau 0.03), a slip. (2) An unreadable video crashes the
reference's indexing (video_dataset.py l.266); here it has no chunks and is counted, and a clip unreadable later
is left out of both sets and counted (fewer clips than planned). (3) Frame counts: decord's if installed, else PyAV's.

Shard i/n takes the slice ``shard_range`` of the plan and rewrites ``shard_<i>_of_<n>.progress.safetensors`` after
each batch (one atomic file: codes and plan positions, real and predicted I3D sums, read faults, seconds); a rerun
continues after the last finished batch. Every shard draws the plan and writes the same plan.json; one whose draw
differs refuses. The merge (automatic with one shard) writes report.json and grid.png (condition/predicted/real).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from larp_mllm.data.clips import Clip, ClipBatch, Skipped, collate_clips
from larp_mllm.data.continuation import DEFAULT_CONDITION_FRAMES, condition_clip
from larp_mllm.data.faults import DEFAULT_MAX_BAD_FRACTION, DataFaults, min_items_to_judge
from larp_mllm.data.records import VideoRecord, add_dataset_args, dataset_source, records_from_args
from larp_mllm.eval.fvd import FeatureStats, fvd, fvd_note, i3d_features, i3d_ready, load_i3d
from larp_mllm.eval.real_set import detector_id, draw_chunks
from larp_mllm.runtime.files import atomic_write, atomic_write_json

from .answers import continue_video_codes
from .benchmark import (FAST_MODES, PLAN_FILE, REPORT_FILE, add_draw_args, add_model_args, add_run_args,
                        check_run_args, check_run_key, shard_count, shard_range, shard_stem)
from .generate import SamplingConfig
from .loading import decode_videos, load_larp, load_video_llm, resolve_device_dtype
from .videos import add_sampling_args, sampling_from_args
from .vocab import VideoVocab

logger = logging.getLogger("larp.continuation_benchmark")
FVD_SIZE = 64  # the reference resizes predicted and real clips to 64x64 before I3D
PROGRESS_SUFFIX, GRID_FILE = ".progress.safetensors", "grid.png"
_RUN_FIELDS = ("settings", "model", "codebook_hash", "num_video_tokens", "clip_shape", "feature_net")


@dataclass(frozen=True)
class ContinuationSettings(SamplingConfig):
    """What decides the predicted set (a resumed or merged run must match it exactly); never CFG."""

    cfg_scale: float = 1.0
    num_samples: int = 50_000
    seed: int = 0  # clip j samples with seed + j
    real_seed: int = 42  # the chunk draw
    cond_frames: int = DEFAULT_CONDITION_FRAMES
    fvd_size: int = FVD_SIZE

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cfg_scale != 1.0:
            raise ValueError(f"frame prediction runs without classifier-free guidance (the reference asserts "
                             f"cfg_scale == 1), got --cfg-scale {self.cfg_scale:g}")
        if min(self.num_samples, self.cond_frames, self.fvd_size) < 1:
            raise ValueError(f"num_samples, cond_frames and fvd_size must be >= 1, got {self.num_samples}, "
                             f"{self.cond_frames}, {self.fvd_size}")


@dataclass
class ContinuationPlan:
    """The drawn clips: clip j continues chunk ``samples[j] = (video path, chunk index)``; written as plan.json."""

    key: str  # hash of the settings, the model identity, the clip shape, the feature net and the samples
    samples: list[tuple[str, int]]
    settings: ContinuationSettings
    model: str
    codebook_hash: str
    num_video_tokens: int
    clip_shape: tuple[int, int, int, int]  # (3, T, H, W): the tokenizer's input
    feature_net: str  # larp_mllm.eval.real_set.detector_id of --i3d
    dataset: str
    num_chunks: int  # the chunks the draw picked from
    videos_left_out: dict[str, int]  # videos without a chunk (unreadable, shorter than a chunk) by kind

    def save(self, out_dir: Path) -> None:
        atomic_write_json(out_dir / PLAN_FILE, dataclasses.asdict(self), indent=None)  # ~80 bytes a clip

    @classmethod
    def load(cls, out_dir: Path) -> "ContinuationPlan":
        path = out_dir / PLAN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {PLAN_FILE} in {out_dir}: run the shards first")
        raw = json.loads(path.read_text())
        raw.update(settings=ContinuationSettings(**raw["settings"]), samples=[tuple(s) for s in raw["samples"]],
                   clip_shape=tuple(raw["clip_shape"]))
        return cls(**raw)


def make_plan(records: Sequence[VideoRecord], clip_shape: tuple[int, int, int, int], settings: ContinuationSettings,
              model: str, vocab: VideoVocab, feature_net: str, dataset: str, cache_dir: str | Path,
              max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> tuple[ContinuationPlan, Dataset]:
    """The plan and a dataset whose item j is plan clip j (``Clip`` or ``Skipped``); DataFaultError when more than
    `max_bad_fraction` of the videos have no chunk."""
    _, frames, size, _ = clip_shape
    faults = DataFaults(max_bad_fraction, name="videos", option="--max-bad-fraction", log=logger)
    ds, chosen = draw_chunks(records, frames, size, settings.num_samples, settings.real_seed, cache_dir, faults,
                             allow_fewer=False)  # more clips than chunks: ValueError, as the reference
    samples = [(str(records[v].path), c) for v, c in chosen]
    ident = json.dumps([dataclasses.asdict(settings), model, vocab.codebook_hash, vocab.num_video_tokens,
                        list(clip_shape), feature_net, samples])
    kinds = [f.kind for f in ds.index_faults()]
    plan = ContinuationPlan(hashlib.sha256(ident.encode()).hexdigest()[:16], samples, settings, model,
                            vocab.codebook_hash, vocab.num_video_tokens, tuple(clip_shape), feature_net, dataset,
                            len(ds), {k: kinds.count(k) for k in sorted(set(kinds))})
    position = {entry: k for k, entry in enumerate(ds.chunk_index.entries)}  # (record, chunk) -> dataset item
    return plan, Subset(ds, [position[c] for c in chosen])


def claim_output_dir(out_dir: Path, plan: ContinuationPlan) -> None:
    """Write plan.json, or check that the one there is this plan; ValueError naming what differs."""
    if (out_dir / PLAN_FILE).is_file():
        old = ContinuationPlan.load(out_dir)
        if old.key != plan.key and all(getattr(old, f) == getattr(plan, f) for f in _RUN_FIELDS):
            raise ValueError(f"the videos changed since {out_dir / PLAN_FILE} was drawn (same settings, other clips: "
                             f"{len(set(old.samples) ^ set(plan.samples))} differ); restore them or use a new "
                             "--output-dir")
    check_run_key(out_dir, plan.key)
    plan.save(out_dir)


# ---- one shard ----------------------------------------------------------------------------------------------
@dataclass
class ShardProgress:
    """A shard's work so far: `done` plan clips handled (predicted or skipped); the predicted clips' plan positions
    (k,) and codes (k, N); I3D statistics of their real and predicted clips (k each); read faults by kind."""

    done: int
    positions: torch.Tensor
    codes: torch.Tensor
    real: FeatureStats
    fake: FeatureStats
    faults: dict[str, int]
    examples: list[str]  # the first few "path (kind: reason)"
    seconds: float

    def add(self, positions: list[int], codes: torch.Tensor, skipped: list[Skipped], seconds: float) -> None:
        self.positions = torch.cat([self.positions, torch.tensor(positions, dtype=torch.long)])
        self.codes = torch.cat([self.codes, codes.long()])
        for f in skipped:
            self.faults[f.kind] = self.faults.get(f.kind, 0) + 1
            self.examples = (self.examples + [f"{f.path} ({f.kind}: {f.reason})"])[:5]
        self.done += len(positions) + len(skipped)
        self.seconds += seconds

    def merge(self, other: "ShardProgress") -> "ShardProgress":
        faults = {k: self.faults.get(k, 0) + other.faults.get(k, 0) for k in {**self.faults, **other.faults}}
        return ShardProgress(self.done + other.done, torch.cat([self.positions, other.positions]),
                             torch.cat([self.codes, other.codes]), self.real.merge(other.real),
                             self.fake.merge(other.fake), faults, (self.examples + other.examples)[:5],
                             self.seconds + other.seconds)

    def save(self, path: Path, key: str) -> None:
        """One atomic file: a reader sees the state after a whole batch, never half of one."""
        from safetensors.torch import save_file

        tensors = {"positions": self.positions, "codes": self.codes.to(torch.int32).contiguous(),
                   **{f"{name}_{part}": getattr(stats, part).contiguous() for name, stats in
                      (("real", self.real), ("fake", self.fake)) for part in ("sum_x", "sum_xxt")}}
        meta = {"format": "larp-continuation-progress-v1", "key": key, "detector": self.fake.detector,
                "done": str(self.done), "seconds": f"{self.seconds:.3f}",
                "faults": json.dumps(self.faults), "examples": json.dumps(self.examples)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: Path, key: str) -> "ShardProgress":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta, t = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != "larp-continuation-progress-v1" or meta.get("key") != key:
            raise ValueError(f"{path} belongs to a run with other settings (key {meta.get('key')} vs {key}); use a "
                             "new --output-dir")
        k = len(t["positions"])
        real, fake = (FeatureStats(400, meta["detector"], k, t[f"{n}_sum_x"], t[f"{n}_sum_xxt"])
                      for n in ("real", "fake"))
        return cls(int(meta["done"]), t["positions"].long(), t["codes"].long(), real, fake, json.loads(meta["faults"]),
                   json.loads(meta["examples"]), float(meta["seconds"]))


def progress_path(out_dir: Path, index: int, count: int) -> Path:
    return shard_stem(out_dir, index, count).with_suffix(PROGRESS_SUFFIX)


class _Positioned(Dataset):
    """Items [start, stop) of `clips` with their plan positions: (j, Clip | Skipped)."""

    def __init__(self, clips: Dataset, start: int, stop: int):
        self.clips, self.start, self.stop = clips, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[int, Clip | Skipped]:
        return self.start + i, self.clips[self.start + i]


def _collate(items: list[tuple[int, Clip | Skipped]]) -> tuple[list[int], ClipBatch]:
    """(plan positions of the good clips, ClipBatch); the positions are ascending, as the clips are stacked."""
    return [j for j, item in items if isinstance(item, Clip)], collate_clips([item for _, item in items])


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """[lo, hi) index ranges of the stretches of consecutive values in ascending `positions`."""
    cuts = [i for i in range(1, len(positions)) if positions[i] != positions[i - 1] + 1]
    return list(zip([0, *cuts], [*cuts, len(positions)])) if positions else []


@torch.no_grad()
def predict_clips(llm: Any, larp: Any, videos: torch.Tensor, positions: list[int], settings: ContinuationSettings,
                  batch_size: int = 32, fast: bool | str = "auto") -> torch.Tensor:
    """Codes (b, N) of whole clips predicted from the condition clips of `videos` (b, 3, T, H, W) in [0, 1] (first
    ``cond_frames`` frames, the last one repeated; deterministic VQ); clip i samples with seed + positions[i]."""
    if not positions or len(positions) != len(videos):
        raise ValueError(f"need one plan position per video, got {len(positions)} for {len(videos)} videos")
    device, s = next(larp.parameters()).device, settings
    cond = larp.tokenize(condition_clip(videos.to(device), s.cond_frames), deterministic=True).cpu()  # (b, N)
    return torch.cat([continue_video_codes(llm, cond[lo:hi], temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                           seed=s.seed + positions[lo], batch_size=batch_size, fast=fast,
                                           progress=False) for lo, hi in _runs(positions)])


def run_shard(llm: Any, larp: Any, i3d: Any, plan: ContinuationPlan, clips: Dataset, out_dir: Path, index: int = 0,
              count: int = 1, batch_size: int = 32, fast: bool | str = "auto", workers: int = 0,
              max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, progress: bool = True) -> ShardProgress:
    """Predict, decode and featurise (real and predicted clips) shard `index` of `count`, resuming a partial run;
    clips that cannot be read are skipped and counted. `clips`: item j = plan clip j (``make_plan``)."""
    from larp_mllm.runtime.processes import loader_workers

    path, todo = progress_path(out_dir, index, count), shard_range(len(plan.samples), index, count)
    state = ShardProgress.load(path, plan.key) if path.is_file() else ShardProgress(
        0, torch.zeros(0, dtype=torch.long), torch.zeros(0, plan.num_video_tokens, dtype=torch.long),
        FeatureStats(400, i3d.detector), FeatureStats(400, i3d.detector), {}, [], 0.0)
    faults = DataFaults(max_bad_fraction, min_items=min_items_to_judge(batch_size, len(todo)),
                        name=f"shard {index}/{count} clips", option="--max-bad-fraction", log=logger)
    loader = DataLoader(_Positioned(clips, todo.start + state.done, todo.stop), batch_size=batch_size,
                        collate_fn=_collate, **loader_workers(workers))  # spawned workers, never forked
    device, size = next(larp.parameters()).device, plan.settings.fvd_size
    with tqdm(total=len(todo), initial=state.done, unit="clip", desc=f"shard {index}/{count}",
              disable=not progress) as bar:
        for positions, batch in loader:
            started = time.time()
            faults.update(batch)
            codes = torch.zeros(0, plan.num_video_tokens, dtype=torch.long)
            if positions:
                codes = predict_clips(llm, larp, batch.video, positions, plan.settings, batch_size, fast)  # (b, N)
                predicted = decode_videos(larp, codes)  # (b, 3, T, H, W) in [0, 1]
                for stats, videos in ((state.real, batch.video.clamp(0, 1)), (state.fake, predicted)):
                    stats.add(i3d_features(i3d, i3d_ready(videos.to(device), size), batch_size=min(16, batch_size)))
            state.add(positions, codes, batch.faults, time.time() - started)
            state.save(path, plan.key)
            bar.update(len(positions) + batch.num_skipped)
    if len(loader.dataset):
        faults.end_epoch()
    if state.done != len(todo):
        raise RuntimeError(f"shard {index}/{count} ended with {state.done} of {len(todo)} clips")
    return state


# ---- merge and report ---------------------------------------------------------------------------------------
def merge_shards(out_dir: Path, plan: ContinuationPlan) -> tuple[ShardProgress, int]:
    """All finished shards of one run summed (clips in plan order), and the shard count."""
    count, merged = shard_count(out_dir, PROGRESS_SUFFIX), None
    for index in range(count):
        path, want = progress_path(out_dir, index, count), len(shard_range(len(plan.samples), index, count))
        if not path.is_file():
            raise FileNotFoundError(f"shard {index}/{count} has not run ({path} missing)")
        state = ShardProgress.load(path, plan.key)
        if state.done != want:
            raise ValueError(f"shard {index}/{count} is unfinished ({state.done} of {want} clips): rerun it")
        merged = state if merged is None else merged.merge(state)
    return merged, count


def write_grid(larp: Any, plan: ContinuationPlan, state: ShardProgress, out_dir: Path, num: int = 8) -> Path | None:
    """grid.png: condition / predicted / real rows (every frame) of the first `num` predicted clips (real clips read
    again; one that cannot be read any more is left out). None when no row could be made."""
    from larp_mllm.data.video_io import read_video
    from larp_mllm.data.video_write import write_video_grid

    _, frames, size, _ = plan.clip_shape
    rows, labels = [], []
    for j, predicted in zip(state.positions[:num].tolist(), decode_videos(larp, state.codes[:num])):
        video, chunk = plan.samples[j]
        try:
            real = read_video(video, frames, size, start=chunk * frames)  # (3, T, size, size)
        except (OSError, ValueError, RuntimeError) as err:
            logger.warning("grid: clip %d (%s) left out: %s", j, video, err)
            continue
        if real.shape[1] == frames:
            rows += [condition_clip(real, plan.settings.cond_frames), predicted, real]
            labels += [f"#{j} condition", f"#{j} predicted", f"#{j} real"]
    return write_video_grid(rows, out_dir / GRID_FILE, frames_per_video=frames, labels=labels) if rows else None


def finish(out_dir: Path, larp: Any | None, grid_samples: int = 8) -> dict:
    """Merge the shards, compute the FVD of predicted vs real clips, write report.json (+ grid.png); the report."""
    plan = ContinuationPlan.load(out_dir)
    state, count = merge_shards(out_dir, plan)
    if state.faults:
        logger.warning("clips left out of the FVD (unreadable): %s, of %d planned", state.faults, len(plan.samples))
    grid = write_grid(larp, plan, state, out_dir, grid_samples) if larp is not None and grid_samples else None
    report = {"benchmark": "k600-frame-prediction-fvd", "fvd": fvd(state.real, state.fake),
              **dataclasses.asdict(plan.settings),  # first: num_samples below is the count made
              "num_samples": state.fake.count, "num_real": state.real.count, "num_planned": len(plan.samples),
              "num_chunks": plan.num_chunks, "detector": state.fake.detector, "fvd_note": fvd_note(state.fake.detector),
              "model": plan.model, "codebook_hash": plan.codebook_hash,
              "dataset": plan.dataset, "clip_shape": list(plan.clip_shape),
              "data_faults": {"videos_left_out": plan.videos_left_out, "clips_skipped": state.faults,
                              "examples": state.examples},
              "num_shards": count, "generation_seconds": round(state.seconds, 2),
              "seconds_per_video": round(state.seconds / max(1, state.fake.count), 4),
              "grid": str(grid) if grid else None, "key": plan.key}
    atomic_write_json(out_dir / REPORT_FILE, report, indent=2)
    return report


# ---- CLI ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="larp-continuation-bench", description="K600 frame-prediction FVD")
    add_model_args(p)
    add_draw_args(p.add_argument_group("clip draw (reference: every 16-frame chunk of k600_val.csv, seed 42)"))
    add_dataset_args(p)
    p.add_argument("--output-dir", default="runs/continuation_bench")
    add_sampling_args(p, num_samples=50_000, seed_help="clip j uses seed + j")
    p.set_defaults(cfg_scale=1.0)  # frame prediction never uses CFG; any other value is refused
    p.add_argument("--cond-frames", type=int, default=DEFAULT_CONDITION_FRAMES, help="condition frames (reference: 5)")
    p.add_argument("--grid-samples", type=int, default=8, help="clips in grid.png (0: none)")
    add_run_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.output_dir)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.merge:
        larp = load_larp(args.larp_tokenizer, VideoVocab.load(out_dir), device) if args.grid_samples else None
        print(json.dumps(finish(out_dir, larp, args.grid_samples)))
        return
    settings = ContinuationSettings(**sampling_from_args(args), num_samples=args.num_samples, seed=args.seed,
                                    real_seed=args.real_seed, cond_frames=args.cond_frames)
    index, count = check_run_args(args)
    records = records_from_args(args)  # a missing CSV fails here, before any model loads
    llm = load_video_llm(args.model, args.base_model, args.gguf_file, device, dtype)
    larp = load_larp(args.larp_tokenizer, llm.vocab, device)
    plan, clips = make_plan(records, larp.video_shape, settings, str(Path(args.model).resolve()), llm.vocab,
                            detector_id(args.i3d), dataset_source(args), args.cache_dir, args.max_bad_fraction)
    claim_output_dir(out_dir, plan)
    llm.vocab.save(out_dir)  # lets --merge check the LARP checkpoint used for the grid
    state = run_shard(llm, larp, load_i3d(args.i3d, device), plan, clips, out_dir, index, count, args.batch_size,
                      FAST_MODES[args.fast], args.workers, args.max_bad_fraction, not args.no_progress)
    print(f"shard {index}/{count}: {state.fake.count} clips predicted, {sum(state.faults.values())} skipped -> "
          f"{progress_path(out_dir, index, count)}")
    if count == 1:
        print(json.dumps(finish(out_dir, larp, args.grid_samples)))
    else:
        print(f"when all {count} shards are done: larp-continuation-bench --merge --output-dir {out_dir} "
              "--larp-tokenizer ...")


if __name__ == "__main__":
    main()
