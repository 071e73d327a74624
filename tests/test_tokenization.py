import pytest

from sadr.models.tokenization import (
    SubjectNotFoundError,
    encode_prompt_target,
    encode_with_offsets,
    fill_subject,
    last_token_of_span,
)


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
