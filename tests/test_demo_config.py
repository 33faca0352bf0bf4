"""configs/llm/tiny_cpu.yaml runs as its header says: the folders it reads are the ones the demo writes."""
from __future__ import annotations

from pathlib import Path

import importlib.util
import sys

import yaml

REPO = Path(__file__).resolve().parents[1]


def _demo_module():
    """examples/quickstart/demo.py (a script beside the library, not an installed module)."""
    spec = importlib.util.spec_from_file_location("quickstart_demo", REPO / "examples" / "quickstart" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_llm_config_reads_what_the_demo_writes():
    values = yaml.safe_load((REPO / "configs" / "llm" / "tiny_cpu.yaml").read_text())
    demo = _demo_module().DemoPaths.under(Path("runs/demo"))  # `make demo` runs with --output-dir runs/demo
    assert Path(values["larp_tokenizer"]) == demo.tokenizer
    assert Path(values["code_dir"]) == demo.codes / "train"
    assert Path(values["output_dir"]) != demo.llm  # a standalone run never resumes into the demo's finished run
    header = (REPO / "configs" / "llm" / "tiny_cpu.yaml").read_text().split("# ---- model")[0]
    assert "larp-train-llm --config configs/llm/tiny_cpu.yaml" in header and "make demo" in header
