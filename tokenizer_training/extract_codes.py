"""Run a LARP tokenizer (deterministic VQ) over a video dataset and write code shards + manifest.json.

    larp-extract-codes --larp-tokenizer runs/larp --csv data/ucf101_train.csv --output-dir runs/codes/ucf_train
    larp-extract-codes --larp-tokenizer runs/larp --ucf101-root data/UCF-101 --ucf101-splits data/ucfTrainTestlist \\
        --split 1 --subset train --output-dir runs/codes/ucf_train --flip --dtype bf16 --batch-size 64
    torchrun --nproc-per-node 4 -m tokenizer_training.extract_codes --larp-tokenizer runs/larp --csv ... \\
        --output-dir ...
    larp-extract-codes <same arguments> --finalize     # only (re)write manifest.json from the finished shards

Datasets (the options every CLI shares, ``larp_mllm.data.records.add_dataset_args``): ``--csv`` (reference format
id,path,action,label), ``--ucf101-root`` (+ ``--ucf101-splits``, the official split files), ``--folder`` (class =
sub-folder) or ``--caption-csv`` (path,caption). ``--mode chunks`` (default) codes every non-overlapping clip of each
video (the chunk index is cached in ``OUTPUT_DIR/chunk_index.json``); ``--mode random`` codes one seeded random
window per video. The clip shape is the tokenizer's (``tok.video_shape``). ``--flip`` also codes the horizontally
flipped clips; ``--condition-frames K`` (5 in the LARP reference's frame-prediction protocol) also codes each clip's
continuation condition: its first K frames with the K-th repeated to the clip length
(``larp_mllm.data.continuation.condition_clip``), unflipped, stored as ``cond_codes``.

Shards: shard ``i`` holds examples ``[i * shard_size, (i + 1) * shard_size)`` of the example list, so the set of
shards does not depend on the number of processes. Process ``RANK`` of ``WORLD_SIZE`` (set by torchrun; no process
group is created) writes the shards ``i % WORLD_SIZE == RANK``. Each shard is written atomically and records a run
key (a hash of the weights, the example list and every setting), so an interrupted run restarted with the same
arguments skips the shards already written and produces the same files as an uninterrupted run. Whichever process
finishes last (sees every shard on disk) writes ``manifest.json``; ``--finalize`` does only that step (see
``larp_mllm.data.codes`` for the file format). Videos that cannot be used are skipped and counted by kind (missing,
unreadable, too_short, wrong_size; ``larp_mllm.data.faults``): in each shard's header, the manifest's
``data_faults`` and the summary line; when more than ``--max-bad-fraction`` of them are bad the run stops with the
counts and a few paths.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from larp_mllm import TOKENIZER_PRESETS, LARPTokenizer
from larp_mllm.data.codes import CodeManifest, CodeShardWriter, ShardData, VideoEntry
from larp_mllm.data.clips import ClipDataset, DataFaults, collate_clips
from larp_mllm.data.continuation import condition_clip
from larp_mllm.data.faults import FAULT_KINDS, min_items_to_judge
from larp_mllm.data.records import add_dataset_args, dataset_source, records_from_args
from larp_mllm.runtime.hub import is_hub_id
from larp_mllm.runtime.processes import loader_workers

logger = logging.getLogger("larp-extract-codes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--larp-tokenizer", help="LARPTokenizer folder (config.json + model.safetensors)")
    model.add_argument("--preset", choices=sorted(TOKENIZER_PRESETS), help="random-init preset (tests, demos)")
    p.add_argument("--preset-seed", type=int, default=0, help="torch seed for --preset weights")
    add_dataset_args(p)
    p.add_argument("--output-dir", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--mode", choices=["chunks", "random"], default="chunks")
    p.add_argument("--seed", type=int, default=0, help="seed of the random windows (--mode random)")
    p.add_argument("--flip", action="store_true", help="also store codes of the horizontally flipped clips")
    p.add_argument("--condition-frames", type=int, default=0, metavar="K",
                   help="also store cond_codes: codes of each clip's first K frames, the K-th repeated to the clip "
                        "length (continuation condition; the reference uses 5); 0 = off")
    p.add_argument("--no-pad-short", action="store_true", help="skip videos shorter than a clip instead of padding")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=2048, help="examples per shard")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (the VQ stays fp32)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--backend", choices=["auto", "av", "decord"], default="auto", help="video decoder")
    p.add_argument("--max-shards", type=int, default=None, help="stop after writing this many shards (time limits)")
    p.add_argument("--finalize", action="store_true", help="only write manifest.json (every shard must exist)")
    p.add_argument("--overwrite", action="store_true", help="replace codes of a different run found in --output-dir")
    args = p.parse_args(argv)
    try:
        dataset_source(args)  # exactly one dataset, --ucf101-root with --ucf101-splits
    except ValueError as err:
        p.error(str(err))
    if args.batch_size < 1 or args.shard_size < 1:
        p.error("--batch-size and --shard-size must be >= 1")
    if args.condition_frames < 0:
        p.error(f"--condition-frames must be >= 0 (0 = off), got {args.condition_frames}")
    return args


def load_tokenizer(args: argparse.Namespace) -> tuple[LARPTokenizer, str]:
    if args.larp_tokenizer:
        name = args.larp_tokenizer if is_hub_id(args.larp_tokenizer) else str(Path(args.larp_tokenizer).resolve())
        return LARPTokenizer.from_pretrained(args.larp_tokenizer), name
    torch.manual_seed(args.preset_seed)
    return LARPTokenizer.from_preset(args.preset), f"preset:{args.preset}:seed{args.preset_seed}"


def weights_hash(tok: LARPTokenizer) -> str:
    """sha256 over every tensor of the state dict (sorted keys): the identity of the encoder + codebook."""
    h = hashlib.sha256()
    for name, tensor in sorted(tok.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def compute_run_key(tok: LARPTokenizer, ds: ClipDataset, args: argparse.Namespace) -> str:
    """Hash of everything that decides the shard contents (not the output folder, device or process count)."""
    examples = ds.chunk_index.entries if ds.chunk_index is not None else list(range(len(ds)))
    payload = {
        "weights": weights_hash(tok), "mode": ds.mode, "num_frames": ds.num_frames, "size": ds.size, "seed": ds.seed,
        "flip": bool(args.flip), "pad_short": ds.pad_short, "shard_size": args.shard_size, "dtype": args.dtype,
        "videos": [str(r.path) for r in ds.records], "labels": [r.label for r in ds.records], "examples": examples,
    }
    if args.condition_frames:  # only when on: the keys of runs without condition codes stay as they were
        payload["condition_frames"] = args.condition_frames
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def make_manifest(tok: LARPTokenizer, ds: ClipDataset, args: argparse.Namespace, run_key: str, source: str,
                  checkpoint: str) -> CodeManifest:
    return CodeManifest(
        run_key=run_key, codebook_hash=tok.codebook_hash(), num_tokens=tok.num_tokens,
        codebook_size=tok.codebook_size, larp_checkpoint=checkpoint, dataset=source, mode=ds.mode,
        num_frames=ds.num_frames, size=ds.size, seed=ds.seed, has_flip=bool(args.flip), shard_size=args.shard_size,
        num_examples=len(ds), num_index_skipped=ds.num_index_skipped, class_names=ds.class_names,
        videos=[VideoEntry(str(r.path), r.label, r.class_name, r.caption) for r in ds.records],
        index_faults={k: sum(f.kind == k for f in ds.index_faults()) for k in FAULT_KINDS},
        condition_frames=args.condition_frames,
    )


def extract_shards(tok: LARPTokenizer, ds: ClipDataset, writer: CodeShardWriter, shards: list[int],
                   args: argparse.Namespace, device: torch.device, rank: int, faults: DataFaults) -> None:
    """Code the examples of ``shards`` and write each shard as soon as its last batch is done; the examples that
    cannot be used are counted in `faults` (DataFaultError when too many are bad) and in each shard's header."""
    plan: list[tuple[int, list[int]]] = []  # (shard, example indices of one batch); batches never cross shards
    for s in shards:
        start, end = s * args.shard_size, min((s + 1) * args.shard_size, len(ds))
        plan += [(s, list(range(b, min(b + args.batch_size, end)))) for b in range(start, end, args.batch_size)]
    loader = DataLoader(ds, batch_sampler=[idx for _, idx in plan], collate_fn=collate_clips,
                        pin_memory=device.type == "cuda", **loader_workers(args.workers))  # spawned, not forked
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    parts: list[ShardData] = []
    shard_faults: dict[str, int] = {}
    bar = tqdm(total=sum(len(idx) for _, idx in plan), desc=f"rank {rank} coding", unit="clip", disable=None)
    for n, ((shard, idx), batch) in enumerate(zip(plan, loader)):
        faults.update(batch)
        for kind, count in batch.fault_counts().items():
            shard_faults[kind] = shard_faults.get(kind, 0) + count
        if batch.video.shape[0] > 0:
            video = batch.video.to(device, non_blocking=True)  # (B, 3, T, H, W)
            with torch.inference_mode(), autocast:
                codes = tok.tokenize(video, deterministic=True).cpu()  # (B, N)
                flip = tok.tokenize(video.flip(-1), deterministic=True).cpu() if args.flip else None
                cond = None
                if args.condition_frames:  # the continuation condition of the same clips, unflipped
                    cond = tok.tokenize(condition_clip(video, args.condition_frames), deterministic=True).cpu()
            parts.append(ShardData(codes, batch.label, batch.index, batch.chunk, flip, cond))
        bar.update(len(idx))
        if n + 1 == len(plan) or plan[n + 1][0] != shard:  # last batch of this shard
            n_tok = tok.num_tokens
            data = ShardData(
                codes=torch.cat([p.codes for p in parts]) if parts else torch.empty(0, n_tok, dtype=torch.long),
                labels=torch.cat([p.labels for p in parts]) if parts else torch.empty(0, dtype=torch.long),
                video_index=torch.cat([p.video_index for p in parts]) if parts else torch.empty(0, dtype=torch.long),
                chunk=torch.cat([p.chunk for p in parts]) if parts else torch.empty(0, dtype=torch.long),
                flip_codes=(torch.cat([p.flip_codes for p in parts]) if parts else torch.empty(0, n_tok))
                if args.flip else None,
                cond_codes=(torch.cat([p.cond_codes for p in parts]) if parts else torch.empty(0, n_tok))
                if args.condition_frames else None,
            )
            start, end = shard * args.shard_size, min((shard + 1) * args.shard_size, len(ds))
            writer.write(shard, start, end, data, sum(shard_faults.values()), shard_faults)
            parts, shard_faults = [], {}
    bar.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(args.device)
    tok, checkpoint = load_tokenizer(args)
    tok = tok.eval().to(device)
    _, num_frames, height, width = tok.video_shape
    if height != width:
        raise ValueError(f"extraction reads square clips; the tokenizer expects {height}x{width}")
    if args.condition_frames > num_frames:
        raise ValueError(f"--condition-frames must be between 0 and the clip length {num_frames}, got "
                         f"{args.condition_frames}")
    out = Path(args.output_dir)
    source, records = dataset_source(args), records_from_args(args)
    ds = ClipDataset(records, num_frames=num_frames, size=height, mode=args.mode, seed=args.seed, flip=False,
                     pad_short=not args.no_pad_short, cache_path=out / "chunk_index.json", backend=args.backend)
    faults = DataFaults(args.max_bad_fraction, min_items=min_items_to_judge(args.batch_size, len(ds)),
                        name=source if world == 1 else f"{source} (rank {rank})", option="--max-bad-fraction",
                        log=logger)
    faults.add_index_faults(ds.index_faults(), len(records))  # videos left out of the chunk index
    if len(ds) == 0:
        raise ValueError(f"no readable clips in {source} ({ds.num_index_skipped} videos unreadable or too short)")
    run_key = compute_run_key(tok, ds, args)
    num_shards = -(-len(ds) // args.shard_size)
    writer = CodeShardWriter(out, run_key, num_shards, tok.codebook_hash(), tok.num_tokens, tok.codebook_size,
                             overwrite=args.overwrite)
    manifest = make_manifest(tok, ds, args, run_key, source, checkpoint)
    if args.finalize:
        print(writer.finalize(manifest))
        return
    todo = [s for s in range(num_shards) if s % world == rank and not writer.is_done(s)]
    done_before = len([s for s in range(num_shards) if s % world == rank]) - len(todo)
    if args.max_shards is not None:
        todo = todo[: args.max_shards]
    logger.info("rank %d/%d: %d examples in %d shards; %d of mine already written, %d to do",
                rank, world, len(ds), num_shards, done_before, len(todo))
    if todo:
        extract_shards(tok, ds, writer, todo, args, device, rank, faults)
    faults.end_epoch()  # judges and logs this process's counts
    missing = writer.missing()
    if missing:
        logger.info("rank %d done (%s); %d shards still missing: the last process to finish (or --finalize) writes "
                    "manifest.json", rank, faults.summary(), len(missing))
        return
    path = writer.finalize(manifest)
    logger.info("wrote %s (%d shards, %d examples); data faults of the whole extraction: %s", path, num_shards,
                len(ds), ", ".join(f"{n} {kind}" for kind, n in manifest.data_faults.items()))


if __name__ == "__main__":
    sys.exit(main())
