"""Fluency (n-gram entropy) and consistency (TF-IDF cosine) against values computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sadr.evaluation.consistency import (
    ConsistencyUnavailable,
    load_consistency_data,
    tfidf_cosine,
)
from sadr.evaluation.fluency import ngram_entropy, word_tokens

LOG2_3 = math.log2(3)


def test_word_tokens_follow_treebank_on_the_common_cases():
    assert word_tokens("Don't stop: it's a well-known fact, isn't it?") == [
        "Do",
        "n't",
        "stop",
        ":",
        "it",
        "'s",
        "a",
        "well-known",
        "fact",
        ",",
        "is",
        "n't",
        "it",
        "?",
    ]


def test_word_tokens_split_every_clitic_in_any_case_and_only_at_a_word_end():
    """Each of 's 're 've 'll 'd 'm n't is its own token, upper case too; a quote before a word ("'rest'") is not a
    clitic."""
    assert word_tokens("I'm sure we're done; you'll see they've said he'd go, WON'T you? It's the 'rest'") == [
        "I", "'m", "sure", "we", "'re", "done", ";", "you", "'ll", "see", "they", "'ve", "said", "he", "'d", "go", ",",
        "WO", "N'T", "you", "?", "It", "'s", "the", "'", "rest", "'",
    ]
    assert word_tokens("WE'RE DON'T I'LL") == ["WE", "'RE", "DO", "N'T", "I", "'LL"]


@pytest.mark.parametrize("word", ["It's", "We're", "We've", "We'll", "We'd", "I'm", "Don't", "WE'VE"])
def test_ngram_entropy_of_text_with_contractions(word):
    """"{word} here. {word}" is 6 tokens a b here . a b: bigrams (a, b)×2 and 3 others once, 4 distinct trigrams."""
    h2 = -(0.4 * math.log2(0.4) + 3 * 0.2 * math.log2(0.2))
    h3 = 2.0
    assert ngram_entropy(f"{word} here. {word}") == pytest.approx((h2 * 2 / 3 + h3 * 4 / 3) / 2)  # = 1.9739760
    assert ngram_entropy(f"{word} here. {word}") == pytest.approx(1.9739760, abs=1e-7)


def test_ngram_entropy_repeated_pattern():
    # tokens a b a b: bigrams (a,b)×2 (b,a)×1 -> H2 = log2 3 - 2/3; trigrams (a,b,a) (b,a,b) -> H3 = 1
    h2, h3 = LOG2_3 - 2 / 3, 1.0
    assert ngram_entropy("a b a b") == pytest.approx((h2 * 2 / 3 + h3 * 4 / 3) / 2)  # = 0.9727653
    assert ngram_entropy("a b a b") == pytest.approx(0.9727653, abs=1e-7)


def test_ngram_entropy_all_distinct_and_punctuation_tokens():
    # "The cat sat." -> The cat sat . : 3 distinct bigrams (log2 3), 2 distinct trigrams (1 bit)
    assert ngram_entropy("The cat sat.") == pytest.approx((LOG2_3 * 2 / 3 + 4 / 3) / 2)


def test_ngram_entropy_is_case_sensitive_as_nltk_word_tokenize():
    # ROME counts nltk.word_tokenize's tokens as they are: "The" and "the" are different words.
    # The cat saw the cat: bigrams (The,cat) (cat,saw) (saw,the) (the,cat) all distinct -> H2 = 2;
    # trigrams 3 distinct -> H3 = log2 3. Lowercased, (the,cat) would repeat and H2 would be 1.5.
    assert ngram_entropy("The cat saw the cat") == pytest.approx((2 * 2 / 3 + LOG2_3 * 4 / 3) / 2)


def test_ngram_entropy_degenerate_text_is_zero():
    assert ngram_entropy("go go go go go") == 0.0  # one bigram type, one trigram type
    assert ngram_entropy("hello") == 0.0  # no bigrams at all
    assert ngram_entropy("") == 0.0


def test_ngram_entropy_custom_orders_and_weights():
    # unigrams of "a a b b": two types equally frequent -> 1 bit
    assert ngram_entropy("a a b b", ns=(1,), weights=(1.0,)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal length"):
        ngram_entropy("a b", ns=(2, 3), weights=(1.0,))


VOCAB = {"cat": 0, "dog": 1, "fish": 2}
IDF = np.array([1.0, 2.0, 3.0])


def test_tfidf_cosine_by_hand():
    # a: cat×2 dog×1 -> [2, 2, 0]; b: dog fish -> [0, 2, 3]; cos = 4 / (√8 · √13)
    assert tfidf_cosine("cat cat dog", "dog fish", VOCAB, IDF) == pytest.approx(4 / math.sqrt(104))


def test_tfidf_cosine_lowercases_and_ignores_short_and_unknown_words():
    # "A" (one character) and "bird" (not in the vocabulary) are dropped; "CAT" counts as "cat"
    assert tfidf_cosine("A CAT, a bird.", "cat", VOCAB, IDF) == pytest.approx(1.0)
    assert tfidf_cosine("cat", "fish", VOCAB, IDF) == 0.0
    assert tfidf_cosine("bird", "cat", VOCAB, IDF) == 0.0  # no known word: 0 instead of ROME's NaN


def test_tfidf_cosine_never_counts_a_one_character_word_even_one_in_the_vocabulary():
    """sklearn's token_pattern (two or more word characters) decides what a token is, not the vocabulary: "x" never
    counts. a: cat -> [1, 0, 0, 0]; b: cat dog -> [1, 2, 0, 0]; cos = 1 / √5 (counting "x" (idf 4) would give
    [1, 0, 0, 4] and [1, 2, 0, 4], cos = 17 / (√17 · √21))."""
    vocab, idf = {**VOCAB, "x": 3}, np.array([1.0, 2.0, 3.0, 4.0])
    assert tfidf_cosine("cat x", "cat dog x", vocab, idf) == pytest.approx(1 / math.sqrt(5))
    assert tfidf_cosine("x", "x", vocab, idf) == 0.0  # no token at all


def write_tfidf_files(directory):
    np.save(directory / "idf.npy", IDF)
    (directory / "tfidf_vocab.json").write_text(json.dumps(VOCAB))
    snippets = [
        {
            "relation_id": "P1",
            "target_id": "Q7",
            "samples": [{"name": "Rex", "text": "dog dog"}, {"name": "Tom", "text": "cat"}],
        },
        {"relation_id": "P1", "target_id": "Q7", "samples": [{"name": "Nemo", "text": "fish"}]},
        {"relation_id": "P2", "target_id": "Q7", "samples": [{"name": "Tib", "text": "cat"}]},
    ]
    (directory / "attribute_snippets.json").write_text(json.dumps(snippets))


def test_consistency_data_loads_and_scores(tmp_path):
    write_tfidf_files(tmp_path)
    data = load_consistency_data(tmp_path)
    assert data.snippets_for("P1", "Q7") == ["dog dog", "cat", "fish"]
    assert data.snippets_for("P9", "Q7") == []
    # generations "cat" + "dog" -> [1, 2, 0]; snippets "dog dog cat fish" -> [1, 4, 3]; cos = 9 / (√5 · √26)
    assert data.score(["cat", "dog"], "P1", "Q7") == pytest.approx(9 / math.sqrt(130))


def test_consistency_unavailable_names_the_missing_files(tmp_path):
    np.save(tmp_path / "idf.npy", IDF)
    with pytest.raises(ConsistencyUnavailable) as err:
        load_consistency_data(tmp_path)
    message = str(err.value)
    assert f"tfidf_vocab.json, attribute_snippets.json not found in {tmp_path}" in message
    assert "https://rome.baulab.info/data/dsets/tfidf_vocab.json" in message


def test_consistency_unavailable_on_mismatched_files(tmp_path):
    write_tfidf_files(tmp_path)
    np.save(tmp_path / "idf.npy", IDF[:2])
    with pytest.raises(ConsistencyUnavailable, match="do not match"):
        load_consistency_data(tmp_path)


@pytest.mark.parametrize("broken, reason", [
    (lambda d: np.save(d / "idf.npy", IDF[:, None]), "do not match"),  # a column, not a vector, of idf values
    (lambda d: (d / "tfidf_vocab.json").write_text(json.dumps({**VOCAB, "x": -1})), "do not match"),  # idf[-1]
    (lambda d: (d / "tfidf_vocab.json").write_text(json.dumps(list(VOCAB))), "holds no vocabulary"),
    (lambda d: (d / "tfidf_vocab.json").write_text("{}"), "holds no vocabulary"),  # every cosine would be 0.0
    (lambda d: (d / "tfidf_vocab.json").write_text(json.dumps({**VOCAB, "x": 1.0})), "other than an integer index"),
    (lambda d: (d / "tfidf_vocab.json").write_text(json.dumps({**VOCAB, "x": True})), "other than an integer index"),
    (lambda d: (d / "attribute_snippets.json").write_text(json.dumps([{"relation_id": "P1", "target_id": "Q7"}])),
     "could not read the TF-IDF files .*'samples'"),
    (lambda d: (d / "attribute_snippets.json").write_text(json.dumps({"P1": []})), "could not read the TF-IDF files"),
], ids=["2-d idf", "negative index", "vocabulary list", "empty vocabulary", "float index", "bool index",
        "snippets without samples", "snippets not a list"])
def test_consistency_unavailable_on_files_of_the_wrong_shape(tmp_path, broken, reason):
    """A file of the wrong shape leaves the metric out with the reason, as a missing one does, instead of failing the
    run or scoring against it."""
    write_tfidf_files(tmp_path)
    broken(tmp_path)
    with pytest.raises(ConsistencyUnavailable, match=reason):
        load_consistency_data(tmp_path)


def test_consistency_unavailable_when_download_fails(tmp_path, monkeypatch):
    from sadr.data.download import RemoteFile
    from sadr.evaluation import consistency

    monkeypatch.setitem(consistency.FILES, "idf.npy", RemoteFile("http://127.0.0.1:9/idf.npy"))
    with pytest.raises(ConsistencyUnavailable, match=r"could not download http://127\.0\.0\.1:9/idf\.npy"):
        load_consistency_data(tmp_path, download_missing=True)
