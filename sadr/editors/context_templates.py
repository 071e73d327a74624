"""Context templates: short prefixes sampled by the model itself, put in front of the edit prompt.

ROME: the bare prompt plus 10 prefixes of <= 5 tokens and 10 of <= 10 tokens; MEMIT/PMET: plus 5 of
<= 10 tokens; each length class sampled evenly from the seed words. Generated from a fixed seed and
cached on disk under a hash of the model's weights and every generation setting, so edits are
deterministic and a second run does not sample again. Two styles (`editor.context_template_style`): `reference`
(the default) samples as ROME's code does (docs/fidelity.md, row 7); `fixed`, this project's earlier default, samples
max_tokens - 1 new tokens with EOS forbidden.
"""
from __future__ import annotations

from pathlib import Path

from sadr.cache import JSON, cached
from sadr.errors import InvalidSettingError
from sadr.models.fingerprint import cache_key
from sadr.models.generation import sample_texts, sample_to_length_like_rome

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


def _as_template(text: str) -> str:
    return text.replace("{", " ").replace("}", " ") + ". {}"


def context_templates(model, tokenizer, length_params: list[list[int]], *, seed: int, fingerprint: str,
                      cache_dir: str | Path, style: str) -> list[str]:
    """["{}", "<prefix>. {}", ...] for `length_params` = [[max_tokens, count], ...]."""
    if style not in ("fixed", "reference"):
        raise InvalidSettingError(f"editor.context_template_style must be fixed or reference, got {style!r}")
    key = cache_key(kind="context_templates", model=fingerprint, params=length_params, seed=seed,
                    words=SEED_WORDS, top_k=5, device=str(next(model.parameters()).device.type),
                    **({"style": style} if style != "fixed" else {}))  # keys of `fixed` templates cached before stay
    for _max_tokens, count in length_params:
        if count % len(SEED_WORDS):
            raise InvalidSettingError(f"context template count {count} must be a multiple of {len(SEED_WORDS)} (editor.context_templates)")

    def generate() -> list[str]:
        templates = ["{}"]
        for index, (max_tokens, count) in enumerate(length_params):
            prompts = [w for w in SEED_WORDS for _ in range(count // len(SEED_WORDS))]
            if style == "reference":
                texts = sample_to_length_like_rome(model, tokenizer, prompts, total_tokens=max_tokens, seed=seed + index)
            else:
                texts = sample_texts(model, tokenizer, prompts, max_new_tokens=max(1, max_tokens - 1), seed=seed + index)
            templates += [_as_template(t) for t in texts]
        return templates

    return cached(Path(cache_dir) / "context_templates" / f"{key}{JSON.suffix}", generate)
