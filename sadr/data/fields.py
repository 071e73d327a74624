"""Field readers that several formats share: edit templates, subject checks, labeled prompt lists."""

from __future__ import annotations

import re
import unicodedata

from sadr.data.records import LabeledPrompt
from sadr.data.validation import Record


def edit_template(rec: Record, key: str) -> str:
    """A prompt that already holds "{}" exactly once where the subject goes (CounterFact style)."""
    prompt = rec.text(key)
    if prompt.count("{}") != 1:
        rec.fail(key, 'a prompt template containing "{}" exactly once where the subject goes', prompt)
    return prompt


def template_around_subject(rec: Record, key: str, subject: str) -> str:
    """Turn a prompt that spells out the subject into a "{}" template: its first occurrence as a whole word is replaced
    (else its first occurrence), so "Paris" in "The Parisian painter Paris" is the second one."""
    prompt = rec.text(key)
    if subject not in prompt:
        rec.fail(key, f"a prompt containing the subject {subject!r} verbatim{_near_miss_hint(prompt, subject)}",
                 prompt)
    # a word character at the subject's edge must not continue a word of the prompt; other characters are edges
    before = r"(?<!\w)" if re.match(r"\w", subject[0]) else ""
    after = r"(?!\w)" if re.match(r"\w", subject[-1]) else ""
    word = re.search(before + re.escape(subject) + after, prompt)
    start = word.start() if word else prompt.index(subject)
    template = prompt[:start] + "{}" + prompt[start + len(subject):]
    if template.count("{}") != 1:
        rec.fail(key, 'a prompt with no "{}" of its own (the edit template marks the subject with "{}")', prompt)
    return template


def new_target(rec: Record, key: str, target_true: str) -> str:
    """The edit's target, which must differ from the true answer: efficacy compares the two, so an edit towards the
    answer the model already holds would be scored as a failure."""
    target_new = rec.text(key)
    if target_new.strip() == target_true.strip():
        rec.fail(key, f"a new target other than the true answer {target_true!r}", target_new)
    return target_new


def check_mentions_subject(rec: Record, key: str, prompts: list[str], subject: str) -> tuple[str, ...]:
    """Paraphrases of the edit must contain the subject verbatim (the editor locates it there)."""
    for i, prompt in enumerate(prompts):
        if subject not in prompt:
            rec.fail(f"{key}[{i}]", f"a paraphrase containing the subject {subject!r} verbatim"
                     f"{_near_miss_hint(prompt, subject)}", prompt)
    return tuple(prompts)


def _near_miss_hint(prompt: str, subject: str) -> str:
    """Why a subject that looks present is not: an accented letter spelt with other code points, or other capitals."""
    if unicodedata.normalize("NFC", subject) in unicodedata.normalize("NFC", prompt):
        return " (it is there in another Unicode normalization form: write both in NFC)"
    if subject.casefold() in prompt.casefold():
        return " (it is there with other capitals: spell the subject as the prompt does)"
    return ""


def labeled_prompts(rec: Record, key: str) -> tuple[LabeledPrompt, ...]:
    """An optional list of {"prompt", "ground_truth"} objects; ground_truth may be a list of alias lists."""
    return tuple(
        LabeledPrompt(item.text("prompt"), item.alias("ground_truth")) for item in rec.children(key, required=False)
    )
