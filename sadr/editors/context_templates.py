"""Context templates: short prefixes sampled by the model itself, put in front of the edit prompt.

ROME: the bare prompt plus 10 prefixes of <= 5 tokens and 10 of <= 10 tokens; MEMIT/PMET: plus 5 of
<= 10 tokens; each length class sampled evenly from the seed words. Generated from a fixed seed and
cached on disk under a hash of the model's weights and every generation setting, so edits are
deterministic and a second run does not sample again.
"""
from __future__ import annotations

from pathlib import Path

from sadr.cache import cached
from sadr.errors import InvalidSettingError
from sadr.models.fingerprint import cache_key
from sadr.models.generation import sample_texts

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


def _as_template(text: str) -> str:
    return text.replace("{", " ").replace("}", " ") + ". {}"


def context_templates(model, tokenizer, length_params: list[list[int]], *, seed: int, fingerprint: str,
                      cache_dir: str | Path) -> list[str]:
    """["{}", "<prefix>. {}", ...] for `length_params` = [[max_tokens, count], ...]."""
    key = cache_key(kind="context_templates", model=fingerprint, params=length_params, seed=seed,
                    words=SEED_WORDS, top_k=5, device=str(next(model.parameters()).device.type))
    for _max_tokens, count in length_params:
        if count % len(SEED_WORDS):
            raise InvalidSettingError(f"context template count {count} must be a multiple of {len(SEED_WORDS)} (editor.context_templates)")

    def generate() -> list[str]:
        templates = ["{}"]
        for index, (max_tokens, count) in enumerate(length_params):
            prompts = [w for w in SEED_WORDS for _ in range(count // len(SEED_WORDS))]
            new_tokens = max(1, max_tokens - 1)
            templates += [_as_template(t) for t in sample_texts(model, tokenizer, prompts, max_new_tokens=new_tokens, seed=seed + index)]
        return templates

    return cached(Path(cache_dir) / "context_templates" / f"{key}.json", generate)
