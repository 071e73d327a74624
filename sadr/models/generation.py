"""Seeded top-k sampling: batched through `generate` (fixed-style context templates and fluency, the generated
corpus), and ROME's own loop (reference-style context templates and fluency)."""
from __future__ import annotations

import itertools
import unicodedata
from typing import Callable, Iterator

import torch

from sadr.models.kv_cache import new_cache
from sadr.models.tokenization import pad_batch, pad_id_of


def sample_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int, top_k: int = 5,
                 batch_size: int = 32) -> list[str]:
    """One sampled continuation per prompt, returned with its prompt (special tokens stripped).

    Sampling draws from a private RNG state seeded with `seed`, so the global RNG is untouched and the
    same call gives the same texts on the same device.
    """
    return [text for texts, _ in sampled_batches(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed,
                                                 top_k=top_k, batch_size=batch_size) for text in texts]


@torch.no_grad()
def sampled_batches(model, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int, top_k: int = 5,
                    batch_size: int = 32, rng_state: dict | None = None) -> Iterator[tuple[list[str], dict]]:
    """`sample_texts`, a batch at a time: each batch's texts, and the random state after it. Given that state as
    `rng_state` (instead of the one `seed` starts), with the prompts after that batch, it draws what the stream would
    have drawn next: a sampling stopped between two batches resumes to the same texts. Each batch starts from the
    state the previous one left, whatever ran between them."""
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if rng_state is None:
            torch.manual_seed(seed)
            rng_state = _rng_state(device)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            batch = pad_batch([tokenizer(prompt)["input_ids"] for prompt in chunk], pad_id, left=True).to(device)
            _set_rng_state(rng_state, device)
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
            rng_state = _rng_state(device)
            yield tokenizer.batch_decode(out, skip_special_tokens=True), rng_state


def _rng_state(device: torch.device) -> dict:
    """The random state sampling on `device` draws from (the host's, and the GPU's on CUDA)."""
    gpu = {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
    return {"cpu": torch.get_rng_state(), **gpu}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


@torch.no_grad()
def sample_to_length_like_rome(model, tokenizer, prompts: list[str], *, total_tokens: int, seed: int,
                               top_k: int = 5) -> list[str]:
    """Continuations as ROME's `generate_fast` samples them (`grow_like_rome`), all from one random stream: the rows
    of a prompt draw together, prompt after prompt. For context templates, whose rows repeat a few seed words."""
    generator = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    for prompt, group in itertools.groupby(prompts):  # rows of one prompt have one length: no padding needed
        rows = [tokenizer(prompt)["input_ids"]] * len(list(group))
        texts += grow_like_rome(model, tokenizer, rows, total_tokens=total_tokens, top_k=top_k,
                                draw=lambda probs, _rows: torch.multinomial(probs, 1, generator=generator))
    return texts


@torch.no_grad()
def sample_each_to_length_like_rome(model, tokenizer, prompts: list[str], *, total_tokens: int, seeds: list[int],
                                    top_k: int = 5) -> list[str]:
    """Continuations as ROME's `generate_fast` samples them (`grow_like_rome`), in one batch, each text from its own
    random stream (`seeds`, one per prompt): a text is the one its prompt gets alone, up to the rounding of another
    batch shape (which can move a draw in half precision)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: one seed per prompt")
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def draw(probs: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return torch.cat([torch.multinomial(p, 1, generator=generators[row]) for p, row in zip(probs.split(1), rows)])

    rows = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    return grow_like_rome(model, tokenizer, rows, total_tokens=total_tokens, top_k=top_k, draw=draw)


@torch.no_grad()
def grow_like_rome(model, tokenizer, rows: list[list[int]], *, total_tokens: int, top_k: int,
                   draw: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> list[str]:
    """Each row of token ids grown to `total_tokens` tokens counting its prompt (a BOS token included), as ROME's
    `generate_fast` does; a row already that long is returned as it is, and never fed to the model.

    Top-k sampling from the renormalised top-k probabilities; `draw(probs, rows)` picks one of the k columns for each
    growing row from those (growing rows, k) float32 CPU probabilities, `rows` being the growing rows' indices in
    `rows`; it draws from CPU generators, so the texts do not depend on the global RNG, and on another device only
    through the logits. EOS may be drawn, and sampling goes on after it. The decoded text (special tokens dropped) is
    NFKD-normalised and every "\\n\\n" becomes a space. Each step feeds only the token drawn last, with the others'
    keys and values cached, as `generate_fast` does. Rows of different lengths are padded on the left, with positions
    counted from each row's first token; a row that has its length takes no further token (what it is fed after that
    is masked out), so its positions never pass `total_tokens` - 1.
    """
    device = next(model.parameters()).device
    grown = [list(row) for row in rows]
    growing = [index for index, row in enumerate(rows) if len(row) < total_tokens]
    if growing:
        lengths = [len(rows[index]) for index in growing]
        batch = pad_batch([rows[index] for index in growing], pad_id_of(tokenizer), left=True).to(device)
        ids, mask = batch.input_ids, batch.attention_mask
        wanted = torch.tensor([total_tokens - length for length in lengths], device=device)
        padded = min(lengths) < max(lengths)  # equal lengths run as ROME's loop does, without a mask
        fed, cache = ids, new_cache(model)
        for step in range(total_tokens - min(lengths)):
            where = {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1)[:, -fed.shape[1]:].clamp(min=0)} \
                if padded else {}
            probs = model(input_ids=fed, **where, **cache).logits[:, -1].float().softmax(dim=-1)
            top = probs.topk(top_k, dim=-1)
            pick = draw((top.values / top.values.sum(-1, keepdim=True)).cpu(), growing)
            fed = top.indices.gather(1, pick.to(device))
            ids = torch.cat([ids, fed], dim=1)
            mask = torch.cat([mask, (wanted > step).to(mask.dtype)[:, None]], dim=1)
        ids, mask = ids.cpu(), mask.cpu().bool()
        for index, row, row_mask in zip(growing, ids, mask):
            grown[index] = row[row_mask].tolist()
    return [unicodedata.normalize("NFKD", text).replace("\n\n", " ")
            for text in tokenizer.batch_decode(grown, skip_special_tokens=True)]
