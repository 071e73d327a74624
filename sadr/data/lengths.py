"""Every prompt a run scores fits in the model's positions (checked once the model is loaded, before any work).

A model with learned position embeddings (GPT-2, GPT-J's config, OPT) fails on a longer one inside torch with an
IndexError; one with rotary positions runs it outside the length it was trained on.
"""
from __future__ import annotations

from sadr.data.records import EditCase
from sadr.errors import InvalidSettingError

SPECIAL_TOKENS = 4  # at most this many tokens a tokenizer adds around a text (BOS, EOS)


def scored_texts(case: EditCase) -> list[tuple[str, str]]:
    """(field, prompt followed by the longest answer it is scored against) for each prompt of the case."""
    request = case.request
    answers = [request.target_new, request.target_true or ""]
    longest = max(answers, key=len)
    texts = [("requested_rewrite.prompt", f"{request.text} {longest}")]
    for field in ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts"):
        texts += [(field, f"{prompt} {longest}") for prompt in getattr(case, field)]
    labeled = {"relation_prompts": case.relation_prompts, "locality_prompts": case.locality_prompts,
               **{f"portability.{name}": prompts for name, prompts in case.portability.items()}}
    texts += [(field, f"{item.prompt} {item.target}") for field, items in labeled.items() for item in items]
    return texts


def check_prompt_lengths(cases: list[EditCase], tokenizer, positions: int | None, prefix_tokens: int) -> None:
    """`prefix_tokens`: the longest context template put before the edit prompt while δ is optimised."""
    if positions is None:
        return
    texts = [(case, field, text, prefix_tokens if field == "requested_rewrite.prompt" else 0)
             for case in cases for field, text in scored_texts(case)]
    # a token covers at least one byte (besides a few special ones), so only texts longer than that bound are tokenized
    texts = [entry for entry in texts if len(entry[2].encode()) + SPECIAL_TOKENS + entry[3] > positions]
    if not texts:
        return
    lengths = [len(ids) for ids in tokenizer([text for _, _, text, _ in texts]).input_ids]
    for (case, field, text, prefix), n_tokens in zip(texts, lengths):
        if n_tokens + prefix > positions:
            raise InvalidSettingError(
                f"case {case.case_id}: a prompt of {field} needs {n_tokens + prefix} tokens with its answer"
                f"{' and a context template' if prefix else ''}, more than the model's {positions} positions "
                f"({text[:60]!r}...); shorten it, or leave the case out (drop the record, or select the others with "
                "dataset.case_ids)")
