"""larp_mllm.runtime.deepspeed: one meaning per "auto" key, the same for the tokenizer and the LLM trainers."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from larp_mllm.runtime.deepspeed import ZERO2_DEFAULT, BatchLayout, StageSettings, resolve_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
DS = REPO / "configs" / "deepspeed"


def test_built_in_default_is_the_shipped_zero2_json():
    assert json.loads((DS / "zero2.json").read_text()) == ZERO2_DEFAULT
    for name in ("zero0.json", "zero2.json", "zero3.json"):  # precision comes from each stage's arguments
        assert not {"bf16", "bfloat16", "fp16", "torch_autocast"} & set(json.loads((DS / name).read_text())), name


def hf_trainer_fill(config: dict, **args) -> dict:
    """What the HF Trainer makes of `config` for TrainingArguments `args` (transformers' own filling code)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    values = dict(world_size=1, per_device_train_batch_size=8, gradient_accumulation_steps=1, max_grad_norm=1.0,
                  learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
                  save_on_each_node=False, fp16=False, fp16_full_eval=False, bf16=False, bf16_full_eval=False)
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
    try:
        hf.trainer_config_process(SimpleNamespace(**{**values, **args}))
    finally:
        unset_hf_deepspeed_config()  # a module-global weakref transformers reads (is_deepspeed_zero3_enabled)
    assert not hf.mismatches, hf.mismatches
    return hf.config


@pytest.mark.parametrize("name", ["zero0.json", "zero2.json"])
def test_a_json_means_the_same_in_both_stages(name):
    """Same batch layout, clipping and fp32 weights: the tokenizer trainer's resolved config equals the LLM
    trainer's after the HF Trainer filled its share, key for key."""
    from llm_adapters.launch import stage_settings
    from tokenizer_training.arguments import deepspeed_config, parse_config

    path = str(DS / name)
    tok_cfg = parse_config(["--deepspeed", path, "--global_batch_size", "8", "--micro_batch_size", "2",
                            "--grad_clip", "0.5"])
    tokenizer_stage = deepspeed_config(tok_cfg, BatchLayout.split(8, 2, 2), on_gpu=False)
    llm_stage = hf_trainer_fill(resolve_deepspeed_config(path, stage_settings({"use_cpu": True})), world_size=2,
                                per_device_train_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0.5)
    assert tokenizer_stage == llm_stage
    assert (llm_stage["train_batch_size"], llm_stage["gradient_clipping"]) == (8, 0.5)


def test_precision_keys_have_one_meaning():
    """bf16/fp16 sections = DeepSpeed's low-precision weights; torch_autocast = autocast over fp32 weights. "auto"
    is on exactly when the stage's arguments ask for that kind of precision."""
    auto = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "torch_autocast": {"enabled": "auto", "dtype": "auto"}, "zero_optimization": {"stage": "auto"}}
    weights = resolve_deepspeed_config(auto, StageSettings(on_gpu=True, weights="bf16"))
    assert (weights["bf16"], weights["fp16"], weights["torch_autocast"]) == (
        {"enabled": True}, {"enabled": False}, {"enabled": False})
    autocast = resolve_deepspeed_config(auto, StageSettings(on_gpu=True, autocast="fp16"))
    assert autocast["bf16"] == {"enabled": False}
    assert autocast["torch_autocast"] == {"enabled": True, "dtype": "float16"}
    assert autocast["zero_optimization"]["stage"] == 2  # "auto" = ZeRO-2; absent = DeepSpeed's 0
    assert resolve_deepspeed_config({}, StageSettings(on_gpu=False))["zero_optimization"] == {"stage": 0}
    assert resolve_deepspeed_config({"bfloat16": {"enabled": "auto"}},  # DeepSpeed's other name of the section
                                    StageSettings(on_gpu=False, weights="bf16"))["bf16"] == {"enabled": True}
    same = resolve_deepspeed_config({"torch_autocast": {"enabled": True, "dtype": "torch.bfloat16"}},
                                    StageSettings(on_gpu=False, autocast="bf16"))
    assert same["torch_autocast"]["dtype"] == "torch.bfloat16"  # another spelling of the asked dtype is kept
    with pytest.raises(ValueError, match=r"fp16.enabled=True.*ask for False.*use --bf16"):
        resolve_deepspeed_config({"fp16": {"enabled": True}}, StageSettings(on_gpu=True, precision_hint="use --bf16"))
    with pytest.raises(ValueError, match="GPU"):
        resolve_deepspeed_config({}, StageSettings(on_gpu=False, autocast="fp16"))
    with pytest.raises(ValueError, match="exclude each other"):
        StageSettings(on_gpu=True, weights="bf16", autocast="bf16")


def test_leftover_auto_and_stage_limits_are_errors():
    source = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_comm": "auto"}}
    kept = copy.deepcopy(source)
    with pytest.raises(ValueError, match=r"cannot fill \"auto\" for \['zero_optimization.reduce_bucket_size'\]"):
        resolve_deepspeed_config(source, StageSettings(on_gpu=True))
    later = StageSettings(on_gpu=True, later_fills=frozenset({"zero_optimization.reduce_bucket_size"}))
    resolved = resolve_deepspeed_config(source, later)
    assert resolved["zero_optimization"]["overlap_comm"] is True and source == kept  # the source is not changed
    with pytest.raises(ValueError, match=r"ZeRO stage 2 is not supported here \(supported: 0, 1\)"):
        resolve_deepspeed_config(kept, StageSettings(on_gpu=True, zero_stages=(0, 1), later_fills=later.later_fills))
    assert resolve_deepspeed_config(None, StageSettings(on_gpu=False, batch=BatchLayout.split(4, 1), gradient_clipping=0.0))[
        "train_batch_size"] == 4  # no JSON: the built-in ZeRO-2 default
