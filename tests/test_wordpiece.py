"""The fast sentence encoder gives the Rust tokenizer's ids exactly, on crafted and real text."""

import json

import pytest

from conftest import SHARED_DATA

from coco_accel.preprocessing.wordpiece import SentenceEncoder

CRAFTED = [
    "The quick brown fox -- jumped over 3.14 lazy dogs!!!", "e.g. U.S.A. (1999) [x] {y} <z> a/b\\c ~`^_|@#$%&*+=",
    "UPPER lower MiXeD 123abc abc123", "tab\tand\nnewline\rreturn", "", "   ", "a" * 150 + " word",
    "Café naïve résumé", "中文字符 mixed with English", "control\x07char here", "nul\x00inside", "zero\u200bwidth",
    "vertical\x0btab and form\x0cfeed", "don't can't won't", "ﬁligature", "x" * 100, "x" * 101,
    "unaffable unaffableness antidisestablishmentarianism", "###", "##ing",
]


def _rust(tokenizer_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = Tokenizer.from_str(AutoTokenizer.from_pretrained(tokenizer_path).backend_tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


def _assert_same(encoder, rust, sentences):
    expected = [e.ids for e in rust.encode_batch(sentences, add_special_tokens=False)]
    got = encoder.encode(sentences)
    for s, a, b in zip(sentences, got, expected):
        assert a == b, f"{s!r}: {a} != {b}"


def test_crafted_sentences_match_rust(tokenizer_path):
    rust = _rust(tokenizer_path)
    encoder = SentenceEncoder(rust)
    assert encoder.fast
    _assert_same(encoder, rust, CRAFTED)
    _assert_same(encoder, rust, CRAFTED)  # second time from the word cache


def test_word_cache_is_bounded(tokenizer_path):
    rust = _rust(tokenizer_path)
    encoder = SentenceEncoder(rust, cache_words=5)
    _assert_same(encoder, rust, [f"w{i} x{i} y{i}" for i in range(50)])
    assert len(encoder.words) <= 5 and len(encoder.chunks) <= 5


def test_other_tokenizers_use_rust_unchanged():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    encoder = SentenceEncoder(tok)
    assert not encoder.fast
    assert encoder.encode(["a b c", ""]) == [[0, 1, 2], []]


@pytest.mark.skipif(not (SHARED_DATA / "cisi").is_dir(), reason="needs ../shared/data/cisi")
def test_real_corpus_sentences_match_rust(tokenizer_path):
    from coco_accel.preprocessing.breaks import load_sentence_splitter

    splitter, _ = load_sentence_splitter()
    sentences = []
    with open(SHARED_DATA / "cisi" / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)
            sentences.extend(splitter.tokenize(f"{doc.get('title', '')} {doc['text']}".strip()))
    rust = _rust(tokenizer_path)
    _assert_same(SentenceEncoder(rust), rust, sentences)


def _spec(rust):
    return json.loads(rust.to_str())


@pytest.mark.parametrize("config_change", [None, {"do_lower_case": False}])
def test_backend_tokenizer_is_what_auto_tokenizer_builds(tmp_path, tokenizer_path, config_change):
    """Read directly when tokenizer.json and tokenizer_config.json agree, through AutoTokenizer otherwise:
    either way the same pipeline as transformers' (truncation and padding off)."""
    import shutil

    from transformers import AutoTokenizer

    from coco_accel.preprocessing.wordpiece import load_backend_tokenizer

    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_path, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    if config_change:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.update(config_change)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    expected = AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer
    expected.no_truncation()
    expected.no_padding()
    got = load_backend_tokenizer(str(folder))
    assert _spec(got) == _spec(expected)
    if config_change:  # the config wins over tokenizer.json in transformers, and so here
        assert _spec(got)["normalizer"]["lowercase"] is False


def test_every_bmp_character_in_context_matches_rust(tokenizer_path):
    """Each character of the Basic Multilingual Plane, inside a word, alone between spaces and next to
    punctuation, in sentences that also hold plain ASCII words: the chunk-by-chunk path (or its
    fallback) gives the Rust tokenizer's ids."""
    rust = _rust(tokenizer_path)
    encoder = SentenceEncoder(rust)
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF]
    for start in range(0, len(chars), 4096):
        sentences = [f"Caf{c}s x{c}y {c} ({c}). pl{c}in ASCII words, {c}{c}" for c in chars[start:start + 4096]]
        _assert_same(encoder, rust, sentences)
    assert len(encoder.raw_chunks) > 1000  # most of them went chunk by chunk, not to Rust whole


def test_unicode_sentences_match_rust(tokenizer_path):
    rust = _rust(tokenizer_path)
    encoder = SentenceEncoder(rust)
    sentences = ["\u201cQuoted\u201d caf\u00e9 \u2013 na\u00efve r\u00e9sum\u00e9\u2019s \u00c9T\u00c9 \u039f\u0394\u039f\u03a3 \u03a3\u0391\u03a3 x",
                 "\u0130stanbul \u0131 \u00df STRASSE \ufb01ne \u2126 \u212a", "a\u0301b\u0327c e\u0308\u0301 \u1100\u1161",
                 "\u4e2d\u6587abc\u5b57 \u3002\u3001 \uff08full\uff09 \uff21\uff22", "emoji \U0001f600 astral \U00010348 x",
                 "nbsp\u00a0word em\u2003space ideo\u3000space zw\u200bj\u200dn", "line\u2028sep para\u2029sep nel\x85x"]
    _assert_same(encoder, rust, sentences)
    _assert_same(encoder, rust, sentences)
