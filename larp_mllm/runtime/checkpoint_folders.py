"""What both trainers' checkpoint folders share: removal that never shows a half-deleted folder under its name, and
the fault-injection hook the kill tests use.

`retire_folder` renames a folder out of its namespace (``.retired-<name>-<pid>-<random>``) before deleting it, so a
kill at any system call leaves either the whole folder under its name or a `.retired-*` leftover that the next start
removes; never a half-deleted folder that still looks like a checkpoint.

Test hook: the environment variable ``LARP_TEST_SIGKILL_AT="<point>@<step>"`` makes a trainer SIGKILL itself at a
named point of the checkpoint of that step (`kill_point`). Points: ``write`` (part of the checkpoint written),
``replace`` (an existing folder of the same step renamed away, the new one not yet complete), ``prune`` (an old
checkpoint renamed away for deletion and half of its files deleted).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
from pathlib import Path

KILL_HOOK_ENV = "LARP_TEST_SIGKILL_AT"
KILL_POINTS = ("write", "replace", "prune")
RETIRED_MARK = ".retired-"  # prefix of folders renamed away for deletion


def kill_point(point: str, step: int) -> None:
    """SIGKILL this process when ``LARP_TEST_SIGKILL_AT`` names this point and step (a test hook; else nothing)."""
    if os.environ.get(KILL_HOOK_ENV) == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def retire_folder(folder: str | os.PathLike, step: int | None = None) -> None:
    """Delete `folder` after renaming it out of its namespace (``.retired-<name>-<pid>-<random>`` beside it).

    `step`: the checkpoint step being written, for the ``prune`` kill point (half of the files deleted, then SIGKILL).
    """
    folder = Path(folder)
    aside = folder.with_name(f"{RETIRED_MARK}{folder.name}-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(folder, aside)
    if step is not None and os.environ.get(KILL_HOOK_ENV) == f"prune@{step}":
        files = sorted(p for p in aside.rglob("*") if p.is_file())
        for p in files[: len(files) // 2]:
            p.unlink()
        kill_point("prune", step)
    shutil.rmtree(aside, ignore_errors=True)


def remove_retired(root: str | os.PathLike) -> list[str]:
    """Delete the `.retired-*` leftovers of killed deletions in `root`; returns their names."""
    root = Path(root)
    found = sorted(p for p in root.iterdir() if p.name.startswith(RETIRED_MARK)) if root.is_dir() else []
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in found]
