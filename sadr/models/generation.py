"""Seeded top-k sampling: batched with the KV cache (context templates, the generated corpus, fluency), and ROME's own
loop for reference-style context templates."""
from __future__ import annotations

import itertools
import unicodedata

import torch

from sadr.models.kv_cache import new_cache
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


@torch.no_grad()
def sample_to_length_like_rome(model, tokenizer, prompts: list[str], *, total_tokens: int, seed: int,
                               top_k: int = 5) -> list[str]:
    """Continuations as ROME's `generate_fast` samples them, each returned with its prompt.

    Each text grows to `total_tokens` tokens counting its prompt (a BOS token included); top-k sampling from the
    renormalised top-k probabilities; EOS may be drawn, and sampling goes on after it. The decoded text (special
    tokens dropped) is NFKD-normalised and every "\\n\\n" becomes a space. Draws come from a CPU generator seeded
    with `seed`, so the texts do not depend on the global RNG, and on another device only through the logits. Each
    step feeds only the token drawn last, with the others' keys and values cached, as `generate_fast` does.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    for prompt, group in itertools.groupby(prompts):  # rows of one prompt have one length: no padding needed
        ids = torch.tensor([tokenizer(prompt)["input_ids"]] * len(list(group)), device=device)
        fed, cache = ids, new_cache(model)
        while ids.shape[1] < total_tokens:
            probs = model(input_ids=fed, **cache).logits[:, -1].float().softmax(dim=-1)
            top = probs.topk(top_k, dim=-1)
            pick = torch.multinomial((top.values / top.values.sum(-1, keepdim=True)).cpu(), 1, generator=generator)
            fed = top.indices.gather(1, pick.to(device))
            ids = torch.cat([ids, fed], dim=1)
        texts += [unicodedata.normalize("NFKD", text).replace("\n\n", " ")
                  for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return texts
