import pytest

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


@pytest.mark.parametrize("subject", ["Danielle Darrieux ", " Danielle Darrieux", "Danielle Darrieux\n"])
def test_whitespace_around_the_subject_is_not_its_last_token(tokenizer, subject):
    text, span = fill_subject("The mother tongue of {} is", subject)
    ids, offsets = encode_with_offsets(tokenizer, text)
    assert tokenizer.decode(ids[: last_token_of_span(offsets, span) + 1]).endswith("Darrieux")


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
