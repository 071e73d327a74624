"""Seeded top-k sampling with the KV cache, batched (context templates, the generated corpus, fluency)."""
from __future__ import annotations

import torch

from sadr.models.tokenization import pad_batch, pad_id_of


@torch.no_grad()
def sample_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int, top_k: int = 5,
                 batch_size: int = 32) -> list[str]:
    """One sampled continuation per prompt, returned with its prompt (special tokens stripped).

    Sampling draws from a private RNG state seeded with `seed`, so the global RNG is untouched and the
    same call gives the same texts on the same device.
    """
    device = next(model.parameters()).device
    texts: list[str] = []
    pad_id = pad_id_of(tokenizer)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            batch = pad_batch([tokenizer(prompt)["input_ids"] for prompt in chunk], pad_id, left=True).to(device)
            out = model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
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
