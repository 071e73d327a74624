"""Seeded top-k sampling with the KV cache, batched (context templates, the generated corpus, fluency)."""
from __future__ import annotations

import torch


@torch.no_grad()
def sample_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int, top_k: int = 5,
                 batch_size: int = 32) -> list[str]:
    """One sampled continuation per prompt, returned with its prompt (special tokens stripped).

    Sampling draws from a private RNG state seeded with `seed`, so the global RNG is untouched and the
    same call gives the same texts on the same device.
    """
    device = next(model.parameters()).device
    texts: list[str] = []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            side = tokenizer.padding_side
            tokenizer.padding_side = "left"
            try:
                enc = tokenizer(chunk, return_tensors="pt", padding=True, pad_to_multiple_of=None) if pad_id is not None else None
            finally:
                tokenizer.padding_side = side
            if enc is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token; cannot batch prompts")
            out = model.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                do_sample=True,
                top_k=top_k,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
            )
            texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    return texts
