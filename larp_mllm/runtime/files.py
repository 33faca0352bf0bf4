"""Atomic writes that several processes may do at once, a cross-process build lock, and safe file names.

Every file or folder the project writes lands through `atomic_write` / `atomic_write_folder`: the content goes to a
temporary name that is unique per process and call (pid + random suffix, in the target's own folder so the final
`os.replace` is a rename on one file system), then replaces the target in one step. A reader therefore sees the old
file or the new one, never a half-written one, and two processes writing the same target at once each rename their
own complete temporary file (the last one wins; both are valid).

`build_once(path, build)` is for shared caches: the first process takes a lock file beside the target and builds it;
the others wait on the lock and then read what it wrote instead of building it again.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

TMP_MARK = ".tmp-"  # every temporary name contains this (leftovers of killed writers can be found and removed)


def temporary_sibling(path: str | os.PathLike, suffix: str | None = None) -> Path:
    """A fresh name beside `path`, unique per process and call: `.name.tmp-<pid>-<random><suffix>`.

    `suffix` defaults to the target's own (writers that pick a format from the extension, e.g. video encoders, need it).
    """
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to write a file at a temporary name, then move it onto `path` in one step.

    Whatever `write` raises propagates after the temporary file is removed; `path` is then untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:  # the bytes reach the disk before the name does
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, payload: Any, indent: int | None = 1,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """`payload` as JSON (`default` converts what json cannot, as in json.dumps), written atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=indent, default=default) + "\n")


def atomic_write_folder(folder: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp_dir)`, then move the finished folder onto `folder`, replacing an old one.

    A folder cannot be renamed onto a non-empty one, so the old folder is first renamed to a unique `.old` name and
    removed once the new one is in place (readers may find no folder for that instant). Writers racing on the same
    folder each move whatever is there aside and retry; the last one wins. If `write` or a rename fails, the
    temporary folder is removed and the old folder put back.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(folder, suffix="")
    tmp.mkdir()
    moved_aside: list[Path] = []
    try:
        write(tmp)
        for _ in range(100):
            try:
                os.replace(tmp, folder)  # succeeds when `folder` is missing or empty
                break
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            aside = temporary_sibling(folder, suffix=".old")
            try:
                os.replace(folder, aside)
                moved_aside.append(aside)
            except FileNotFoundError:  # another writer moved it aside first
                pass
        else:
            raise OSError(f"could not move {tmp} onto {folder}: other writers kept replacing it")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_aside and not folder.exists():
            os.replace(moved_aside.pop(), folder)
        raise
    finally:
        for old in moved_aside:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Delete temporary files/folders left in `folder` by killed writers (`.*.tmp-*` names matching `pattern`).

    Call it only where no other process is writing into `folder` at the same time.
    """
    folder = Path(folder)
    stale = [p for p in folder.glob(f".{pattern}{TMP_MARK}*")] if folder.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


@contextmanager
def file_lock(path: str | os.PathLike, timeout: float = -1) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a lock file; created if missing) across processes and machines that share
    the file system. `timeout` seconds (-1: wait forever); raises `TimeoutError` naming the lock file."""
    from filelock import FileLock, Timeout  # a dependency of torch and huggingface_hub

    lock = FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout as e:
        raise TimeoutError(f"waited {timeout} s for the lock {path}; another process is building the same file "
                           f"(delete the lock file if no such process is running)") from e
    try:
        yield
    finally:
        lock.release()


def build_once(path: str | os.PathLike, build: Callable[[], T], *, done: Callable[[Path], bool] | None = None,
               timeout: float = -1) -> T | None:
    """Build the shared file `path` in one process only: take `path + '.lock'`, and call `build()` unless the file
    is already there (`done(path)`, default: it exists). Returns what `build` returned, or None when another process
    had built it (then read it). `build` must write `path` atomically."""
    path = Path(path)
    done = done or (lambda p: p.exists())
    if done(path):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock"), timeout=timeout):
        if done(path):  # built by the process that held the lock before us
            return None
        return build()


_UNSAFE = re.compile(r"[^A-Za-z0-9._ +=,@-]+")


def safe_filename(name: str, max_len: int = 80) -> str:
    """A file name made from untrusted text (a class name, a caption) that stays one plain name inside its folder.

    Separators, `..`, NUL, control and other unusual characters become `_`, leading dots and spaces are dropped;
    when anything was changed (or the name was cut to `max_len`), a short hash of the original keeps different
    inputs apart (`a/b` and `a_b` do not collide). Never empty, never `.` or `..`.
    """
    cleaned = _UNSAFE.sub("_", name).lstrip(". ").rstrip(" ")
    cleaned = cleaned.replace("..", "_")
    if cleaned == name and cleaned and len(cleaned) <= max_len:
        return cleaned
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned[: max_len - 9] or 'name'}-{digest}"
