"""harmoclip_jax.tokenizer against open_clip's real SimpleTokenizer (loaded from its file, no torchvision)."""
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from harmoclip_jax.testing.reference import open_clip_file_module
from hypothesis import given, settings
from hypothesis import strategies as st

from harmoclip_jax import tokenizer as tok

HARD_STRINGS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "&amp;",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&amp;amp;",  # double-escaped: open_clip unescapes twice
    "fish &amp;amp;amp; chips",
    "<b>x</b> &amp;amp; y",  # with a "<" ftfy leaves entities alone; our two unescapes matter
    "&quot;quoted&quot; &#39;x&#39; &nbsp;nbsp",
    "ﬁsh ﬂower ﬀ",  # ligatures, fixed by ftfy
    "Ǆ ǅ ǆ",  # ftfy splits these digraphs
    "🐱 cat 😀 👍🏽 👨‍👩‍👧",
    "café naïve résumé Ångström straße İstanbul",
    "e\u0301 composed by NFC",
    "東京タワー 北京 서울 ภาษาไทย",
    "Привет мир, Ελληνικά",
    "12345 3.14 1,000,000 ½ ③ ٣",
    '"double" \'single\' “curly” ‘quotes’ «guillemets»',
    "it's the dog's bone, they're we've I'm you'll he'd don't",
    "IT'S WE'LL",
    "  multi   spaces\n\nnew\tlines\r\nand\ttabs  ",
    "a\u3000b\u00a0c\u2009d",
    "MiXeD CaSe WoRdS",
    "hello!!!??? ... --- ***",
    "a <end_of_text> b",  # open_clip matches its special literals inside text
    "<START_OF_TEXT>x",
    "!!<end_of_text>",  # ...unless a punctuation run swallows the "<"
    "<|endoftext|> <|startoftext|>",  # HF's specials are plain text to open_clip
    "<|endoftext|>:",  # ...and a punctuation run continues through them
    "<i>e&#769;</i> stays decomposed",  # with a "<" ftfy skips entities, so no NFC after ours
    "\u200b zero width \ufeff bom",
    "control\x00\x07chars\x7f",
    "mojibake: cafÃ©",
    "",
    "   \n\t  ",
    "x" * 300,
    "word " * 100,
    " ".join(f"token{i}" for i in range(60)),
]


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    """open_clip.tokenizer loaded by path: `import open_clip` would need torchvision."""
    return open_clip_file_module("tokenizer")


def reference(open_clip_tokenizer, texts, context_length=77):
    return open_clip_tokenizer.tokenize(texts, context_length=context_length).numpy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The Hugging Face tokenizer directory our exporter writes (vocab read out of instant-clip-tokenizer)."""
    return tok.save_hf_tokenizer(tmp_path_factory.mktemp("hf_clip_tokenizer"))


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir):
    return tok.Tokenizer.from_hf_dir(hf_dir)


def test_default_matches_open_clip_on_hard_strings(open_clip_tokenizer):
    ours = tok.tokenize(HARD_STRINGS)
    want = reference(open_clip_tokenizer, HARD_STRINGS)
    assert ours.dtype == np.int32 and ours.shape == (len(HARD_STRINGS), 77)
    mismatched = [s for s, a, b in zip(HARD_STRINGS, ours, want) if not np.array_equal(a, b)]
    assert not mismatched
    # The raw instant-clip-tokenizer does NOT clean: without our cleaning these would differ.
    import instant_clip_tokenizer

    raw = instant_clip_tokenizer.Tokenizer().tokenize_batch(HARD_STRINGS, 77).astype(np.int32)
    assert not np.array_equal(raw, want)


def test_clip_bpe_is_open_clips_vocabulary_and_merges(open_clip_tokenizer):
    """The vocabulary read out of instant-clip-tokenizer is open_clip's bundled BPE, id for id and rank for rank."""
    vocab, merges = tok.clip_bpe()
    reference = open_clip_tokenizer._tokenizer
    specials = {"<start_of_text>": tok.HF_BOS_TOKEN, "<end_of_text>": tok.HF_EOS_TOKEN}  # open_clip's spelling
    assert vocab == {specials.get(token, token): i for token, i in reference.encoder.items()}
    assert merges == sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)
    assert (vocab[tok.HF_BOS_TOKEN], vocab[tok.HF_EOS_TOKEN], vocab[tok.HF_PAD_TOKEN]) == (
        tok.sot_token, tok.eot_token, tok.pad_token)


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.json+merges.txt"])
def test_saved_hf_tokenizer_gives_our_ids_in_plain_transformers(tmp_path, files):
    """What a transformers user gets from the export: our ids for ordinary text, padding, truncation at the
    context length, "!" and "<|endoftext|>" inside captions as plain text, from either set of files."""
    from transformers import AutoTokenizer

    directory = tok.save_hf_tokenizer(tmp_path / "tokenizer", context_length=16)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (directory / name).is_file(), name
    if files != "tokenizer.json":
        (directory / "tokenizer.json").unlink()
    hf = AutoTokenizer.from_pretrained(directory)
    assert hf.model_max_length == 16 and (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (49406, 49407, 0)
    texts = ["A photo of a CAT!!", "Wow!!! :-) #tag @user $5 100% ...", "  two   DOGS\tplaying ", "it's WE'LL",
             "<|endoftext|> and <|startoftext|> x", "café naïve 東京 😀", "", "word " * 40]
    ids = hf(texts, padding="max_length", truncation=True)["input_ids"]
    np.testing.assert_array_equal(np.array(ids), tok.tokenize(texts, context_length=16))


def test_hf_dir_matches_open_clip_on_hard_strings(open_clip_tokenizer, hf_tokenizer):
    ours = hf_tokenizer(HARD_STRINGS)
    want = reference(open_clip_tokenizer, HARD_STRINGS)
    assert ours.dtype == np.int32
    mismatched = [s for s, a, b in zip(HARD_STRINGS, ours, want) if not np.array_equal(a, b)]
    assert not mismatched
    assert (hf_tokenizer.sot_token, hf_tokenizer.eot_token) == (tok.sot_token, tok.eot_token)
    assert hf_tokenizer.vocab_size == tok.vocab_size


# Any assigned character except the documented deviation U+0345 (see the module docstring);
# Cn/Cs excluded: unassigned code points are classified differently by `regex`'s newer tables.
_CHARACTERS = st.characters(blacklist_categories=("Cs", "Cn"), blacklist_characters="\u0345")
_PIECES = st.one_of(
    st.text(_CHARACTERS, max_size=12),
    st.text("abcXYZ019 '.,!?\n\t", max_size=12),
    st.sampled_from(["&amp;", "&amp;amp;", "&lt;", "&gt;", "&quot;", "&#39;", "'s", "'LL", "ﬁ",
                     "<end_of_text>", "<|endoftext|>", "e\u0301", "\u00a0", "Ǆ", "😀"]),
)
_CAPTIONS = st.lists(_PIECES, max_size=8).map("".join)


@settings(max_examples=int(os.environ.get("TOKENIZER_FUZZ_EXAMPLES", 60)), deadline=None)
@given(texts=st.lists(_CAPTIONS, min_size=1, max_size=4), context_length=st.sampled_from([4, 77]))
def test_random_text_matches_open_clip(open_clip_tokenizer, hf_tokenizer, texts, context_length):
    want = reference(open_clip_tokenizer, texts, context_length)
    np.testing.assert_array_equal(tok.tokenize(texts, context_length), want)
    np.testing.assert_array_equal(hf_tokenizer(texts, context_length), want)


@pytest.mark.parametrize("context_length", [2, 3, 5, 16, 77, 100])
@pytest.mark.parametrize("backend", ["default", "hf"])
def test_context_lengths_and_truncation(open_clip_tokenizer, hf_tokenizer, backend, context_length):
    texts = ["", "a", "a photo of a cat", "word " * 100, "x" * 300, "ﬁsh &amp; chips " * 20]
    tokenizer = tok.default_tokenizer() if backend == "default" else hf_tokenizer
    ours = tokenizer(texts, context_length=context_length)
    np.testing.assert_array_equal(ours, reference(open_clip_tokenizer, texts, context_length))
    assert ours.shape == (len(texts), context_length)
    # Every row keeps an EOT, also when cut (the text encoder pools at argmax == EOT).
    assert (ours == tok.eot_token).any(axis=1).all()


def test_row_layout():
    ids = tok.tokenize(["a photo of a cat", "word " * 100, ""])
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 0).all()
    assert ids[1, 0] == tok.sot_token and ids[1, -1] == tok.eot_token
    assert (ids[1, 1:-1] == 2653).all()  # "word", cut to fit
    assert ids[2, :2].tolist() == [49406, 49407] and (ids[2, 2:] == 0).all()


def test_input_forms():
    single = tok.tokenize("A cat")
    assert single.shape == (1, 77)
    for form in (["A cat"], ("A cat",), np.array(["A cat"]), (t for t in ["A cat"])):
        np.testing.assert_array_equal(tok.tokenize(form), single)
    empty = tok.tokenize([])
    assert empty.shape == (0, 77) and empty.dtype == np.int32
    assert tok.tokenize(["a"], context_length=np.int64(8)).shape == (1, 8)


@pytest.mark.parametrize(
    "texts, error, message",
    [
        ([b"bytes caption"], TypeError, "item 0 is bytes"),
        (b"bytes caption", TypeError, "decode them first"),
        (["ok", 3], TypeError, "item 1 is int"),
        (["ok", None], TypeError, "item 1 is NoneType"),
        (42, TypeError, "str or a sequence of str"),
        (np.array([["a"]]), ValueError, "1-D array"),
    ],
)
def test_bad_texts(texts, error, message):
    with pytest.raises(error, match=message):
        tok.tokenize(texts)


@pytest.mark.parametrize(
    "context_length, error", [(1, ValueError), (0, ValueError), (-5, ValueError),
                              (7.0, TypeError), (True, TypeError), (None, TypeError)]
)
def test_bad_context_length(context_length, error):
    with pytest.raises(error, match="context_length"):
        tok.tokenize(["a"], context_length=context_length)


def test_decode_and_encode(open_clip_tokenizer, hf_tokenizer):
    ids = tok.tokenize(["A Photo of a CAT &amp; a dog", "x"])
    assert tok.decode(ids[0]) == "a photo of a cat & a dog"
    assert tok.decode(ids) == ["a photo of a cat & a dog", "x"]
    assert hf_tokenizer.decode(ids[0]) == "a photo of a cat & a dog"
    text = "Café ﬁsh &amp;amp; it's"
    assert tok.default_tokenizer().encode(text) == open_clip_tokenizer._tokenizer.encode(text)
    assert hf_tokenizer.encode(text) == open_clip_tokenizer._tokenizer.encode(text)
    with pytest.raises(ValueError, match="outside"):
        tok.decode([49406, 60000])


def test_pickle_round_trip(hf_tokenizer):
    """grain's spawned workers pickle map transforms, and with them any tokenizer they hold."""
    texts = ["a photo of a cat", "ﬁsh &amp; chips"]
    for tokenizer in (tok.default_tokenizer(), hf_tokenizer):
        clone = pickle.loads(pickle.dumps(tokenizer))
        assert clone is not tokenizer and repr(clone) == repr(tokenizer)
        np.testing.assert_array_equal(clone(texts), tokenizer(texts))


def test_from_hf_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        tok.Tokenizer.from_hf_dir(tmp_path / "missing")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        tok.Tokenizer.from_hf_dir(tmp_path)


def test_runtime_needs_no_torch_open_clip_or_transformers(tmp_path):
    """The default tokenizer and `clip_bpe` must work in an install with only the runtime requirements."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent(
        """
        import sys
        BLOCKED = ("torch", "open_clip", "transformers", "torchvision", "tensorflow")

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked import of {name}")
                return None

        sys.meta_path.insert(0, Blocker())
        from harmoclip_jax.tokenizer import tokenize
        ids = tokenize(["a photo of a cat", "&amp; ﬁsh"])
        assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407], ids[0]
        assert ids[1, :4].tolist() == [49406, 261, 2759, 49407], ids[1]
        from harmoclip_jax.tokenizer import clip_bpe  # the exporter's vocabulary needs no files either
        vocab, merges = clip_bpe()
        assert len(vocab) == 49408 and merges[0] == ("i", "n"), merges[0]
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
