"""ZeRO-3 with two CPU processes (torchrun, gloo): the base model is loaded already partitioned (transformers builds it
inside DeepSpeed's zero.Init), so each rank holds about half of its parameters from the start, and training and saving
the bundle still work. The memory figure of a ~0.5B model is measured by bench/llm_load_memory.py."""
from __future__ import annotations

import re
import subprocess
import sys

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
