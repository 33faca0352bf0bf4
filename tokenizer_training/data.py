"""The tokenizer trainer's data: its clip datasets, the pre-flight check of their files, and data-fault counters
(larp_mllm.data.faults) kept in step on every process.

    train_ds, val_ds = build_datasets(cfg, out_dir, dist.rank, dist.barrier, frames=8, size=32)
    preflight(cfg, train_ds, val_ds)          # before any engine or checkpoint: DataFaultError if too many are missing
    faults = fault_counter("training data", cfg, min_items, device)     # counts summed over all processes
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional

import torch
import torch.distributed

from larp_mllm.data.clips import ClipBatch, ClipDataset, DataFaults
from larp_mllm.data.faults import check_files_exist
from tokenizer_training.arguments import TrainConfig
from tokenizer_training.monitor import all_reduce_sum, logger

OPTION = "max_bad_data_fraction"  # the config field named in data-fault errors


def build_datasets(cfg: TrainConfig, out_dir: Path, rank: int, barrier: Callable[[], None], frames: int,
                   size: int) -> tuple[ClipDataset, Optional[ClipDataset]]:
    """Training and validation ClipDatasets (the synthetic set is generated once, by rank 0, while the others wait
    at `barrier`). Reads only the record lists: no video is opened."""
    from larp_mllm.data.records import csv_records, folder_records

    def records(source: str, seed: int, per_class: int):
        if source == "synthetic":
            from larp_mllm.data.synthetic import make_synthetic_dataset

            d = cfg.data
            folder = out_dir / "data" / (f"synthetic_seed{seed}_{d.synthetic_classes}x{per_class}_{size}px_"
                                         f"{d.synthetic_background}_{d.synthetic_object_size}")
            if rank == 0 and not (folder / "synthetic.csv").is_file():
                make_synthetic_dataset(folder, d.synthetic_classes, per_class, seed=seed, frames=2 * frames, size=size,
                                       background=d.synthetic_background, object_size=d.synthetic_object_size)
            barrier()
            source = str(folder / "synthetic.csv")
        found = []
        for part in source.split(","):  # several CSVs/folders are concatenated (the reference: K600 + UCF101)
            path = Path(part.strip())
            if not path.exists():
                raise FileNotFoundError(f"data not found: {path} (expected a CSV, a folder of videos or 'synthetic')")
            found += folder_records(path) if path.is_dir() else csv_records(path, cfg.data.data_root)
        return found

    d = cfg.data
    train = ClipDataset(records(d.train_data, 0, d.synthetic_per_class), frames, size, "random",
                        seed=cfg.train.seed, flip=d.flip)
    val_source = d.val_data or ("synthetic" if d.train_data == "synthetic" else None)
    val = None if val_source is None else ClipDataset(
        records(val_source, 1, max(1, d.synthetic_per_class // 4)), frames, size, "random", seed=cfg.train.seed + 1)
    return train, val


def preflight(cfg: TrainConfig, train: ClipDataset, val: Optional[ClipDataset]) -> None:
    """Stat every training and validation file (cheap: no video is opened). DataFaultError, with the counts and the
    first few missing paths, when more than ``max_bad_data_fraction`` of either set is missing; run it before any
    engine or checkpoint exists."""
    limit = cfg.train.max_bad_data_fraction
    check_files_exist([r.path for r in train.records], limit, name="training data", option=OPTION, log=logger)
    if val is not None:
        check_files_exist([r.path for r in val.records], limit, name="validation data", option=OPTION, log=logger)


def fault_counter(name: str, cfg: TrainConfig, min_items: int, device: torch.device) -> DataFaults:
    """A DataFaults whose counts are summed over all processes (a small all-reduce per ``update``), so that every
    process judges the same counts and all stop together; every process must call it equally often. A single
    process judges its own counts: no collective and no device round trip on the per-micro-batch path."""

    def reduce(counts: list[int]) -> list[int]:
        return all_reduce_sum(torch.tensor(counts, dtype=torch.long, device=device)).tolist()

    several = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    return DataFaults(cfg.train.max_bad_data_fraction, min_items=min_items, name=name, option=OPTION,
                      reduce=reduce if several else None, log=logger)


def read_val_batches(loader: Iterable[ClipBatch], num_batches: int, faults: DataFaults) -> list[torch.Tensor]:
    """The videos (B, 3, T, H, W) of the first `num_batches` validation batches that hold a readable clip; their
    faults are counted, judged and logged in `faults` (DataFaultError when too many are bad)."""
    videos = []
    for batch, _ in zip(loader, range(num_batches)):
        faults.update(batch)
        if batch.video.shape[0]:
            videos.append(batch.video)
    faults.end_epoch()
    return videos
