"""The SADR paper's `merged_counterfact.json`: KnowEdit and CounterFact records, alternating.

Per record a `requested_rewrite` (`prompt` spells out the subject; targets are plain strings;
`relation_id`/`target_new_id` only on the CounterFact half) plus optional `{prompts, targets}`
blocks, possibly empty. Mapping: `p-paraphrase` → `paraphrase_prompts` (targets must be
`target_new`), `l-neighbor` → `neighborhood_prompts` (targets must be `target_true`),
`l-relation` → `relation_prompts`, `p-reasoning` / `p-subject_alias` → `portability["Reasoning"]`
/ `portability["Subject_Aliasing"]` (KnowEdit's names), `generation` (prompts only) →
`generation_prompts`, and `o-commonsense` (`{prompts, right, wrong}`: one PIQA-style question, a
string, with its right and wrong continuation, as the SADR repo scores it; lists of equal length are
read too; a malformed block is logged and left out) → `commonsense_prompts`. `rewrite` repeats the
request and is not used. Case ids are record positions in the file.
"""

from __future__ import annotations

import logging

from sadr.conf.schema import DatasetConfig
from sadr.data.fields import check_mentions_subject, new_target, template_around_subject
from sadr.data.records import ContrastPrompt, EditCase, EditRequest, LabeledPrompt
from sadr.data.validation import InvalidRecordError, Record

log = logging.getLogger(__name__)

_PORTABILITY = {"p-reasoning": "Reasoning", "p-subject_alias": "Subject_Aliasing"}


def parse(rec: Record, cfg: DatasetConfig) -> EditCase:
    rewrite = rec.child("requested_rewrite")
    subject, target_true = rewrite.text("subject"), rewrite.text("target_true")
    request = EditRequest(
        prompt=template_around_subject(rewrite, "prompt", subject),
        subject=subject,
        target_new=new_target(rewrite, "target_new", target_true),
        target_true=target_true,
        relation_id=rewrite.text("relation_id", required=False),
        target_new_id=rewrite.text("target_new_id", required=False),
    )
    portability = {name: block for key, name in _PORTABILITY.items() if (block := _block(rec, key))}
    return EditCase(
        case_id=rec.index,
        request=request,
        paraphrase_prompts=check_mentions_subject(
            rec, "p-paraphrase.prompts", _prompts_towards(rec, "p-paraphrase", request.target_new), subject
        ),
        neighborhood_prompts=tuple(_prompts_towards(rec, "l-neighbor", request.target_true)),
        relation_prompts=_block(rec, "l-relation"),
        portability=portability,
        generation_prompts=tuple(rec.child("generation", required=False).texts("prompts", required=False)),
        commonsense_prompts=_contrasts(rec, "o-commonsense"),
    )


def _block(rec: Record, key: str) -> tuple[LabeledPrompt, ...]:
    """An optional `{prompts, targets}` block of equal-length lists."""
    block = rec.child(key, required=False)
    prompts, targets = block.texts("prompts", required=False), block.texts("targets", required=False)
    if len(targets) != len(prompts):
        block.fail("targets", f"one target per prompt ({len(prompts)})", targets)
    return tuple(LabeledPrompt(p, t) for p, t in zip(prompts, targets))


def _contrasts(rec: Record, key: str) -> tuple[ContrastPrompt, ...]:
    """An optional `{prompts, right, wrong}` block: three strings, or three lists of equal length.

    A malformed one is logged, and its case kept without commonsense questions: only CS and DCS read the block, so
    it must not cost a run that does not ask for them (the paper's Table 3) a record of the file."""
    block = rec.child(key, required=False)
    if not block.keys():
        return ()
    try:
        fields = {name: block.text_or_texts(name) for name in ("prompts", "right", "wrong")}
        for name in ("right", "wrong"):
            if len(fields[name]) != len(fields["prompts"]):
                block.fail(name, f"one continuation per prompt ({len(fields['prompts'])})", fields[name])
    except InvalidRecordError as err:
        log.warning("%s; that case has no commonsense question (CS, DCS); its other prompts are kept", err.problem)
        return ()
    return tuple(ContrastPrompt(*texts) for texts in zip(fields["prompts"], fields["right"], fields["wrong"]))


def _prompts_towards(rec: Record, key: str, target: str) -> list[str]:
    """The prompts of a block whose every target must be `target` (EditCase keeps only the prompts)."""
    labeled = _block(rec, key)
    for i, item in enumerate(labeled):
        if item.target != target:
            rec.child(key).fail(f"targets[{i}]", f"{target!r} (the request's target for this block)", item.target)
    return [item.prompt for item in labeled]
