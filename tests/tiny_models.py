"""Tiny randomly initialised models of every supported family, and a byte-level BPE tokenizer and a SentencePiece-style
(Llama-2's kind) tokenizer trained in code."""
from __future__ import annotations

import functools
import json

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
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


@functools.lru_cache(maxsize=None)
def _trained_sentencepiece_json() -> str:
    """A BPE model trained on words that start with "▁", its vocabulary laid out as Llama-2's: <unk>, <s>, </s>, the
    256 byte tokens <0x00>..<0xFF> (byte fallback), then the learned pieces, and "▁▁" merged before anything
    else."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    tokens = learned[:3] + [f"<0x{byte:02X}>" for byte in range(256)] + learned[3:] + ["▁▁"]
    spec["model"]["vocab"] = {token: index for index, token in enumerate(tokens)}
    spec["model"]["merges"].insert(0, ["▁", "▁"])  # Llama-2's first piece after the bytes: two spaces are one token
    for added in spec["added_tokens"]:
        added["id"] = spec["model"]["vocab"][added["content"]]
    tok = Tokenizer.from_str(json.dumps(spec))
    # as transformers converts Llama's tokenizer: pieces never cross a "▁", so the text need not be split at spaces
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok.to_str()


def make_sentencepiece_tokenizer(legacy: bool = False) -> PreTrainedTokenizerFast:
    """A tokenizer like Llama-2's, TinyLlama's and Mistral's: "▁" starts a word, only the text's first word gets one
    added, characters outside the vocabulary fall back to <0xNN> byte tokens, BOS <s> first, no pad token.
    `legacy=True`: the "▁" added and spaces replaced by a normalizer instead (Llama-2's own tokenizer.json), so a text
    that starts with a space gets a "▁" token of its own, as SentencePiece gives it."""
    tok = Tokenizer.from_str(_trained_sentencepiece_json())
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2")

HIDDEN, HEADS, LAYERS, VOCAB = 64, 4, 4, 400


def _config(family: str, vocab: int = VOCAB, bos: int = 0, eos: int = 0):
    common = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos)
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


def make_model(family: str, seed: int = 0, attn_implementation: str | None = None, dtype=torch.float32,
               tokenizer: PreTrainedTokenizerFast | None = None):
    """`tokenizer`: the vocabulary, BOS and EOS of that tokenizer (make_sentencepiece_tokenizer's) instead of
    make_tokenizer's."""
    torch.manual_seed(seed)
    config = _config(family) if tokenizer is None else \
        _config(family, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval().requires_grad_(False)


def _llama_cpp_rotary_order(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order of a q or k projection (each head's two rotary halves interleaved), which transformers
    undoes when it reads a GGUF file."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, weight.shape[1]).transpose(1, 2).reshape(weight.shape)


def write_llama_gguf(model, tokenizer: PreTrainedTokenizerFast, path) -> None:
    """`model` (a tiny llama) and its byte-level BPE `tokenizer` as a float32 GGUF file, named as llama.cpp names
    them, so a test can load a GGUF source without downloading one."""
    import json

    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if token == tokenizer.eos_token else gguf.TokenType.NORMAL
                            for token in tokens])
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in spec["merges"]])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    weights = model.state_dict()
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    per_layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    for layer in range(config.num_hidden_layers):
        names.update({f"blk.{layer}.{short}": f"model.layers.{layer}.{long}" for short, long in per_layer.items()})
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for short, long in names.items():
        weight = weights[f"{long}.weight"]
        if short.split(".")[-1] in heads:
            weight = _llama_cpp_rotary_order(weight, heads[short.split(".")[-1]])
        writer.add_tensor(f"{short}.weight", weight.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
