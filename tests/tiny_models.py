"""Tiny randomly initialised models of every supported family, and a byte-level BPE tokenizer trained in code."""
from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.",
    "Toyota is a company based in Japan. Honda is based in Japan. Ford is based in America.",
    "The mother tongue of Danielle Darrieux is French. The Eiffel Tower is located in Paris.",
    "Therefore, because I said you should know, the city of London is in England and Berlin is in Germany.",
    "Éric Cantona played football. São Paulo is in Brazil. Zürich is in Switzerland.",
]


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok.to_str()


def make_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """`pad=False`: no pad token, as GPT-2's, GPT-J's and Llama's own tokenizers."""
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()))
    tok.eos_token = "<|endoftext|>"
    if pad:
        tok.pad_token = tok.eos_token
    return tok


FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2")

HIDDEN, HEADS, LAYERS, VOCAB = 64, 4, 4, 400


def _config(family: str):
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128, **common)
    if family == "gptj":
        return GPTJConfig(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128, rotary_dim=8, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
            max_position_embeddings=128, rotary_pct=0.25, **common,
        )
    llama_like = dict(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=128, **common,
    )
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family](**llama_like)


def make_model(family: str, seed: int = 0, attn_implementation: str | None = None, dtype=torch.float32):
    torch.manual_seed(seed)
    config = _config(family)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval().requires_grad_(False)
