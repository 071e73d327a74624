"""KnowEdit WikiData_counterfact (`benchmark/wiki_counterfact/{train,test}_cf.json`).

`prompt` spells out the subject; the edit template replaces its first whole-word occurrence with "{}".
Mapping: every `portability.<name>` list (Reasoning, Subject_Aliasing, Logical_Generalization)
→ `EditCase.portability[<name>]`; `locality.Relation_Specificity` → `relation_prompts`;
`locality.Forgetfulness` (the true object must survive a "which is not <new>" prompt) →
`locality_prompts`, since both are checked against a gold answer. A `ground_truth` given as a
list of alias lists is reduced to its first alias. `Knowledge_triplet` and `Rephrased` are not
used; case ids are record positions in the file.
"""

from __future__ import annotations

from sadr.conf.schema import DatasetConfig
from sadr.data.fields import labeled_prompts, new_target, template_around_subject
from sadr.data.records import EditCase, EditRequest
from sadr.data.validation import Record


def parse(rec: Record, cfg: DatasetConfig) -> EditCase:
    subject, target_true = rec.text("subject"), rec.alias("ground_truth")
    request = EditRequest(
        prompt=template_around_subject(rec, "prompt", subject),
        subject=subject,
        target_new=new_target(rec, "target_new", target_true),
        target_true=target_true,
    )
    portability = rec.child("portability", required=False)
    locality = rec.child("locality", required=False)
    return EditCase(
        case_id=rec.index,
        request=request,
        relation_prompts=labeled_prompts(locality, "Relation_Specificity"),
        locality_prompts=labeled_prompts(locality, "Forgetfulness"),
        portability={name: prompts for name in portability.keys() if (prompts := labeled_prompts(portability, name))},
    )
