"""Worker processes that are safe to start after torch has run.

A process forked after torch has used its OpenMP thread pool inherits a pool with no threads: the child's first
parallel region (an MKL GEMM, a parallel_for) can wait forever in libgomp's team barrier. Whether it does depends on
the CPU, the BLAS and the thread count, so it passes on one machine and hangs on the next. Every worker process this
project starts is therefore spawned (a fresh interpreter), never forked; `python -m ...` subprocesses are fine too
(fork + exec replaces the image).
"""
from __future__ import annotations

from typing import Any

START_METHOD = "spawn"


def loader_workers(num_workers: int) -> dict[str, Any]:
    """DataLoader keyword arguments for `num_workers` worker processes, spawned (see the module docstring).

    Workers are not persistent: datasets that change per epoch (`set_epoch`) are pickled to fresh workers each epoch.
    The dataset, sampler and collate function must be importable (module-level), as spawn pickles them.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0:
        return {"num_workers": 0}
    return {"num_workers": num_workers, "multiprocessing_context": START_METHOD}
