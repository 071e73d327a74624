"""Text -> token ids for prompts, targets and subject positions, the same way everywhere.

Positions are found from the fast tokenizer's character offsets on the *whole* text, so tokenizers that
add a BOS token or merge a leading space cannot shift them (tokenising prefix, subject and suffix
separately is off by one for such tokenizers). Batches are right-padded: position ids then match the
unpadded sequence for every family.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sadr.errors import InvalidSettingError


class SubjectNotFoundError(InvalidSettingError):
    """The subject string does not occur in the prompt it is supposed to be in."""


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    target_ids: list[int]
    prompt_offsets: list[tuple[int, int]]  # character span of each prompt token


def as_continuation(target: str) -> str:
    """The target as it follows its prompt: after one space, added unless it already starts with one (as the
    reference code does)."""
    return target if target.startswith(" ") else " " + target


def encode_prompt_target(tokenizer, prompt: str, target: str) -> EncodedPair:
    """Token ids of `prompt` and of `target` read as its continuation, after one space (added unless the target
    already starts with one, as the reference code does).

    The pair is tokenised as one text "prompt target" and split at the prompt's last character, so the
    target's ids are those the model sees after the prompt. A prompt that ends with whitespace is split before that
    whitespace when a token crosses the prompt's end (SentencePiece's "▁▁" for a trailing space and the target's
    space): the whitespace then starts the target. If the tokenizer still merges a token across the boundary,
    prompt and " target" are tokenised separately and concatenated instead.
    """
    if not target.strip():
        raise ValueError(f"empty target for prompt {prompt!r}")
    continuation = as_continuation(target)
    ids, offsets = encode_with_offsets(tokenizer, prompt + continuation)
    for boundary in dict.fromkeys((len(prompt), len(prompt.rstrip()))):
        split = next((i for i, (start, end) in enumerate(offsets) if end > start and start >= boundary), None)
        straddles = any(start < boundary < end for start, end in offsets)
        if split is not None and not straddles and split > 0:
            return EncodedPair(ids[:split], ids[split:], offsets[:split])
    prompt_ids, prompt_offsets = encode_with_offsets(tokenizer, prompt)
    target_ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    return EncodedPair(prompt_ids, target_ids, prompt_offsets)


def last_token_of_span(offsets: list[tuple[int, int]], span: tuple[int, int]) -> int:
    """Index of the last token that overlaps the character span."""
    start, end = span
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not hits:
        raise SubjectNotFoundError(f"no token covers characters {start}..{end}")
    return hits[-1]


def fill_subject(template: str, subject: str) -> tuple[str, tuple[int, int]]:
    """Fill the "{}" of `template` with `subject`; return the text and the subject's character span, without the
    whitespace around it (the last token of "Velimir " is the one of "Velimir", not a token of the space)."""
    if template.count("{}") != 1:
        raise ValueError(f"prompt template must contain '{{}}' exactly once, got {template!r}")
    start = template.index("{}") + len(subject) - len(subject.lstrip())
    return template.replace("{}", subject, 1), (start, start + len(subject.strip()))


@dataclass
class PaddedBatch:
    """Right-padded token ids and attention mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device) -> "PaddedBatch":
        return PaddedBatch(self.input_ids.to(device), self.attention_mask.to(device))


def pad_right(sequences: list[list[int]], pad_id: int) -> PaddedBatch:
    return pad_batch(sequences, pad_id, left=False)


def pad_batch(sequences: list[list[int]], pad_id: int, left: bool) -> PaddedBatch:
    """Pad to the longest sequence on the right (scoring, statistics, δ prompts) or the left (`generate`)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return PaddedBatch(ids, mask)


def pad_id_of(tokenizer) -> int:
    """The pad id of every batch this project builds, and of `generate`.

    A tokenizer without a pad token (GGUF tokenizers under some transformers versions, GPT-2, GPT-J, Llama) gets
    one here, its EOS token (else UNK, else token 0), so transformers' own padding agrees with ours. Padded positions
    are masked everywhere, so the choice never changes a result.
    """
    if tokenizer.pad_token_id is None:
        fallback = next((token for token in (tokenizer.eos_token, tokenizer.unk_token) if token is not None), None)
        tokenizer.pad_token = fallback if fallback is not None else tokenizer.convert_ids_to_tokens(0)
    return int(tokenizer.pad_token_id)
