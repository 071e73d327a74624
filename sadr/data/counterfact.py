"""CounterFact (ROME's `counterfact.json`) and MEMIT's `multi_counterfact.json`, which share its schema.

`requested_rewrite.prompt` holds "{}" where the subject goes; `target_new`/`target_true` are
`{"str", "id"}` objects (Wikidata ids). Paraphrase prompts begin with an unrelated text prefix,
sometimes with newlines, and are kept verbatim, as ROME scores them.
"""

from __future__ import annotations

from sadr.conf.schema import DatasetConfig
from sadr.data.fields import check_mentions_subject, edit_template, new_target
from sadr.data.records import EditCase, EditRequest
from sadr.data.validation import Record


def parse(rec: Record, cfg: DatasetConfig) -> EditCase:
    rewrite = rec.child("requested_rewrite")
    subject = rewrite.text("subject")
    target_new, target_true = rewrite.child("target_new"), rewrite.child("target_true").text("str")
    request = EditRequest(
        prompt=edit_template(rewrite, "prompt"),
        subject=subject,
        target_new=new_target(target_new, "str", target_true),
        target_true=target_true,
        relation_id=rewrite.text("relation_id", required=False),
        target_new_id=target_new.text("id", required=False),
    )
    return EditCase(
        case_id=rec.identifier("case_id"),
        request=request,
        paraphrase_prompts=check_mentions_subject(
            rec, "paraphrase_prompts", rec.texts("paraphrase_prompts", required=False), subject
        ),
        neighborhood_prompts=tuple(rec.texts("neighborhood_prompts", required=False)),
        generation_prompts=tuple(rec.texts("generation_prompts", required=False)),
    )
