"""Every prompt a run scores fits in the model's positions (checked once the model is loaded, before any work).

A model with learned position embeddings (GPT-2, GPT-J's config, OPT) fails on a longer one inside torch with an
IndexError; one with rotary positions runs it outside the length it was trained on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sadr.data.records import EditCase
from sadr.errors import InvalidSettingError

if TYPE_CHECKING:  # the evaluators import this module's field names
    from sadr.evaluation.suite import Evaluator

SPECIAL_TOKENS = 4  # at most this many tokens a tokenizer adds around a text (BOS, EOS)
EDIT_PROMPT, GENERATION_PROMPTS = "requested_rewrite.prompt", "generation_prompts"
ADDED = {EDIT_PROMPT: "a context template", GENERATION_PROMPTS: "the sampled tokens"}


def run_texts(case: EditCase, evaluators: list[Evaluator]) -> list[tuple[str, str]]:
    """(field, text) for each text the run puts through the model whole: the edit prompt followed by the new target
    (δ is optimised on it), then what each evaluator scores or samples from."""
    texts = [(EDIT_PROMPT, f"{case.request.text} {case.request.target_new}")]
    return texts + [entry for evaluator in evaluators for entry in evaluator.inputs(case)]


def check_prompt_lengths(cases: list[EditCase], evaluators: list[Evaluator], tokenizer, positions: int | None,
                         added: dict[str, int]) -> None:
    """`added`: the tokens a field's texts get on top of their own (the longest context template before the edit
    prompt while δ is optimised; the tokens sampled after a generation prompt), by field."""
    if positions is None:
        return
    texts = [(case, field, text) for case in cases for field, text in run_texts(case, evaluators)]
    # a token covers at least one byte (besides a few special ones), so only texts longer than that bound are tokenized
    texts = [entry for entry in texts if len(entry[2].encode()) + SPECIAL_TOKENS + added.get(entry[1], 0) > positions]
    if not texts:
        return
    lengths = [len(ids) for ids in tokenizer([text for _, _, text in texts]).input_ids]
    for (case, field, text), n_tokens in zip(texts, lengths):
        extra = added.get(field, 0)
        if n_tokens + extra > positions:
            raise InvalidSettingError(
                f"case {case.case_id}: a prompt of {field} needs {n_tokens + extra} tokens"
                f"{' with its answer' if field != GENERATION_PROMPTS else ''}{f' and {ADDED[field]}' if extra else ''}, "
                f"more than the model's {positions} positions ({text[:60]!r}...); shorten it, or leave the case out "
                "(drop the record, or select the others with dataset.case_ids)")


def generated_after_prompt(eval_cfg, positions: int | None) -> int:
    """The tokens sampled after a generation prompt, at most: `fixed` adds `eval.generation_length` of them;
    `reference` grows each text to `eval.generation_length` tokens in all, a length that has to fit the model."""
    if not eval_cfg.generation:
        return 0
    if eval_cfg.generation_style.name == "fixed":
        return eval_cfg.generation_length
    if positions is not None and eval_cfg.generation_length > positions:
        raise InvalidSettingError(f"eval.generation_length={eval_cfg.generation_length}: longer than the model's "
                                  f"{positions} positions; set it to at most {positions}")
    return 0
