"""CLIP text tokenizer giving the same ids as open_clip's `SimpleTokenizer`, without torch.

    tokens = tokenize(["a photo of a cat", "two dogs"])   # np.int32 (2, 77)

Rows are `[SOT, bpe ids..., EOT, 0, 0, ...]` with SOT=49406, EOT=49407 and padding 0. Text longer
than the context is cut and its last kept position is overwritten with EOT, as open_clip does, so the
text encoder's argmax-pooling always finds an EOT.

Text cleaning is open_clip's "lower" cleaning: `ftfy.fix_text`, `html.unescape` twice, strip,
collapse whitespace runs to one space, lowercase.

Backends:
  * `Tokenizer.default()` - the OpenAI CLIP BPE compiled into `instant-clip-tokenizer` (Rust, numpy
    only). Needs no files and no torch; this is what `tokenize` uses.
  * `Tokenizer.from_hf_dir(path)` - the vocab.json/merges.txt (or tokenizer.json) of a Hugging Face
    CLIP checkpoint directory, through `transformers.CLIPTokenizer`.

SigLIP (`SentencePieceTokenizer`, name "siglip"): a SentencePiece model read from the checkpoint's spiece.model,
with transformers' SiglipTokenizer normalisation and ids, 64 tokens padded with "</s>". A run names the file in
`config.model.tokenizer_file` (`get_tokenizer("siglip:<file>")`); a Hugging Face directory brings its own.

Hugging Face files: `clip_bpe()` reads that same vocabulary back out of `instant-clip-tokenizer` (vocab +
merges in HF's layout) and `save_hf_tokenizer(path)` writes a `CLIPTokenizer` directory from it whose
ids equal `tokenize`'s for ordinary text: padding "!" (id 0), truncation keeping EOT last, and
`split_special_tokens` so that "!" or "<|endoftext|>" inside a caption stays plain text. Two
differences remain on unusual text: HF's CLIPTokenizer cleans with NFC + whitespace collapse +
lowercase only (no ftfy, no HTML unescape: entities, mojibake, ligatures), and its pre-tokenizer cuts
the literals "<|startoftext|>"/"<|endoftext|>" out of a punctuation run ("<|endoftext|>!").

Known deviations from open_clip, both confined to characters no caption should contain:
  * U+0345 (combining Greek ypogegrammeni) left uncomposed after NFC: open_clip's regex runs with
    IGNORECASE, case-folds it to iota and ends up dropping it ("a\u0345b" -> "a", "b"); we keep
    its bytes as tokens;
  * code points unassigned in Python 3.11's Unicode 14 tables: open_clip classifies them with the
    `regex` package's newer Unicode tables, so its own output depends on the installed `regex`.
"""
from __future__ import annotations

import functools
import html
import json
import os
import pathlib
import re
import string
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np

DEFAULT_CONTEXT_LENGTH = 77
# Ids of the OpenAI CLIP vocabulary (open_clip, HF and instant-clip-tokenizer agree on them).
sot_token = 49406
eot_token = 49407
pad_token = 0
vocab_size = 49408

# open_clip's SimpleTokenizer matches its special tokens *inside* the text too, so a caption
# containing "<end_of_text>" gets a real EOT id there. instant-clip-tokenizer does the same; for the
# HF backend we reproduce it by finding these matches with open_clip's own pre-tokenizer pattern.
_OPEN_CLIP_SPECIAL_LITERALS = ("<start_of_text>", "<end_of_text>")


def clean_text(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy, HTML-unescape twice, collapse whitespace, lowercase."""
    text = ftfy.fix_text(text)
    # Twice, because captions scraped from HTML are often double-escaped ("&amp;amp;").
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def _as_text_list(texts: str | Sequence[str]) -> list[str]:
    """Accept one string or a sequence of strings; reject everything else with a clear message."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise TypeError(
            "tokenize() got bytes; decode them first, e.g. `text.decode('utf-8')` "
            "(TFDS Text features come back as bytes)."
        )
    if isinstance(texts, np.ndarray):
        if texts.ndim != 1:
            raise ValueError(f"tokenize() needs a 1-D array of strings, got shape {texts.shape}.")
        texts = texts.tolist()
    if not isinstance(texts, Iterable):
        raise TypeError(
            f"tokenize() needs a str or a sequence of str, got {type(texts).__name__}."
        )
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            hint = " (decode bytes with .decode('utf-8'))" if isinstance(text, bytes) else ""
            raise TypeError(
                f"tokenize() needs strings, but item {index} is {type(text).__name__}: "
                f"{text!r:.60}{hint}."
            )
    return texts


def _check_context_length(context_length) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
        raise TypeError(
            f"context_length must be an int, got {type(context_length).__name__} "
            f"({context_length!r})."
        )
    if context_length < 2:
        raise ValueError(
            f"context_length must be >= 2 (room for the start and end tokens), got {context_length}."
        )
    return int(context_length)


def _pack_rows(
    token_lists: Sequence[Sequence[int]], context_length: int, sot: int, eot: int
) -> np.ndarray:
    """[SOT] + ids + [EOT], zero-padded; too-long rows are cut and end in EOT (open_clip's rule)."""
    out = np.zeros((len(token_lists), context_length), dtype=np.int32)
    out[:, 0] = sot
    body = context_length - 2  # room between SOT and EOT
    for row, ids in enumerate(token_lists):
        ids = ids[:body] if len(ids) > body else ids
        n = len(ids)
        out[row, 1 : 1 + n] = ids
        out[row, 1 + n] = eot
    return out


class Tokenizer:
    """Callable CLIP tokenizer with open_clip semantics; build it with `default()` or `from_hf_dir()`.

    `tokenizer(texts, context_length=77)` -> np.int32 array (N, context_length).
    """

    def __init__(self, *, backend, name: str, sot: int, eot: int, size: int, recipe: tuple):
        # Private: use the classmethods. `recipe` = (classmethod name, args) rebuilds this object,
        # which makes it picklable (grain's spawned workers pickle map transforms holding it);
        # the Rust/HF backends themselves cannot be pickled.
        self._backend = backend
        self._recipe = recipe
        self.name = name
        self.sot_token = sot
        self.eot_token = eot
        self.vocab_size = size

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def default(cls) -> Tokenizer:
        """The OpenAI CLIP BPE bundled in `instant-clip-tokenizer` (fast, offline, no torch)."""
        try:
            import instant_clip_tokenizer
        except ImportError as err:  # pragma: no cover - it is a runtime requirement
            raise ImportError(
                "harmoclip_jax.tokenizer needs the `instant-clip-tokenizer` package "
                "(pip install instant-clip-tokenizer); it carries the CLIP vocabulary."
            ) from err
        backend = instant_clip_tokenizer.Tokenizer()
        sot, eot = backend.start_of_text(), backend.end_of_text()
        if (sot, eot) != (sot_token, eot_token):  # guards against a future vocabulary change
            raise RuntimeError(
                f"instant-clip-tokenizer reports SOT/EOT {sot}/{eot}, expected "
                f"{sot_token}/{eot_token}; this version is not the OpenAI CLIP vocabulary."
            )
        return cls(backend=_InstantBackend(backend), name="instant-clip-tokenizer",
                   sot=sot, eot=eot, size=vocab_size, recipe=("default", ()))

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """A Hugging Face CLIP tokenizer directory (vocab.json + merges.txt, or tokenizer.json).

        Ids follow that vocabulary; cleaning, padding (0) and truncation follow open_clip.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"Tokenizer.from_hf_dir: {path!r} is not a directory.")
        has_json = os.path.isfile(os.path.join(path, "tokenizer.json"))
        has_bpe = all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))
        if not (has_json or has_bpe):
            raise FileNotFoundError(
                f"Tokenizer.from_hf_dir: {path!r} has neither tokenizer.json nor "
                "vocab.json + merges.txt; point it at a CLIP checkpoint's tokenizer folder."
            )
        from transformers import CLIPTokenizer  # lazy: 0.6 s import, only this backend needs it

        # from_pretrained reads the files; CLIPTokenizer(vocab_file=...) would silently ignore them
        # in transformers v5.
        hf = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        sot, eot = hf.bos_token_id, hf.eos_token_id
        if sot is None or eot is None:
            raise ValueError(
                f"Tokenizer.from_hf_dir: tokenizer in {path!r} has no bos/eos token "
                f"(bos={hf.bos_token!r}, eos={hf.eos_token!r}); not a CLIP tokenizer."
            )
        _use_open_clip_pre_tokenization(hf)
        return cls(backend=_HFBackend(hf, sot, eot), name=f"hf:{path}",
                   sot=sot, eot=eot, size=len(hf), recipe=("from_hf_dir", (path,)))

    # ---- use ----------------------------------------------------------------------------------
    def __call__(
        self, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> np.ndarray:
        """Tokenize one string or a sequence of strings -> np.int32 (N, context_length)."""
        context_length = _check_context_length(context_length)
        cleaned = [clean_text(t) for t in _as_text_list(texts)]
        return self._backend.tokenize(cleaned, context_length)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text after cleaning, without SOT/EOT and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, got {type(text).__name__}.")
        return self._backend.encode(clean_text(text))

    def decode(self, ids) -> str | list[str]:
        """Text of a token row (or a list of texts for a 2-D array), for debugging.

        Drops a leading SOT and stops at the first EOT, so padding is not shown. The text is the
        cleaned (lowercased) form, not the original caption.
        """
        ids = np.asarray(ids)
        if ids.ndim == 2:
            return [self.decode(row) for row in ids]
        if ids.ndim != 1:
            raise ValueError(f"decode() needs a 1-D or 2-D array of ids, got shape {ids.shape}.")
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.sot_token:
            ids = ids[1:]
        if self.eot_token in ids:
            ids = ids[: ids.index(self.eot_token)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode(): ids {bad[:5]} are outside [0, {self.vocab_size}).")
        return self._backend.decode(ids).strip()

    def __reduce__(self):
        method, args = self._recipe
        return (_rebuild, (method, args))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name}, vocab_size={self.vocab_size})"


def _rebuild(method: str, args: tuple) -> Tokenizer:
    return getattr(Tokenizer, method)(*args)


class _InstantBackend:
    def __init__(self, tok):
        self._tok = tok

    def tokenize(self, cleaned: list[str], context_length: int) -> np.ndarray:
        if context_length < 3:
            # instant-clip-tokenizer refuses < 3; open_clip's answer for 2 is always [SOT, EOT].
            return _pack_rows([[] for _ in cleaned], context_length, sot_token, eot_token)
        # It adds SOT/EOT, pads with 0 and keeps EOT last when cutting, exactly as open_clip
        # (checked in tests); it returns uint16.
        return self._tok.tokenize_batch(cleaned, context_length).astype(np.int32)

    def encode(self, cleaned: str) -> list[int]:
        return [int(i) for i in self._tok.encode(cleaned)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


# open_clip's pre-tokenizer pattern minus its special literals (handled by _HFBackend). HF's CLIP
# pattern starts with "<|startoftext|>|<|endoftext|>", which isolates those literals where open_clip
# lets a punctuation run continue ("<|endoftext|>:" ends in "|>:" there).
_OPEN_CLIP_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _use_open_clip_pre_tokenization(hf) -> None:
    """Make an HF CLIP tokenizer split text exactly like open_clip: our cleaning replaces HF's
    normalizer (its NFC would compose e.g. "e&#769;" after our unescape, open_clip does not), and
    open_clip's regex + plain byte mapping replace HF's pre-tokenizer."""
    from tokenizers import Regex, pre_tokenizers

    backend = hf.backend_tokenizer
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_OPEN_CLIP_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


class _HFBackend:
    def __init__(self, hf, sot: int, eot: int):
        self._hf = hf
        self._sot, self._eot = sot, eot
        # open_clip's pre-tokenizer, used only to locate in-text special literals the same way
        # open_clip does (a preceding punctuation run can swallow the "<").
        import regex

        self._open_clip_pattern = regex.compile(
            "|".join(_OPEN_CLIP_SPECIAL_LITERALS) + "|" + _OPEN_CLIP_WORD_PATTERN,
            regex.IGNORECASE,
        )
        self._literal_ids = {_OPEN_CLIP_SPECIAL_LITERALS[0]: sot, _OPEN_CLIP_SPECIAL_LITERALS[1]: eot}

    def _encode_many(self, cleaned: list[str]) -> list[list[int]]:
        # split_special_tokens: a literal "<|endoftext|>" in a caption is plain text to open_clip.
        return self._hf(cleaned, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _encode_with_literals(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for match in self._open_clip_pattern.finditer(text):
            special = self._literal_ids.get(match.group().lower())
            if special is not None:
                if match.start() > start:
                    ids += self._encode_many([text[start : match.start()]])[0]
                ids.append(special)
                start = match.end()
        if start < len(text):
            ids += self._encode_many([text[start:]])[0]
        return ids

    def encode(self, cleaned: str) -> list[int]:
        if "_of_text>" in cleaned:
            return self._encode_with_literals(cleaned)
        return list(self._encode_many([cleaned])[0]) if cleaned else []

    def tokenize(self, cleaned: list[str], context_length: int) -> np.ndarray:
        token_lists = self._encode_many(cleaned) if cleaned else []
        for row, text in enumerate(cleaned):
            if "_of_text>" in text:  # rare: redo this row the open_clip way
                token_lists[row] = self._encode_with_literals(text)
        return _pack_rows(token_lists, context_length, self._sot, self._eot)

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The shared `Tokenizer.default()` instance (built once; construction costs ~0.1 s)."""
    return Tokenizer.default()


# ---------------------------------------------------------------------------------------------- SigLIP

SIGLIP_CONTEXT_LENGTH = 64
_SPIECE_UNDERLINE = "\u2581"
_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)


def siglip_canonicalize(text: str) -> str:
    """SigLIP's text normalisation (big_vision, transformers' SiglipTokenizer): lowercase, drop ASCII punctuation,
    collapse whitespace runs to one space, strip."""
    return re.sub(r"\s+", " ", text.lower().translate(_ASCII_PUNCTUATION)).strip()


class SentencePieceTokenizer:
    """SigLIP's tokenizer: a SentencePiece model read from a file (no network), ids equal to transformers'
    `SiglipTokenizer(text, padding="max_length", truncation=True, max_length=L, split_special_tokens=True)`.

    Each text: "\u2581" + text (with "\u2581" in the text turned into spaces), `siglip_canonicalize`, SentencePiece
    pieces (encoded behind the unknown-token piece and cut after it, as transformers does, so the model's dummy
    prefix does not depend on the text's first character), then "</s>"; cut to L - 1 pieces + "</s>" when longer,
    padded with "</s>" (SigLIP's pad = eos, id 1 in the released models). Special-token literals in a caption
    ("</s>") stay plain text, as in big_vision (transformers matches them unless `split_special_tokens=True`).
    """

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        path = pathlib.Path(model_file)
        if path.is_dir():
            path = path / "spiece.model"
        if not path.is_file():
            raise FileNotFoundError(f"SigLIP tokenizer: no SentencePiece model at {path} (give the spiece.model file "
                                    "or the Hugging Face checkpoint directory holding it)")
        self.model_file = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        self.name = f"siglip:{self.model_file}"
        self.vocab_size = self._sp.get_piece_size()
        self.unk_token = self._sp.unk_id()
        self._unk_piece = self._sp.id_to_piece(self.unk_token)
        self._unk_length = len(self._sp.encode(self._unk_piece, out_type=str))
        self.eot_token = self.pad_token = self._sp.piece_to_id("</s>")
        if self.eot_token == self.unk_token:
            raise ValueError(f"SigLIP tokenizer: {path} has no '</s>' piece; not a SigLIP SentencePiece model")

    def __reduce__(self):  # grain's workers pickle the pipeline's transforms; the C++ processor cannot be pickled
        return SentencePieceTokenizer, (self.model_file,)

    def encode(self, text: str) -> list[int]:
        """Ids of one text without "</s>"."""
        text = siglip_canonicalize(_SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " "))
        pieces = self._sp.encode(self._unk_piece + text, out_type=str)
        pieces = pieces[self._unk_length:] if len(pieces) >= self._unk_length else pieces
        return [self._sp.piece_to_id(p) for p in pieces]

    def __call__(self, texts: str | Sequence[str], context_length: int = SIGLIP_CONTEXT_LENGTH) -> np.ndarray:
        context_length = _check_context_length(context_length)
        out = np.full((len(texts := _as_text_list(texts)), context_length), self.pad_token, np.int32)
        for row, text in enumerate(texts):
            ids = self.encode(text)[:context_length - 1] + [self.eot_token]
            out[row, :len(ids)] = ids
        return out

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) != self.pad_token])


@functools.lru_cache(maxsize=8)
def siglip_tokenizer(model_file: str | None = None) -> SentencePieceTokenizer:
    """The SigLIP tokenizer of `model_file` (a spiece.model or the HF directory holding it). Training configs name
    it in `config.model.tokenizer_file` (the pipeline then asks for the tokenizer "siglip:<file>")."""
    if not model_file:
        raise ValueError("the siglip tokenizer needs its SentencePiece model: set config.model.tokenizer_file to the "
                         "checkpoint's spiece.model (or pass tokenizer='siglip:<file>' to the Predictor)")
    return SentencePieceTokenizer(model_file)


# Tokenizers by name (`Backbone.tokenizer`, the pipeline's `config.data.tokenizer`): name -> shared instance. A name
# may carry an argument after ":" ("siglip:/ckpt/spiece.model"), handed to the factory.
TOKENIZERS = {"clip": default_tokenizer, "siglip": siglip_tokenizer}


def get_tokenizer(name: str) -> Tokenizer:
    family, _, argument = name.partition(":")
    if family not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(sorted(TOKENIZERS))}")
    return TOKENIZERS[family](argument) if argument else TOKENIZERS[family]()


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    """open_clip-identical CLIP token ids: np.int32 (N, context_length), SOT/EOT, pad 0.

    `texts` is one string or a sequence of strings; a single string gives shape (1, context_length).
    """
    return default_tokenizer()(texts, context_length)


def decode(ids) -> str | list[str]:
    """Text of a token row or of each row of a 2-D array (see `Tokenizer.decode`)."""
    return default_tokenizer().decode(ids)


# ---- Hugging Face tokenizer files ---------------------------------------------------------------------
# Token strings of HF's CLIP vocabulary. Our rows pad with id 0, which is the vocabulary's "!" token, so
# the exported tokenizer pads with "!" (as open_clip-trained HF checkpoints do).
HF_BOS_TOKEN = "<|startoftext|>"
HF_EOS_TOKEN = "<|endoftext|>"
HF_PAD_TOKEN = "!"
_END_OF_WORD = "</w>"


def _byte_alphabet() -> tuple[list[int], dict[int, str]]:
    """The byte-level BPE alphabet of GPT-2/CLIP: the 256 byte values in vocabulary order (printable
    Latin-1 bytes first, then the rest ascending) and the character that stands for each byte in token
    strings (itself if printable, else chr(256 + n) for the n-th non-printable byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return printable + others, chars


# Byte sequences that complete a partial UTF-8 character before / after a token, so that `decode` shows
# the token's bytes instead of U+FFFD: a lead byte (+ continuation bytes) for a token that starts inside
# a character, continuation bytes for one that ends inside a character (0x80/0x90/0xA0 first, to satisfy
# the narrower second-byte ranges after E0, ED, F0 and F4).
_UTF8_HEADS = ((), (0xC2,), (0xE1,), (0xF1,), (0xE1, 0x80), (0xF1, 0x80), (0xF1, 0x80, 0x80))
_UTF8_TAILS = ((),) + tuple((first,) + (0x80,) * extra for extra in range(3) for first in (0x80, 0x90, 0xA0))


def _token_bytes(backend, token_id: int, byte_ids: dict[int, int]) -> tuple[bytes, bool]:
    """(bytes, ends a word) of one vocabulary entry, from `instant_clip_tokenizer.Tokenizer.decode`,
    which joins the entries' bytes, decodes them as UTF-8 (invalid parts become U+FFFD) and shows the
    end-of-word marker as a space."""
    text = backend.decode([token_id])
    end_of_word = text.endswith(" ")
    body = text[:-1] if end_of_word else text
    if "\ufffd" not in body:
        return body.encode("utf-8"), end_of_word
    # Part of a multi-byte character: decode it between bytes that complete the character; the
    # completion with the fewest U+FFFD left is the one that made every byte visible.
    best = None
    for head in _UTF8_HEADS:
        for tail in ((),) if end_of_word else _UTF8_TAILS:
            shown = backend.decode([byte_ids[b] for b in head] + [token_id] + [byte_ids[b] for b in tail])
            raw = (shown[:-1] if end_of_word else shown).encode("utf-8")
            if not (raw.startswith(bytes(head)) and raw.endswith(bytes(tail))):
                continue
            middle = raw[len(head):len(raw) - len(tail)]
            if middle.decode("utf-8", "replace") != body:
                continue
            if best is None or shown.count("\ufffd") < best[0]:
                best = (shown.count("\ufffd"), middle)
    if best is None:
        raise RuntimeError(f"instant-clip-tokenizer: cannot recover the bytes of token {token_id} ({text!r}).")
    return best[1], end_of_word


def _bpe_ids(word_ids: list[int], pair_ranks: dict[tuple[int, int], int], first_merge_id: int) -> list[int]:
    """Byte-pair encoding of one word given as vocabulary ids of its bytes, with the merges in `pair_ranks`
    ((left id, right id) -> rank; merge r creates id first_merge_id + r)."""
    pieces = list(word_ids)
    while len(pieces) > 1:
        rank, i = min((pair_ranks.get((pieces[i], pieces[i + 1]), sot_token), i) for i in range(len(pieces) - 1))
        if rank == sot_token:  # no known pair left (sot_token is beyond every rank)
            break
        pieces[i:i + 2] = [first_merge_id + rank]
    return pieces


@functools.lru_cache(maxsize=1)
def _clip_bpe_from_instant_tokenizer() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(token strings by id, merges by rank) of the vocabulary compiled into instant-clip-tokenizer.

    It has no API for its merge list, but the list is implied by the vocabulary: CLIP's ids are the 256
    bytes, the same with the end-of-word marker, then one id per merge in rank order, then SOT/EOT. So
    merge r is the pair that forms entry 512 + r out of two earlier entries; where several splits of
    the entry are earlier entries, it is the split that BPE with the merges before r produces (the pair
    the merge was learnt from).
    """
    backend = Tokenizer.default()._backend._tok
    order, chars = _byte_alphabet()
    byte_ids = {b: i for i, b in enumerate(order)}
    entries = [(bytes([b]), False) for b in order] + [(bytes([b]), True) for b in order]
    first_merge_id = len(entries)
    ids = {entry: i for i, entry in enumerate(entries)}
    pair_ranks: dict[tuple[int, int], int] = {}
    for token_id in range(first_merge_id, sot_token):
        word, end_of_word = _token_bytes(backend, token_id, byte_ids)
        splits = [(ids.get((word[:k], False)), ids.get((word[k:], end_of_word))) for k in range(1, len(word))]
        splits = [pair for pair in splits if None not in pair]
        if len(splits) != 1:
            word_ids = [byte_ids[b] for b in word]
            word_ids[-1] += 256 if end_of_word else 0
            splits = [tuple(_bpe_ids(word_ids, pair_ranks, first_merge_id))]
        if len(splits[0]) != 2 or (word, end_of_word) in ids:
            raise RuntimeError(f"instant-clip-tokenizer: token {token_id} ({word!r}) is not a new merge of "
                               "two earlier tokens; not the OpenAI CLIP vocabulary.")
        pair_ranks[splits[0]] = token_id - first_merge_id
        ids[(word, end_of_word)] = token_id
        entries.append((word, end_of_word))

    tokens = tuple("".join(chars[b] for b in word) + (_END_OF_WORD if end_of_word else "")
                   for word, end_of_word in entries) + (HF_BOS_TOKEN, HF_EOS_TOKEN)
    merges = tuple((tokens[a], tokens[b]) for a, b in pair_ranks)  # dicts keep insertion (= rank) order
    if len(tokens) != vocab_size:
        raise RuntimeError(f"instant-clip-tokenizer has {len(tokens)} tokens, expected {vocab_size}.")
    return tokens, merges


def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP BPE that `tokenize` uses, in Hugging Face's layout: `(vocab, merges)` with vocab
    {token string: id} (vocab.json) and merges [(left, right)] in rank order (merges.txt).

    Read out of instant-clip-tokenizer (no files, no torch): a few seconds the first time, then cached.
    """
    tokens, merges = _clip_bpe_from_instant_tokenizer()
    return {token: i for i, token in enumerate(tokens)}, list(merges)


def save_hf_tokenizer(path: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH) -> pathlib.Path:
    """Writes a `transformers.CLIPTokenizer` directory for `tokenize`'s vocabulary and row layout.

    Files: vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json.
    `CLIPTokenizer.from_pretrained(path)(texts, padding="max_length", truncation=True)` then gives
    `tokenize(texts, context_length)`'s ids (model_max_length = context_length, pad "!" = id 0) for
    ordinary text; see the module docstring for the cleaning it lacks.
    """
    context_length = _check_context_length(context_length)
    from transformers import CLIPTokenizer  # lazy: only the export needs it

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe()
    special = {"bos_token": HF_BOS_TOKEN, "eos_token": HF_EOS_TOKEN, "unk_token": HF_EOS_TOKEN,
               "pad_token": HF_PAD_TOKEN}
    hf = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length,
                       split_special_tokens=True, **special)
    ids = {name: hf.convert_tokens_to_ids(token) for name, token in special.items()}
    if (ids["bos_token"], ids["eos_token"], ids["pad_token"]) != (sot_token, eot_token, pad_token):
        raise RuntimeError(f"internal: exported tokenizer has special ids {ids}")
    hf.save_pretrained(path)  # tokenizer.json + tokenizer_config.json
    # The plain BPE files too, for readers that build the tokenizer from them.
    with open(path / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(path / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(path / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    return path
