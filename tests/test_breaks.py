"""Punkt break decisions from per-word facts == nltk's own, context by context."""

import json
import random
import re

import pytest

from conftest import SHARED_DATA

from coco_accel.preprocessing.breaks import BreakDecider, PunktSentences
from coco_accel.preprocessing.breaks import forget_breaks, load_sentence_splitter

CRAFTED = [
    "Dr. Smith went to Washington. He arrived at 5 p.m. on Tuesday. Mr. and Mrs. Jones followed.",
    "The U.S. economy grew 3.5% in 2019. It was e.g. better than expected, i.e. good. See Fig. 2. Then stop.",
    "J. R. R. Tolkien wrote it. A. Smith replied... And then? Yes! No!! Maybe?! (Really.) \"Quoted.\" 'Single.'",
    "Version 2.0. Next version 3. 4. Items: 1. first 2. second. etc. Also vs. them. Jan. 5 was cold.",
    "He said -- wait. ... Ellipsis at start. Ends with ellipsis... Lower case after. lower start. 12. 13. Done.",
    "St. Louis, Mo. is a city. Co. Ltd. Inc. Corp. are suffixes. No. 5 is a number. pp. 12-14. Vol. 3. Ch. 4.",
    "a. b. c. Single letters. X. Y. Z. Upper initials. The end.", "Mid-sentence abbr. like approx. 5 kg. Fine.",
    "Rated No. 1. Business is good. Up 3. Credit grew. In 1987. International sales rose. Item 2. Dividend paid.",
    "Calif. However it rained. Corp. Meanwhile they left. Aug. Although late. Co. Moreover. Ala. He came.",
    "(Sent one.) Sent two. \"Quoted end.\" Next. [Bracket.] After. {Brace!} x. 'Single?' y. Ends in quote.\"",
    " Leading space. Trailing space. ", "", " ", "\n", "A.\n\n", "x (a.) b", "Hi!!! There.", "End.)",
    "a.) (b.) c.\" d", "e.g. -- no. Yes--. Then.", "Caf\u00e9 ferm\u00e9. Ouvert \u00e0 9 h. \u201cQuot\u00e9.\u201d Fin.",
    "Form\x0cfeed. Unit\x1fsep. End.", "Stop.\x1cStart here. Another.\x1fOne more. Record.\x1eGroup.\x1dEnd.", "Vert\x0btab. Next\x1c one. Line\x85next. Nb\u00a0space. Em\u2003space. Ok.",
    "\u201cCurly.\u201d Then \u2018single.\u2019 \u00abGuillemet.\u00bb Done\u2014dash. \u03a3\u03bf\u03c6. \u00c9t\u00e9 Dr. X.", "\tTabbed. Lines.\n\nNew paragraph. End.\n", "No break at all",
    "Sentence one.Sentence two without space. Tab\tseparated. Two  spaces.  Three.", "?", ".", "...", "Ok. ",
]


def _contexts(splitter, texts):
    out = set()
    for text in texts:
        for _, context in splitter._match_potential_end_contexts(text):
            out.add(context)
    return out


def _assert_same(texts):
    splitter, _ = load_sentence_splitter()
    nltk_splitter = forget_breaks(splitter)  # nltk's own decision, nothing remembered
    fast = BreakDecider(nltk_splitter)
    contexts = _contexts(nltk_splitter, texts)
    assert contexts
    wrong = [c for c in contexts if fast(c) != nltk_splitter.text_contains_sentbreak(c)]
    assert not wrong, wrong[:10]
    # and whole documents split alike
    for text in texts:
        a = list(nltk_splitter.span_tokenize(text))
        nltk_splitter.text_contains_sentbreak = fast
        b = list(nltk_splitter.span_tokenize(text))
        del nltk_splitter.text_contains_sentbreak
        assert a == b, text
    # and nltk's whole tokenize(), rewritten on `re` (realignment included), gives the same sentences,
    # also with typographic punctuation and other Unicode put in (only U+001C-U+001F go to nltk)
    sentences = PunktSentences(splitter)
    unicode = str.maketrans({'"': "\u201d", "'": "\u2019", "-": "\u2013", "e": "\u00e9", " ": "\u00a0", ",": "\u3001"})
    variants = texts + [t.translate(unicode) for t in texts[::7]]
    wrong = [t for t in variants if sentences(t) != nltk_splitter.tokenize(t)]
    assert not wrong, wrong[:3]
    fast = [t for t in variants if sentences.unsafe is None or not sentences.unsafe.search(t)]
    assert len(fast) > 0.85 * len(variants)  # the Unicode variants took the rewritten path
    return len(contexts)


def test_crafted_contexts_match_nltk():
    _assert_same(CRAFTED + [t.replace(". ", ".\n") for t in CRAFTED] + [t.lower() for t in CRAFTED])


def test_docstring_contexts_match_nltk():
    from coco_accel.preprocessing.docstrings import docstring_documents

    texts = [f"{d.get('title', '')} {d['text']}".strip() for d in docstring_documents()]
    assert _assert_same(texts) > 1000


@pytest.mark.skipif(not (SHARED_DATA / "cisi").is_dir(), reason="needs ../shared/data/cisi")
def test_cisi_contexts_match_nltk_also_mixed():
    docs = [json.loads(line) for line in open(SHARED_DATA / "cisi" / "corpus.jsonl", encoding="utf-8")]
    texts = [f"{d.get('title', '')} {d['text']}".strip() for d in docs]
    pool = [s for t in texts for s in re.split(r"(?<=[.!?])\s+", t) if s]
    rng = random.Random(0)
    mixed = [" ".join(rng.choice(pool) for _ in range(8)) for _ in range(3000)]
    assert _assert_same(texts + mixed) > 5000


def test_nltk_is_imported_without_scipy_which_stays_importable():
    """Loading the splitter does not import scipy (0.4 s for a test Punkt never runs); scipy still imports
    afterwards, and the splitter works."""
    import subprocess
    import sys

    pytest.importorskip("scipy")
    code = ("import sys; from coco_accel.preprocessing.breaks import load_sentence_splitter; s, _ = load_sentence_splitter(); "
            "assert 'scipy' not in sys.modules, 'scipy imported'; "
            "assert s.tokenize('Dr. Smith left. He came back.') == ['Dr. Smith left.', 'He came back.']; "
            "import scipy.stats; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
