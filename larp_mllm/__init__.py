"""larp-mllm core: the LARP video tokenizer and its data/metric tools (torch-only; no deepspeed/peft/decord needed)."""
from .model.tokenizer import TOKENIZER_PRESETS, LARPTokenizer, LARPTokenizerConfig, TokenizerOutput

__all__ = ["LARPTokenizer", "LARPTokenizerConfig", "TOKENIZER_PRESETS", "TokenizerOutput"]
__version__ = "0.1.0"
