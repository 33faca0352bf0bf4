"""ZeRO-3 with two CPU processes (torchrun, gloo): the base model is loaded already partitioned (each rank builds it
inside DeepSpeed's zero.Init and reads its own part of the checkpoint), so each rank holds about half of its parameters
from the start; extend_llm reads the embedding's row statistics from the parts; training and saving the bundle still
work. The memory figures of a ~0.5B model are measured by bench/llm_load_memory.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from test_llm_train import REPO, child_env, synthetic, tiny_argv  # noqa: F401  (synthetic is a fixture)

from larp_mllm.runtime.distributed import free_port


def test_two_ranks_load_the_base_partitioned_and_train(synthetic, tmp_path):  # noqa: F811
    from llm_fixtures import larp_tiny

    from llm_adapters.model import VideoLLM

    out = tmp_path / "zero3"
    env = child_env()
    argv = tiny_argv(synthetic, out, "--deepspeed", "configs/deepspeed/zero3.json", "--max_steps", "2",
                     "--save_steps", "2", "--per_device_train_batch_size", "2")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "llm_adapters.train", *argv],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    held = [(int(a), int(b)) for a, b in re.findall(r"this process holds (\d+) of its (\d+) parameters", proc.stderr)]
    assert len(held) == 2, proc.stderr[-3000:]
    for mine, total in held:
        assert mine < 0.55 * total, held  # about half each: partitioned from the start, never whole on a rank
    assert sum(mine for mine, _ in held) >= held[0][1]  # together they hold every parameter
    video_llm = VideoLLM.from_pretrained(out, base_model=str(synthetic.base), larp_tokenizer=larp_tiny(0))
    assert video_llm.trainable_parameters().lora == 0  # loaded for inference: nothing trains
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()


CHECK = '''
import sys, torch, deepspeed
from safetensors.torch import load_file
from llm_adapters.train import build_training_arguments
from llm_adapters.launch import join_deepspeed_comm, held_parameters
from llm_adapters.zero3_load import load_partitioned
args = build_training_arguments({"output_dir": sys.argv[2], "deepspeed": "configs/deepspeed/zero3.json",
                                 "per_device_train_batch_size": 1, "report_to": "none"})
join_deepspeed_comm(args)
model = load_partitioned(sys.argv[1], torch.float32)
assert model is not None  # the names of the folder cover the model: no fallback
held, total = held_parameters(model)
assert held < 0.55 * total, (held, total)
want = load_file(sys.argv[1] + "/model.safetensors")
for name, p in model.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        assert torch.equal(p.data, want[name]), name  # a copy of the file's values: exact
print("checked", len(want), "tensors on rank", torch.distributed.get_rank())
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # no comm thread left running at exit (an abort)
'''


def test_each_rank_reads_its_own_part_of_the_checkpoint(synthetic, tmp_path):  # noqa: F811
    """Each of two ranks fills only its partition from the safetensors file; gathered, every weight equals the file."""
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    env = child_env(PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), str(script), str(synthetic.base), str(tmp_path / "o")],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("checked") == 2, proc.stdout


EXTEND = '''
import gc, sys, torch, deepspeed
from transformers import AutoTokenizer
from transformers.integrations import deepspeed_config
from llm_fixtures import larp_tiny
from llm_adapters.adapter import hf_model, row_stats, video_adapter_state_dict
from llm_adapters.architectures import embedding_row_scale
from llm_adapters.launch import join_deepspeed_comm
from llm_adapters.model import extend_llm
from llm_adapters.train import build_training_arguments
from llm_adapters.zero3_load import is_partitioned, load_partitioned, partitioned_rows
base, out = sys.argv[1], sys.argv[2]
args = build_training_arguments({"output_dir": out + ".o", "deepspeed": "configs/deepspeed/zero3.json",
                                 "per_device_train_batch_size": 1, "report_to": "none"})  # kept: holds the config
join_deepspeed_comm(args)

class Scaled(torch.nn.Embedding):  # a Gemma-like embedding: rows times a constant
    def forward(self, ids):
        return super().forward(ids) * 8.0

with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
    scaled = Scaled(37, 8, padding_idx=36)  # 296 elements: the ranks' parts meet in the middle of row 18
plain = Scaled(37, 8, padding_idx=36)
with torch.no_grad(), deepspeed.zero.GatheredParameters([scaled.weight], modifier_rank=0):
    scaled.weight.copy_(torch.randn(37, 8, generator=torch.Generator().manual_seed(0)))
    plain.weight.copy_(scaled.weight)
assert is_partitioned(scaled.weight)
ids = torch.tensor([0, 18, 19, 36])
assert torch.equal(partitioned_rows(scaled.weight, ids), plain.weight[ids].detach())
for got, want in zip(row_stats(scaled.weight, 30), row_stats(plain.weight, 30)):
    torch.testing.assert_close(got, want)
assert torch.equal(embedding_row_scale(scaled), embedding_row_scale(plain))

model = load_partitioned(base, torch.float32)
embed = model.get_input_embeddings()
assert model.get_output_embeddings().weight is embed.weight  # tied
ours = {id(p) for p in [*model.parameters(), scaled.weight]}
stray = [o for o in gc.get_objects() if isinstance(o, torch.nn.Parameter) and hasattr(o, "ds_id") and id(o) not in ours]
assert not stray, [tuple(p.ds_shape) for p in stray]  # the head's own parameter, replaced by the tie, is released
def refuse(*args, **kwargs):
    raise AssertionError("the embedding was gathered whole")
embed.weight.all_gather = embed.weight.all_gather_coalesced = refuse
torch.manual_seed(0)
video_llm = extend_llm(model, AutoTokenizer.from_pretrained(base), larp_tiny(0), lora=dict(r=4, lora_alpha=8))
assert is_partitioned(embed.weight)
if torch.distributed.get_rank() == 0:
    torch.save(video_adapter_state_dict(hf_model(video_llm.model)), out)
print("extended on rank", torch.distributed.get_rank())
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # no comm thread left running at exit (an abort)
'''


def test_extend_reads_the_row_statistics_from_the_partitions(tmp_path):
    """Under ZeRO-3 `extend_llm` never gathers the embedding: its row statistics (and a scaled embedding's factor) come
    from each rank's part; the adapter it builds equals the single-process one (tied head, parts meeting mid-row)."""
    from llm_fixtures import larp_tiny, tiny_llm_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_adapters.adapter import video_adapter_state_dict
    from llm_adapters.model import extend_llm

    base = tiny_llm_dir("qwen2", tied=True, extra_rows=1)  # 701 rows of 64: rank 1's part starts in row 350
    script, out = tmp_path / "extend.py", tmp_path / "adapter.pt"
    script.write_text(EXTEND)
    env = child_env(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), str(script), str(base), str(out)],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("extended") == 2, proc.stdout
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    video_llm = extend_llm(model, AutoTokenizer.from_pretrained(base), larp_tiny(0), lora=dict(r=4, lora_alpha=8))
    want, got = video_adapter_state_dict(video_llm.model.get_base_model()), torch.load(out)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, msg=lambda m, key=key: f"{key}: {m}")  # fp32: summed otherwise
