"""Punkt's sentence-break decision, the same answers as nltk's, computed from per-word facts kept in memory.

nltk's `PunktSentenceTokenizer.text_contains_sentbreak(context)` decides whether a candidate break
("study. The") is one: it splits the short context into words, annotates each word on its own
(first pass: sentence-final punctuation, abbreviation, ellipsis) and then each word given the next
(second pass: collocations, abbreviations and initials followed by a sentence starter, numbers,
orthographic evidence), and answers True when an annotated break has a word after it. Everything
in the first pass and every fact the second pass reads depends on one word alone, so those facts are
computed once per distinct word; the second pass itself is a few comparisons. Contexts with a line
break (where nltk's paragraph bookkeeping applies) go to nltk. `tests/test_breaks.py` checks the
answers against nltk's on every context of real corpora and on crafted cases.
"""

from __future__ import annotations

from typing import NamedTuple

# nltk's own orthographic-context bits, so that both read the trained parameters alike
from nltk.tokenize.punkt import _ORTHO_BEG_LC as _BEG_LC
from nltk.tokenize.punkt import _ORTHO_LC as _LC
from nltk.tokenize.punkt import _ORTHO_MID_UC as _MID_UC
from nltk.tokenize.punkt import _ORTHO_UC as _UC


class _Word(NamedTuple):
    sentbreak: bool  # after the first pass
    abbr: bool
    ellipsis: bool
    period_final: bool
    type: str
    type_no_period: str
    is_initial: bool
    first_upper: bool
    first_lower: bool
    punctuation: bool  # one of ; : , . ! ?


class BreakDecider:
    """A drop-in for `splitter.text_contains_sentbreak(context)` of an nltk Punkt splitter."""

    def __init__(self, splitter, limit: int = 1 << 20):
        self.splitter = splitter
        self.fallback = type(splitter).text_contains_sentbreak.__get__(splitter)  # nltk's own method
        self.params = splitter._params
        self.lang = splitter._lang_vars
        self.token_cls = splitter._Token
        self.words: dict[str, _Word] = {}
        self.limit = limit

    def _word(self, tok: str) -> _Word:
        word = self.words.get(tok)
        if word is not None:
            return word
        t = self.token_cls(tok)  # nltk's token: its type and pattern tests are used as they are
        sentbreak = abbr = ellipsis = False
        if tok in self.lang.sent_end_chars:
            sentbreak = True
        elif t.is_ellipsis:
            ellipsis = True
        elif t.period_final and not tok.endswith(".."):
            stem = tok[:-1].lower()
            if stem in self.params.abbrev_types or stem.split("-")[-1] in self.params.abbrev_types:
                abbr = True
            else:
                sentbreak = True
        word = _Word(sentbreak, abbr, ellipsis, t.period_final, t.type, t.type_no_period, bool(t.is_initial),
                     t.first_upper, t.first_lower, tok in self.splitter.PUNCTUATION)
        if len(self.words) >= self.limit:
            self.words.clear()
        self.words[tok] = word
        return word

    def _ortho(self, word: _Word, no_sentperiod: str):
        """nltk's orthographic heuristic: True (starts a sentence), False, or "unknown"."""
        if word.punctuation:
            return False
        ctx = self.params.ortho_context[no_sentperiod]
        if word.first_upper and (ctx & _LC) and not (ctx & _MID_UC):
            return True
        if word.first_lower and ((ctx & _UC) or not (ctx & _BEG_LC)):
            return False
        return "unknown"

    def _second_pass(self, w1: _Word, w2: _Word, sentbreak: bool, abbr: bool) -> tuple[bool, bool]:
        """(sentbreak, abbr) of w1 once the next word w2 is known."""
        if not w1.period_final:
            return sentbreak, abbr
        typ = w1.type_no_period
        next_typ = w2.type_no_period if w2.sentbreak else w2.type  # w2 carries first-pass marks only
        if (typ, next_typ) in self.params.collocations:
            return False, True
        if (abbr or w1.ellipsis) and not w1.is_initial:
            if self._ortho(w2, next_typ) is True:
                return True, abbr
            if w2.first_upper and next_typ in self.params.sent_starters:
                return True, abbr
        if w1.is_initial or typ == "##number##":
            starter = self._ortho(w2, next_typ)
            if starter is False:
                return False, True
            if (starter == "unknown" and w1.is_initial and w2.first_upper
                    and not (self.params.ortho_context[next_typ] & _LC)):
                return False, True
        return sentbreak, abbr

    def __call__(self, context: str) -> bool:
        if "\n" in context:
            return self.fallback(context)
        if not context.strip():
            return False
        words = [self._word(tok) for tok in self.lang.word_tokenize(context)]
        found = False
        for i, w in enumerate(words):
            if found:
                return True
            sentbreak = w.sentbreak
            if i + 1 < len(words):
                sentbreak, _ = self._second_pass(w, words[i + 1], w.sentbreak, w.abbr)
            if sentbreak:
                found = True
        return False
