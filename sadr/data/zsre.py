"""zsRE as ROME/MEMIT use it (`zsre_mend_eval.json`).

Per record: `subject`, a question `src` that contains it, `answers` (list), the counterfactual
`alt`, a rephrased question `rephrase`, and an unrelated Natural Questions pair `loc`/`loc_ans`
(`pred` and `cond` are not used). Choices, following ROME's `MENDQADataset`:

* target: `dataset.target=answers` edits towards `answers[0]` (ROME/MEMIT, no `target_true`);
  `dataset.target=alt` edits towards `alt` with `answers[0]` as `target_true` (EasyEdit); either
  way the case is `token_scored` (top-1 token accuracy of the new target, as both protocols score it).
* the edit template is `src` with the first whole-word occurrence of the subject replaced by "{}"; the
  rephrase is not required to contain the subject (it is only scored, never edited).
* `loc` keeps its "nq question: " prefix and gets a "?" appended, exactly the prompt ROME scores
  `loc_ans` against.
* case ids are record positions in the file, as in ROME.
"""

from __future__ import annotations

from sadr.conf.schema import DatasetConfig, ZsreTarget
from sadr.data.fields import template_around_subject
from sadr.data.records import EditCase, EditRequest, LabeledPrompt
from sadr.data.validation import Record


def parse(rec: Record, cfg: DatasetConfig) -> EditCase:
    subject = rec.text("subject")
    answers = rec.texts("answers")
    if not answers:
        rec.fail("answers", "a non-empty list of answers", answers)
    if ZsreTarget(cfg.target) is ZsreTarget.alt:
        target_new, target_true = rec.text("alt"), answers[0]
    else:
        target_new, target_true = answers[0], None
    return EditCase(
        case_id=rec.index,
        request=EditRequest(template_around_subject(rec, "src", subject), subject, target_new, target_true),
        paraphrase_prompts=(rec.text("rephrase"),),
        locality_prompts=(LabeledPrompt(rec.text("loc") + "?", rec.text("loc_ans")),),
        token_scored=True,
    )
