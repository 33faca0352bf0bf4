"""larp_mllm.runtime.files: atomic writes under concurrency, build_once, failure cleanup, safe file names.

Concurrent writers are separate interpreters (`subprocess.Popen`), never forked. They load files.py by path, so a
child does not import torch (the package `__init__` does) and starts in a fraction of a second.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import larp_mllm.runtime.files as files
from larp_mllm.runtime.files import (atomic_write, atomic_write_folder, atomic_write_text, build_once,
                                     remove_stale_temporaries, safe_filename, temporary_sibling)

PRELUDE = f"""
import importlib.util, json, os, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("runtime_files", {files.__file__!r})
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
start_at = float(sys.argv[1])
while time.time() < start_at:  # every child starts writing at the same moment
    time.sleep(0.001)
"""
PAYLOAD_LEN = 40_000  # about 120 kB of JSON per write: large enough that a torn write would show


def _start(code: str, *args: object, start_in: float = 1.0) -> list[subprocess.Popen]:
    """Two children running PRELUDE + `code` with `writer` = 0 / 1, released together `start_in` s from now."""
    start_at = time.time() + start_in
    return [subprocess.Popen([sys.executable, "-c", PRELUDE + code, str(start_at), str(w), *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in (0, 1)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(out)
    return outs


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if files.TMP_MARK in p.name)


def _check_payload(text: str) -> int:
    """The writer id of one whole payload; fails on a torn or mixed file."""
    obj = json.loads(text)
    w = obj["writer"]
    assert w in (0, 1) and obj["data"] == [w] * PAYLOAD_LEN and obj["end"] is True
    return w


def test_concurrent_writers_always_leave_one_whole_file(tmp_path):
    target = tmp_path / "shared.json"
    procs = _start("""
writer, target = int(sys.argv[2]), Path(sys.argv[3])
n, stop = 0, time.time() + 1.0
while time.time() < stop or n < 5:
    files.atomic_write_json(target, {"writer": writer, "seq": n, "data": [writer] * %d, "end": True})
    n += 1
print(n)
""" % PAYLOAD_LEN, target)
    seen, reads = set(), 0
    while any(p.poll() is None for p in procs):  # read while both write
        try:
            text = target.read_text()
        except FileNotFoundError:  # not written yet
            continue
        seen.add(_check_payload(text))
        reads += 1
    counts = [int(out) for out in _finish(procs)]
    assert min(counts) >= 5 and reads > 0
    _check_payload(target.read_text())
    assert _temporaries(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["shared.json"]


def test_build_once_builds_in_one_process(tmp_path):
    target, log = tmp_path / "cache.json", tmp_path / "build.log"
    procs = _start("""
writer, target, log = int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
def build():
    with open(log, "a") as fh:
        fh.write(f"{writer}\\n")
    time.sleep(0.5)  # the other process arrives while this one builds
    files.atomic_write_text(target, json.dumps({"built_by": writer}))
    return writer
result = files.build_once(target, build)
print(json.dumps({"result": result, "read": json.loads(target.read_text())}))
""", target, log)
    outs = [json.loads(out) for out in _finish(procs)]
    lines = log.read_text().splitlines()
    assert len(lines) == 1
    builder = int(lines[0])
    assert [o["read"] for o in outs] == [{"built_by": builder}] * 2
    assert {o["result"] for o in outs} == {builder, None}  # None: the other one only read it
    assert build_once(target, lambda: pytest.fail("already built")) is None


def test_concurrent_folder_writers_leave_one_whole_folder(tmp_path):
    folder = tmp_path / "model"
    procs = _start("""
writer, folder = int(sys.argv[2]), Path(sys.argv[3])
def write(tmp):
    for i in range(5):
        (tmp / f"part{i}.txt").write_text(str(writer))
for _ in range(30):
    files.atomic_write_folder(folder, write)
""", folder)
    _finish(procs)
    parts = {p.name: p.read_text() for p in folder.iterdir()}
    assert sorted(parts) == [f"part{i}.txt" for i in range(5)] and len(set(parts.values())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary or .old folders


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old" and _temporaries(tmp_path) == []

    folder = tmp_path / "ckpt"
    atomic_write_folder(folder, lambda tmp: (tmp / "a.txt").write_text("old"))
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_folder(folder, lambda tmp: broken(tmp / "a.txt"))
    assert [p.name for p in folder.iterdir()] == ["a.txt"] and (folder / "a.txt").read_text() == "old"
    assert _temporaries(tmp_path) == []


def test_failed_folder_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    atomic_write_folder(folder, lambda tmp: (tmp / "a.txt").write_text("old"))
    real_replace = os.replace

    def replace(src, dst):  # the new folder cannot be moved in, after the old one was moved aside
        if Path(dst) == folder and Path(src).suffix != ".old" and not folder.exists():
            raise PermissionError("denied")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(PermissionError):
        atomic_write_folder(folder, lambda tmp: (tmp / "b.txt").write_text("new"))
    monkeypatch.undo()
    assert [p.name for p in folder.iterdir()] == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_write_folder_replaces_and_cleans_up(tmp_path):
    folder = tmp_path / "model"
    atomic_write_folder(folder, lambda tmp: (tmp / "old.bin").write_bytes(b"1"))
    atomic_write_folder(folder, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no .old or temporary folder left


def test_temporary_names_are_unique_and_removable(tmp_path):
    target = tmp_path / "clip.mp4"
    names = {temporary_sibling(target) for _ in range(100)}
    assert len(names) == 100 and all(p.suffix == ".mp4" and p.parent == tmp_path for p in names)
    for p in list(names)[:3]:
        p.write_bytes(b"partial")
    other = temporary_sibling(tmp_path / "manifest.json")
    other.write_text("partial")
    assert len(remove_stale_temporaries(tmp_path, "clip*")) == 3
    assert _temporaries(tmp_path) == [other.name]


@pytest.mark.parametrize("name", ["../evil", "../../etc/passwd", "a/b", "/abs/path", "nul\x00byte", "", ".", "..",
                                  "...", ".hidden", "a\\..\\b", "x" * 300])
def test_safe_filename_stays_inside_the_folder(tmp_path, name):
    safe = safe_filename(name)
    assert safe and safe not in {".", ".."} and "/" not in safe and "\x00" not in safe
    resolved = (tmp_path / safe).resolve()
    assert resolved.parent == tmp_path.resolve()
    assert len(safe) <= 80


def test_safe_filename_keeps_class_names_and_separates_inputs():
    for name in ["ApplyEyeMakeup", "Hammering", "YoYo", "class_3", "Playing Cello"]:
        assert safe_filename(name) == name
    inputs = ["a/b", "a_b", "a\x00b", "a..b", "a_b-", "", ".", "..", "../a", "x" * 100, "x" * 101]
    assert len({safe_filename(s) for s in inputs}) == len(inputs)
