import pytest

from sadr.data.records import LabeledPrompt
from sadr.models.tokenization import (
    SubjectNotFoundError,
    encode_prompt_target,
    encode_with_offsets,
    fill_subject,
    last_token_of_span,
    pad_batch,
    pad_id_of,
)
from tests.tiny_models import make_tokenizer


def test_prompt_and_target_ids_concatenate_to_the_full_text(tokenizer):
    pair = encode_prompt_target(tokenizer, "The capital of France is", "Paris")
    full = tokenizer("The capital of France is Paris")["input_ids"]
    assert pair.prompt_ids + pair.target_ids == full
    assert tokenizer.decode(pair.target_ids) == " Paris"


def test_subject_last_token_found_from_offsets(tokenizer):
    text, span = fill_subject("The mother tongue of {} is", "Danielle Darrieux")
    ids, offsets = encode_with_offsets(tokenizer, text)
    index = last_token_of_span(offsets, span)
    assert tokenizer.decode(ids[: index + 1]).endswith("Darrieux")
    assert not tokenizer.decode(ids[: index]).endswith("Darrieux")


def test_subject_positions_survive_a_bos_token(tokenizer):
    """A tokenizer that prepends BOS must not shift the subject position by one."""
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    text, span = fill_subject("{} is located in", "The Eiffel Tower")
    ids, offsets = encode_with_offsets(tokenizer, text)
    assert ids[0] == 0
    index = last_token_of_span(offsets, span)
    assert tokenizer.decode(ids[1 : index + 1]).strip() == "The Eiffel Tower"


def test_a_span_no_token_covers_is_an_error():
    with pytest.raises(SubjectNotFoundError, match=r"no token covers characters 10\.\.12"):
        last_token_of_span([(0, 5), (5, 9)], (10, 12))


def test_template_must_have_one_placeholder():
    with pytest.raises(ValueError, match="exactly once"):
        fill_subject("no placeholder", "x")


def test_a_target_that_starts_with_a_space_gets_no_second_one(tokenizer):
    plain = encode_prompt_target(tokenizer, "The capital of France is", "Paris")
    spaced = encode_prompt_target(tokenizer, "The capital of France is", " Paris")
    assert (spaced.prompt_ids, spaced.target_ids) == (plain.prompt_ids, plain.target_ids)
    with pytest.raises(ValueError, match="empty target"):
        encode_prompt_target(tokenizer, "The capital of France is", " ")


def test_a_multi_token_target_starts_at_its_leading_space(tokenizer):
    """The target's first token carries the space (" D" of " Danielle"): it belongs to the target, not the prompt."""
    prompt = "The mother tongue of Max is"
    pair = encode_prompt_target(tokenizer, prompt, "Danielle Darrieux")
    full = tokenizer(prompt, return_offsets_mapping=True)
    assert pair.prompt_ids == full["input_ids"] and pair.prompt_offsets == [tuple(o) for o in full["offset_mapping"]]
    assert tokenizer.decode(pair.target_ids) == " Danielle Darrieux" and len(pair.target_ids) > 1


class GreedyBosTokenizer:
    """Longest match over a fixed vocabulary after a BOS (id 0): "is " can be one token, as some merges make it."""

    vocab = ["<s>", "i", "t", "s", " ", "o", "k", "it", "is ", " ok"]

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
        ids, offsets = ([0], [(0, 0)]) if add_special_tokens else ([], [])
        i = 0
        while i < len(text):
            piece = max((v for v in self.vocab[1:] if text.startswith(v, i)), key=len)
            ids.append(self.vocab.index(piece))
            offsets.append((i, i + len(piece)))
            i += len(piece)
        return {"input_ids": ids, "offset_mapping": offsets}


def test_a_token_across_the_prompt_target_boundary_falls_back_to_separate_encodings():
    """In "it is ok" the token "is " straddles the boundary; prompt and " ok" are then encoded on their own, the
    target without a second BOS."""
    vocab = GreedyBosTokenizer.vocab
    pair = encode_prompt_target(GreedyBosTokenizer(), "it is", "ok")
    assert [vocab[i] for i in pair.prompt_ids] == ["<s>", "it", " ", "i", "s"]
    assert [vocab[i] for i in pair.target_ids] == [" ok"]
    assert pair.prompt_offsets == [(0, 0), (0, 2), (2, 3), (3, 4), (4, 5)]


@pytest.mark.parametrize(
    "left, ids, mask",
    [
        (False, [[5, 6, 7], [8, 9, 9]], [[1, 1, 1], [1, 0, 0]]),
        (True, [[5, 6, 7], [9, 9, 8]], [[1, 1, 1], [0, 0, 1]]),
    ],
)
def test_pad_batch_pads_on_the_chosen_side(left, ids, mask):
    """Right padding for scoring, left padding for `generate`; the mask marks exactly the real tokens."""
    batch = pad_batch([[5, 6, 7], [8]], pad_id=9, left=left)
    assert batch.input_ids.tolist() == ids and batch.attention_mask.tolist() == mask


def test_pad_id_of_keeps_a_pad_token_else_takes_eos_then_unk_then_token_0():
    """The documented fallback order; a tokenizer's own pad token is never replaced."""
    own = make_tokenizer(pad=False)
    own.pad_token = "%"
    eos_and_unk = make_tokenizer(pad=False)
    eos_and_unk.unk_token = "!"
    unk_only = make_tokenizer(pad=False)
    unk_only.unk_token, unk_only.eos_token = "!", None
    neither = make_tokenizer(pad=False)
    neither.eos_token = None
    ids = [own.convert_tokens_to_ids(t) for t in ("%", "<|endoftext|>", "!")]
    assert ids == [5, 0, 1]
    assert [pad_id_of(t) for t in (own, eos_and_unk, unk_only, neither)] == [5, 0, 1, 0]


def test_a_prompt_longer_than_the_model_s_positions_is_named_before_any_work(tokenizer):
    from dataclasses import replace

    from sadr.data.lengths import EDIT_PROMPT, GENERATION_PROMPTS, check_prompt_lengths
    from sadr.data.load import load_cases
    from sadr.errors import InvalidSettingError
    from tests.data_fixtures import config

    cases = load_cases(config("counterfact"), "unused").cases
    added = {EDIT_PROMPT: 10}
    check_prompt_lengths(cases, tokenizer, 128, added)
    long = replace(cases[1], neighborhood_prompts=("word " * 200 + "is in",))
    with pytest.raises(InvalidSettingError, match=r"^case 101: a prompt of neighborhood_prompts needs \d+ tokens with "
                                                  r"its answer, more than the model's 128 positions"):
        check_prompt_lengths([cases[0], long], tokenizer, 128, added)
    with pytest.raises(InvalidSettingError, match=r"requested_rewrite\.prompt needs \d+ tokens with its answer and a "
                                                  r"context template"):
        check_prompt_lengths(cases, tokenizer, len(tokenizer(cases[0].request.text).input_ids) + 2, added)
    generation = max(len(tokenizer(prompt).input_ids) for case in cases for prompt in case.generation_prompts)
    check_prompt_lengths(cases, tokenizer, generation + 100, {GENERATION_PROMPTS: 100})
    with pytest.raises(InvalidSettingError, match=r"generation_prompts needs \d+ tokens and the sampled tokens, more "):
        check_prompt_lengths(cases, tokenizer, generation + 99, {GENERATION_PROMPTS: 100})


def test_the_prompt_length_check_bounds_tokens_by_bytes_and_counts_every_field():
    """A tokenizer giving a BOS and one token per byte, the most the check's byte bound allows: a text of n bytes is
    n + 1 tokens. The true answer is the longer one where it is; a non-ASCII character is two tokens; portability
    prompts are scored with their answers too."""
    from types import SimpleNamespace

    from sadr.data.lengths import check_prompt_lengths
    from sadr.data.records import ContrastPrompt, EditCase, EditRequest, LabeledPrompt
    from sadr.errors import InvalidSettingError

    def bytes_with_bos(texts):
        return SimpleNamespace(input_ids=[[0, *text.encode()] for text in texts])

    def case(**fields):
        request = fields.pop("request", EditRequest(prompt="{} is in", subject="Paris", target_new="Rome"))
        return EditCase(case_id=7, request=request, **fields)

    # "Paris is in Rome": 16 bytes, 17 tokens
    check_prompt_lengths([case()], bytes_with_bos, 17, {})
    check_prompt_lengths([case()], bytes_with_bos, None, {})  # a model that gives no number of positions: no bound
    with pytest.raises(InvalidSettingError, match=r"^case 7: a prompt of requested_rewrite\.prompt needs 17 tokens "
                                                  r"with its answer, more than the model's 16 positions"):
        check_prompt_lengths([case()], bytes_with_bos, 16, {})
    # "Paris is in the United Kingdom": 30 bytes, 31 tokens, though the new target "Rome" makes 17
    longer_true = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome", target_true="the United Kingdom")
    with pytest.raises(InvalidSettingError, match=r"requested_rewrite\.prompt needs 31 tokens with its answer, more "
                                                  r"than the model's 30 positions"):
        check_prompt_lengths([case(request=longer_true)], bytes_with_bos, 30, {})
    # ten "é": 10 characters, 20 bytes, 21 tokens
    with pytest.raises(InvalidSettingError, match=r"generation_prompts needs 21 tokens, more than the model's 20 "):
        check_prompt_lengths([case(generation_prompts=("é" * 10,))], bytes_with_bos, 20, {})
    # "The capital of Paris's country is London": 40 bytes, 41 tokens
    reasoning = {"Reasoning": (LabeledPrompt("The capital of Paris's country is", "London"),)}
    check_prompt_lengths([case(portability=reasoning)], bytes_with_bos, 41, {})
    with pytest.raises(InvalidSettingError, match=r"portability\.Reasoning needs 41 tokens with its answer, more "):
        check_prompt_lengths([case(portability=reasoning)], bytes_with_bos, 40, {})
    # CS: "Dry a shoe. Stuff it with paper." 32 bytes, 33 tokens (the longer continuation counts); DCS puts the edit
    # sentence "Paris is in Rome. " (18 bytes) before it: 51 tokens; DNS: "Paris is in Rome. Lyon is in Rome", 34 tokens
    question = (ContrastPrompt("Dry a shoe.", "Stuff it with ice.", "Stuff it with paper."),)
    with pytest.raises(InvalidSettingError, match=r"commonsense_prompts needs 33 tokens with its answer, more "):
        check_prompt_lengths([case(commonsense_prompts=question)], bytes_with_bos, 32, {})
    with pytest.raises(InvalidSettingError, match=r"commonsense_prompts \(after the edit sentence\) needs 51 tokens "):
        check_prompt_lengths([case(commonsense_prompts=question)], bytes_with_bos, 50, {})
    check_prompt_lengths([case(commonsense_prompts=question)], bytes_with_bos, 51, {})
    neighbor = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome", target_true="Gaul")
    with pytest.raises(InvalidSettingError, match=r"neighborhood_prompts \(after the edit sentence\) needs 34 tokens "):
        check_prompt_lengths([case(request=neighbor, neighborhood_prompts=("Lyon is in",))], bytes_with_bos, 33, {})


@pytest.mark.parametrize("generation, style, length, positions, sampled", [
    (False, "fixed", 100, 128, 0),  # no fluency: nothing is sampled after a generation prompt
    (True, "fixed", 130, 128, 130),  # counted with each prompt by check_prompt_lengths
    (True, "reference", 128, 128, 0),  # each text grows to 128 tokens in all, whatever its prompt: it fits
    (True, "reference", 500, None, 0),  # a model that gives no number of positions: no bound
])
def test_the_tokens_sampled_after_a_generation_prompt_depend_on_the_style(generation, style, length, positions,
                                                                          sampled):
    """What check_prompt_lengths adds to each generation prompt (a reference-style length longer than the model's
    positions is refused: tests/test_run.py)."""
    from sadr.conf.schema import EvalConfig, SamplingStyle
    from sadr.data.lengths import generated_after_prompt

    eval_cfg = EvalConfig(generation=generation, generation_style=SamplingStyle[style], generation_length=length)
    assert generated_after_prompt(eval_cfg, positions) == sampled


@pytest.mark.parametrize("field, prompts, needed", [
    # "Paris lies in Rome": 18 bytes, 19 tokens
    ("paraphrase_prompts", {"paraphrase_prompts": ("Paris lies in",)}, 19),
    # "The currency of Paris is euro": 29 bytes, 30 tokens
    ("relation_prompts", {"relation_prompts": (LabeledPrompt("The currency of Paris is", "euro"),)}, 30),
    # "Paris, which is not Rome, is in Gaul": 36 bytes, 37 tokens
    ("locality_prompts", {"locality_prompts": (LabeledPrompt("Paris, which is not Rome, is in", "Gaul"),)}, 37),
])
def test_paraphrase_relation_and_locality_prompts_are_length_checked_with_their_answers(field, prompts, needed):
    """A tokenizer giving a BOS and one token per byte: each of these prompts, followed by the answer it is scored
    against, must fit the model's positions too, not only the edit prompt ("Paris is in Rome": 17 tokens)."""
    from types import SimpleNamespace

    from sadr.data.lengths import check_prompt_lengths
    from sadr.data.records import EditCase, EditRequest
    from sadr.errors import InvalidSettingError

    def bytes_with_bos(texts):
        return SimpleNamespace(input_ids=[[0, *text.encode()] for text in texts])

    case = EditCase(case_id=3, request=EditRequest(prompt="{} is in", subject="Paris", target_new="Rome"), **prompts)
    check_prompt_lengths([case], bytes_with_bos, needed, {})
    with pytest.raises(InvalidSettingError, match=rf"^case 3: a prompt of {field} needs {needed} tokens with its "
                                                  rf"answer, more than the model's {needed - 1} positions"):
        check_prompt_lengths([case], bytes_with_bos, needed - 1, {})
