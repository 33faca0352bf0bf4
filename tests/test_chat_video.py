"""larp-chat with a video in: --video --continue writes continuations (files + codes metadata), --video with a question
prints the text answer, the REPL's /video, questions and /continue, and one clear error per bad input."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from llm_fixtures import tiny_video_bundle
from safetensors import safe_open
from safetensors.torch import load_file

from larp_mllm.data.continuation import condition_clip
from larp_mllm.data.synthetic import class_specs, render_clip
from larp_mllm.data.video_io import read_video
from larp_mllm.data.video_write import write_video
from llm_adapters import chat, videos
from llm_adapters.answers import continue_video_codes, generate_text
from llm_adapters.loading import load_larp, load_video_llm, tokenize_videos
from llm_adapters.tasks import CAPTION_QUESTIONS, question_prompt

pytestmark = pytest.mark.timeout(300)
QUESTION = "what is moving, and where to?"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama VideoLLM bundle and its LARP (larp-tiny: 8 frames of 32x32), a 12-frame 48x48 synthetic clip
    (resized to 32 as training clips are), a 5-frame clip, a 16x16 clip and a text file named .mp4."""
    root = tmp_path_factory.mktemp("chat-video")
    tiny_video_bundle(root)
    spec = class_specs(2)[1]
    clip, _ = render_clip(spec, np.random.default_rng(0), frames=12, size=48)  # (3, 12, 48, 48)
    short, _ = render_clip(spec, np.random.default_rng(1), frames=5, size=48)
    small, _ = render_clip(spec, np.random.default_rng(2), frames=12, size=16)
    not_video = root / "notes.mp4"
    not_video.write_text("this is not a video\n" * 20)
    return {"bundle": root / "bundle", "larp": root / "larp", "clip": write_video(clip, root / "clip.mp4"),
            "short": write_video(short, root / "short.mp4"), "small": write_video(small, root / "small.mp4"),
            "not_video": not_video}


@pytest.fixture(scope="module")
def models(assets) -> tuple:
    llm = load_video_llm(assets["bundle"])
    return llm, load_larp(assets["larp"], llm.vocab, torch.device("cpu"))


def _common(assets) -> list[str]:
    return ["--model", str(assets["bundle"]), "--larp-tokenizer", str(assets["larp"]), "--no-progress"]


def test_read_clip_is_the_training_clip(assets, models):
    _, larp = models
    clip = videos.read_clip(assets["clip"], larp.video_shape)
    assert clip.shape == (3, 8, 32, 32)
    assert torch.equal(clip, read_video(assets["clip"], num_frames=8, size=32))  # ClipDataset's read
    video = videos.load_video_input(larp, assets["clip"])
    assert torch.equal(video.codes, larp.tokenize(clip[None], deterministic=True)[0])


def test_continue_writes_videos_and_codes_with_metadata(assets, models, tmp_path, capsys, monkeypatch):
    tokenized: list[torch.Tensor] = []
    real_tokenize = videos.tokenize_videos

    def spy(larp, clips):
        tokenized.append(clips.clone())
        return real_tokenize(larp, clips)

    monkeypatch.setattr(videos, "tokenize_videos", spy)
    out = tmp_path / "out"
    chat.main([*_common(assets), "--video", str(assets["clip"]), "--continue", "--num-samples", "2", "--seed", "3",
               "--top-k", "64", "--output", str(out / "c.mp4"), "--gif", str(out / "c.gif"),
               "--save-codes", str(out / "c.safetensors")])
    printed = capsys.readouterr().out
    for name in ("c.mp4", "c.gif", "c.safetensors"):
        assert f"wrote {out / name}" in printed
    assert read_video(out / "c.mp4").shape == (3, 8, 32, 64)  # two samples side by side
    with safe_open(str(out / "c.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["task"] == "continuation" and meta["video"] == str(assets["clip"])
    assert meta["condition_frames"] == "5" and json.loads(meta["seeds"]) == [3, 4]
    assert json.loads(meta["settings"])["cfg_scale"] == 1.0  # the default for continuation: no CFG
    saved = load_file(str(out / "c.safetensors"))
    llm, larp = models
    clip = read_video(assets["clip"], num_frames=8, size=32)
    assert len(tokenized) == 2 and torch.equal(tokenized[0], clip[None])  # the clip, then its condition clip
    assert torch.equal(tokenized[1], condition_clip(clip, 5)[None])
    assert torch.equal(tokenized[1][:, :, 5:], clip[:, 4:5].expand(-1, 3, -1, -1)[None])  # frame 5 held
    cond = larp.tokenize(tokenized[1], deterministic=True)  # (1, N)
    assert torch.equal(saved["condition_codes"], cond[0])
    want = continue_video_codes(llm, cond.expand(2, -1), top_k=64, seed=3, progress=False)
    assert torch.equal(saved["codes"], want)


def test_question_prints_the_text_answer(assets, models, capsys):
    llm, larp = models
    codes = tokenize_videos(larp, read_video(assets["clip"], num_frames=8, size=32)[None])[0]
    for question, argv in ((QUESTION, [QUESTION]), (CAPTION_QUESTIONS[0], [])):  # a positional text; none: default
        chat.main([*_common(assets), "--video", str(assets["clip"]), "--max-new-tokens", "12", *argv])
        printed = capsys.readouterr().out
        want = generate_text(llm, [question_prompt(codes, question)], max_new_tokens=12, progress=False)[0]
        assert want and printed == want + "\n"


def test_repl_video_question_and_continue(assets, models, tmp_path):
    llm, larp = models
    out = tmp_path / "repl"
    script = "\n".join([
        "/continue", f"/video {tmp_path / 'nope.mp4'}", f"/video {assets['short']}", f"/video {assets['clip']}",
        "/settings", QUESTION, "/continue now", "/continue", "/video", "/settings", "a dog running", "/quit",
    ]) + "\n"
    stdout = io.StringIO()
    settings = videos.ChatSettings(seed=2, max_new_tokens=10)  # cfg 1.25: used for text, not for /continue
    done = chat.repl(llm, larp, settings, None, out, ["codes"], 8, io.StringIO(script), stdout, progress=False)
    lines = stdout.getvalue().splitlines()
    assert done == 3
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors[0] == "error: /continue needs a video: attach one with /video PATH"
    assert errors[1] == f"error: video file not found: {tmp_path / 'nope.mp4'}"
    assert errors[2].startswith(f"error: {assets['short']}: found 5 frames, the tokenizer needs 8")
    assert errors[3].startswith("error: /continue takes no text") and len(errors) == 4
    assert f"video = {assets['clip']} (8 frames, 32 codes)" in lines and "video = none" in lines
    shown = [json.loads(line) for line in lines if line.startswith("{")]
    assert shown[0]["video"] == str(assets["clip"]) and shown[1]["video"] is None
    codes = videos.load_video_input(larp, assets["clip"]).codes
    answer = generate_text(llm, [question_prompt(codes, QUESTION)], max_new_tokens=10, progress=False)[0]
    assert f"[clip.mp4] {answer}" in lines
    written = sorted(out.glob("*.safetensors"))
    assert [p.name for p in written] == ["000_clip_continued_s2.safetensors", "001_a_dog_running_s3.safetensors"]
    with safe_open(str(written[0]), "pt") as f:
        meta = f.metadata()
    assert meta["task"] == "continuation" and meta["video"] == str(assets["clip"])
    assert json.loads(meta["settings"])["cfg_scale"] == 1.0
    with safe_open(str(written[1]), "pt") as f:
        meta = f.metadata()
    assert meta["task"] == "text_to_video" and "video" not in meta
    assert json.loads(meta["settings"])["cfg_scale"] == 1.25


def _error(argv: list[str], capsys) -> str:
    """The one error line the CLI ends with (SystemExit, no traceback)."""
    with pytest.raises(SystemExit) as exc:
        chat.main(argv)
    code = exc.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("larp-chat: error: ") and "Traceback" not in message
    return message


def test_bad_inputs_give_one_clear_error(assets, tmp_path, capsys):
    common, clip = _common(assets), str(assets["clip"])
    missing = tmp_path / "missing.mp4"
    assert _error([*common, "--video", str(missing), "--continue"], capsys) == \
        f"larp-chat: error: video file not found: {missing}"
    assert "could not be decoded" in _error([*common, "--video", str(assets["not_video"])], capsys)
    assert str(assets["not_video"]) in _error([*common, "--video", str(assets["not_video"])], capsys)
    assert f"{assets['short']}: found 5 frames, the tokenizer needs 8" in \
        _error([*common, "--video", str(assets["short"]), "--continue"], capsys)
    small = _error([*common, "--video", str(assets["small"]), "--continue"], capsys)
    assert f"{assets['small']}: frames are 16x16" in small and "input size 32x32" in small and "upscaled" in small
    assert "--continue needs --video" in _error([*common, "--continue"], capsys)
    assert "--continue takes no prompt text" in _error([*common, "--video", clip, "--continue", "go on"], capsys)
    assert "--continue takes no prompt text" in _error([*common, "--video", clip, "--continue", "--prompt", "x"],
                                                       capsys)
    assert "--continue runs without CFG" in _error([*common, "--video", clip, "--continue", "--cfg-scale", "1.5"],
                                                  capsys)
    for k in ("0", "9"):
        assert f"--condition-frames must be in [1, T] = [1, 8] (the tokenizer's clip length), got {k}" in \
            _error([*common, "--video", clip, "--continue", "--condition-frames", k], capsys)
    assert "answered in text" in _error([*common, "--video", clip, QUESTION, "--output", "x.mp4"], capsys)


def test_library_refuses_cfg_and_bad_condition_frames(models, assets):
    llm, larp = models
    video = videos.load_video_input(larp, assets["clip"])
    with pytest.raises(ValueError, match="without CFG.*must be 1, got 1.25"):
        videos.continue_video(llm, larp, video, videos.ChatSettings())
    with pytest.raises(ValueError, match=r"in \[1, T\] = \[1, 8\].*got 9"):
        videos.continue_video(llm, larp, video, videos.ChatSettings(cfg_scale=1.0), condition_frames=9)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        videos.ChatSettings(max_new_tokens=0)
