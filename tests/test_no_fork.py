"""No code path forks a process after torch has run (a forked child inherits an OpenMP pool with no threads and can
hang in its first GEMM, depending on the CPU): worker processes are spawned, CLIs run as subprocesses."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from larp_mllm.runtime.processes import loader_workers

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("larp_mllm", "tokenizer_training", "llm_adapters", "bench", "tests", "examples")
                 for p in (REPO / folder).rglob("*.py"))


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                yield node


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_fork_start_method_and_no_forking_data_loader(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):  # no "fork" start method anywhere
        named = [k.value for k in call.keywords if k.arg in ("start_method", "multiprocessing_context", "method")]
        if getattr(call.func, "attr", getattr(call.func, "id", "")) in ("get_context", "set_start_method"):
            named += call.args[:1]
        assert not any(isinstance(v, ast.Constant) and v.value == "fork" for v in named), \
            f"{path.name}:{call.lineno}: 'fork' start method; spawn instead"
    for call in _calls(tree, "DataLoader"):  # workers only through loader_workers(...) (spawned)
        kwargs = {k.arg for k in call.keywords}
        spawned = any(k.arg is None and isinstance(k.value, ast.Call) and getattr(k.value.func, "id", "") ==
                      "loader_workers" for k in call.keywords)
        assert "num_workers" not in kwargs or spawned, f"{path.name}:{call.lineno}: DataLoader workers must come " \
                                                       f"from **loader_workers(n) (spawned, not forked)"


def test_loader_workers_spawn_and_read_the_same_batches():
    assert loader_workers(0) == {"num_workers": 0}
    assert loader_workers(2)["multiprocessing_context"] == "spawn"
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        loader_workers(-1)
    torch.ones(64, 64) @ torch.ones(64, 64)  # this process has used torch's thread pool: forking now would be unsafe
    data = torch.arange(12.0).view(6, 2)
    serial = list(DataLoader(data, batch_size=2))
    spawned = list(DataLoader(data, batch_size=2, **loader_workers(2)))
    assert all(torch.equal(a, b) for a, b in zip(serial, spawned)) and len(serial) == len(spawned) == 3


def test_llm_trainer_workers_are_spawned():
    from llm_adapters.train import parse_args

    config = ["--config", str(REPO / "configs" / "llm" / "tiny_cpu.yaml"), "--output_dir", "unused"]
    *_, training = parse_args([*config, "--dataloader_num_workers", "2"])
    assert training.dataloader_multiprocessing_context == "spawn"
    with pytest.raises(ValueError, match="forked workers can deadlock"):
        parse_args([*config, "--dataloader_num_workers", "2", "--dataloader_multiprocessing_context", "fork"])
