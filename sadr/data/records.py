"""The project's internal, format-independent description of one edit case.

Every dataset loader turns its own format into `EditCase`s; editors and metrics only ever see these.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EditRequest:
    """Rewrite (subject, relation) -> target_new; `prompt` holds "{}" exactly once where the subject goes."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    relation_id: str | None = None
    target_new_id: str | None = None  # Wikidata id of target_new; the consistency metric looks up snippets by it

    @property
    def text(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)


@dataclass(frozen=True)
class LabeledPrompt:
    """A prompt and the answer it should be scored against."""

    prompt: str
    target: str


@dataclass(frozen=True)
class ContrastPrompt:
    """A prompt and two continuations, one right and one wrong (PIQA-style: the SADR data's `o-commonsense`)."""

    prompt: str
    right: str
    wrong: str


@dataclass(frozen=True)
class EditCase:
    """One record: the edit request and every prompt set the metrics may use.

    Empty tuples mean the source format has no such prompts; metrics that need them are skipped.
    """

    case_id: int | str
    request: EditRequest
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    relation_prompts: tuple[LabeledPrompt, ...] = ()
    locality_prompts: tuple[LabeledPrompt, ...] = ()
    portability: dict[str, tuple[LabeledPrompt, ...]] = field(default_factory=dict)
    # knowledge unrelated to the edit, asked as which of two continuations is right
    commonsense_prompts: tuple[ContrastPrompt, ...] = ()
    # zsRE: efficacy and generalization are top-1 token accuracy of target_new, never p(new) vs p(true)
    # comparisons, whichever answer the edit targets (target_true is set when it edits towards `alt`)
    token_scored: bool = False
