"""Published model shapes, built with random weights on any device, and a tokenizer trained offline: what the
benchmarks use to time paper-scale models with no download."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPTJConfig, GPTNeoXConfig, LlamaConfig, PreTrainedTokenizerFast

OFFLINE_RECORDS = Path(__file__).resolve().parents[1] / "sadr" / "data" / "offline" / "counterfact_offline.json"

# vocab_size is the model's; a smaller tokenizer only leaves some embedding rows unused.
SHAPES = {
    "gpt-j": lambda: GPTJConfig(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16,
                                rotary_dim=64, tie_word_embeddings=False),
    "llama3-8b": lambda: LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
    "gpt-neox-20b": lambda: GPTNeoXConfig(vocab_size=50432, hidden_size=6144, num_hidden_layers=44,
                                          num_attention_heads=64, intermediate_size=24576, rotary_pct=0.25,
                                          max_position_embeddings=2048, use_parallel_residual=True,
                                          tie_word_embeddings=False),
    "smollm2-135m": lambda: LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                        max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
}
# tiny=True: the same architecture and depth (the published layer indices stay valid), tiny widths.
TINY_WIDTHS = {
    "gpt-j": dict(n_embd=64, n_head=4, rotary_dim=8, vocab_size=1024),
    "llama3-8b": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
    "gpt-neox-20b": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=1024),
    "smollm2-135m": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
}


# the widths that --narrow divides (the heads too, so each head keeps its published width); absent ones are skipped
NARROWED = ("n_embd", "n_inner", "n_head", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads")


def model_config(arch: str, tiny: bool = False, narrow: int = 1):
    """The shape's config: published, with tiny widths, or with every width and head count divided by `narrow`."""
    config = SHAPES[arch]()
    for key, value in (TINY_WIDTHS[arch] if tiny else {}).items():
        setattr(config, key, value)
    aliased = getattr(config, "attribute_map", {})  # GPT-J's hidden_size is its n_embd: divide it once
    for key in sorted({aliased.get(key, key) for key in NARROWED}) if narrow > 1 else ():
        value = getattr(config, key, None)
        if value is not None:
            if value % narrow:
                raise ValueError(f"{arch}'s {key} ({value}) is not divisible by {narrow}")
            setattr(config, key, value // narrow)
    return config


def random_model(arch: str, tiny: bool, tokenizer, device, dtype: torch.dtype, narrow: int = 1):
    """Random weights of the shape (seeded), initialised on the device; the vocabulary is widened to the tokenizer's
    if that is larger (the tiny widths' 1,024 rows are narrower than a real tokenizer)."""
    config = model_config(arch, tiny, narrow)
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def trained_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the offline records (milliseconds, no download)."""
    texts = [json.dumps(record, ensure_ascii=False) for record in json.loads(OFFLINE_RECORDS.read_text())]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.pad_token = fast.eos_token
    return fast
