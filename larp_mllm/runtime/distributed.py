"""The process environment of a distributed job, for a process that no launcher started.

`deepspeed`, `torchrun` and `torch.distributed.launch` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT for every process they start. A plain ``python -m ...`` (or a console script) has none of them, yet
DeepSpeed's engines (and the HF Trainer with ``--deepspeed``) still join a process group: `ensure_distributed_env`
gives such a process the values of a group of one, on a free local port. Both trainers call it before they create
their process group.
"""
from __future__ import annotations

import os
import socket

__all__ = ["DISTRIBUTED_ENV", "free_port", "ensure_distributed_env"]

DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_distributed_env() -> None:
    """Single-process defaults for the variables a launcher would set.

    Nothing changes when RANK and WORLD_SIZE are already set (a launcher started this process); otherwise each of
    RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1, MASTER_PORT=<a free port> is set unless present.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    values = ("0", "1", "0", "127.0.0.1", str(free_port()))
    for key, value in zip(DISTRIBUTED_ENV, values):
        os.environ.setdefault(key, value)
