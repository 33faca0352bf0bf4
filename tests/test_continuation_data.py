"""larp_mllm.data.continuation + the cond_codes of code folders: the condition clip of the frame-prediction protocol,
and shards / manifests that carry (or, written before them, lack) condition codes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from larp_mllm.data.codes import (CodeFolderError, CodeManifest, CodeShardWriter, ShardData, VideoEntry,
                                  load_code_shards)
from larp_mllm.data.continuation import DEFAULT_CONDITION_FRAMES, condition_clip


def _frame_numbered(t: int, batch: int | None = None) -> torch.Tensor:
    """(3, t, 2, 3) or (batch, 3, t, 2, 3) float: every pixel of frame i holds 10 * i + channel (+ 1000 * clip)."""
    frame = torch.arange(t, dtype=torch.float32)[None, :, None, None] * 10  # (1, t, 1, 1)
    video = frame + torch.arange(3.0)[:, None, None, None] + torch.zeros(3, t, 2, 3)  # (3, t, 2, 3)
    if batch is None:
        return video
    return video[None] + 1000 * torch.arange(batch, dtype=torch.float32)[:, None, None, None, None]  # (B, 3, t, 2, 3)


@pytest.mark.parametrize("cond_frames,frame_map", [
    (5, [0, 1, 2, 3, 4, 4, 4, 4]),  # the reference's protocol (on 8 frames here)
    (1, [0] * 8),
    (3, [0, 1, 2, 2, 2, 2, 2, 2]),
    (8, list(range(8))),  # the whole clip: unchanged
])
def test_condition_clip_keeps_the_first_frames_and_repeats_the_last_kept(cond_frames, frame_map):
    video = _frame_numbered(8)
    cond = condition_clip(video, cond_frames)
    assert cond.shape == video.shape and cond.dtype == video.dtype
    assert torch.equal(cond, video[:, frame_map])  # exact: copies, no arithmetic
    batch = _frame_numbered(8, batch=3)
    cond_b = condition_clip(batch, cond_frames)
    assert cond_b.shape == batch.shape and torch.equal(cond_b, batch[:, :, frame_map])
    cond_b[:, :, 0] = -1  # a new tensor: the input is untouched
    assert batch[:, :, 0].min() >= 0


def test_condition_clip_default_and_dtypes():
    assert DEFAULT_CONDITION_FRAMES == 5
    video = (_frame_numbered(16) % 256).to(torch.uint8)
    cond = condition_clip(video)
    assert cond.dtype == torch.uint8 and torch.equal(cond, video[:, [0, 1, 2, 3] + [4] * 12])


@pytest.mark.parametrize("video,cond_frames,match", [
    (torch.zeros(3, 8, 4, 4), 0, r"cond_frames must be an int in \[1, T\] = \[1, 8\], got 0"),
    (torch.zeros(3, 8, 4, 4), 9, r"\[1, 8\], got 9"),
    (torch.zeros(2, 3, 4, 4, 4), 5, r"\[1, 4\], got 5"),
    (torch.zeros(3, 8, 4, 4), 2.0, r"got 2.0"),
    (torch.zeros(3, 8, 4, 4), True, r"got True"),
    (torch.zeros(8, 4, 4), 5, r"expected a video tensor \(3, T, H, W\) or \(B, 3, T, H, W\), got \(8, 4, 4\)"),
    (torch.zeros(8, 3, 4, 4), 5, r"got \(8, 3, 4, 4\)"),  # frames first: channels are not on dim -4
    (torch.zeros(1, 1, 3, 8, 4, 4), 5, r"got \(1, 1, 3, 8, 4, 4\)"),
    ([[0.0]], 5, r"got list"),
])
def test_condition_clip_refuses_bad_input(video, cond_frames, match):
    with pytest.raises(ValueError, match=match):
        condition_clip(video, cond_frames)


# ----------------------------------------------------------------------------------------------------------------------
# cond_codes in code folders (hand-written shards; extraction itself: tests/test_extract_codes.py)
# ----------------------------------------------------------------------------------------------------------------------
def _folder(path: Path, cond: list[torch.Tensor | None], condition_frames: int,
            num_tokens: int = 4) -> tuple[Path, torch.Tensor]:
    """A code folder of len(cond) shards of 2 examples each (codebook of 16) with cond[i] as shard i's cond_codes;
    returns (path, codes (2 * len(cond), num_tokens))."""
    gen = torch.Generator().manual_seed(0)
    writer = CodeShardWriter(path, "run", len(cond), "hash", num_tokens, 16)
    codes = torch.randint(0, 16, (2 * len(cond), num_tokens), generator=gen)
    for s, c in enumerate(cond):
        idx = torch.arange(2 * s, 2 * s + 2)
        writer.write(s, 2 * s, 2 * s + 2, ShardData(codes[idx], torch.zeros(2, dtype=torch.long), idx,
                                                    torch.zeros(2, dtype=torch.long), cond_codes=c), 0)
    manifest = CodeManifest("run", "hash", num_tokens, 16, "larp", "test", "chunks", 8, 32, 0, False, 2, 2 * len(cond),
                            0, ["a"], [VideoEntry(f"v{i}.mp4", 0) for i in range(2 * len(cond))],
                            condition_frames=condition_frames)
    writer.finalize(manifest)
    return path, codes


def test_cond_codes_round_trip(tmp_path):
    cond = torch.randint(0, 16, (4, 4), generator=torch.Generator().manual_seed(1))
    folder, codes = _folder(tmp_path / "cond", [cond[:2], cond[2:]], condition_frames=5)
    loaded = load_code_shards(folder)
    assert loaded.condition_frames == CodeManifest.load(folder).condition_frames == 5
    assert loaded.cond_codes.dtype == torch.int64 and torch.equal(loaded.cond_codes, cond)
    assert torch.equal(loaded.codes, codes)


def test_folders_without_condition_codes_load_as_before(tmp_path):
    folder, codes = _folder(tmp_path / "plain", [None, None], condition_frames=0)
    manifest_path = folder / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    assert raw["condition_frames"] == 0
    del raw["condition_frames"]  # a manifest written before the field existed
    manifest_path.write_text(json.dumps(raw))
    loaded = load_code_shards(folder)
    assert loaded.cond_codes is None and loaded.condition_frames == 0 and torch.equal(loaded.codes, codes)


@pytest.mark.parametrize("cond,condition_frames,match", [
    ([torch.tensor([[0, 1, 2, 16], [0, 0, 0, 0]])], 5, r"cond_codes outside \[0, 16\)"),
    ([torch.tensor([[0, 1, 2, -1], [0, 0, 0, 0]])], 5, r"cond_codes outside \[0, 16\)"),
    ([torch.zeros(1, 4, dtype=torch.long)], 5, r"cond_codes of shape \(1, 4\), not \(2, 4\)"),
    ([None], 5, r"no cond_codes while the manifest's condition_frames is 5"),
    ([torch.zeros(2, 4, dtype=torch.long)], 0, r"cond_codes while the manifest's condition_frames is 0"),
])
def test_damaged_cond_codes_are_refused(tmp_path, cond, condition_frames, match):
    folder, _ = _folder(tmp_path / "bad", cond, condition_frames)
    with pytest.raises(CodeFolderError, match=rf"codes-00000-of-00001.safetensors holds .*{match}.*damaged"):
        load_code_shards(folder)
