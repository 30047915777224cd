"""The answer a generated chain of thought commits to, and the majority vote of self-consistency.

:func:`extract_answer` returns the index of the chosen choice, or None when the text commits to
none (the question then counts as wrong and the run reports an ``unparsed`` rate). It reads, in
order:

1. answer statements, the last one first (a chain of thought may weigh options before concluding):
   "The answer is (C)", "Answer: C.", "the correct option is B", "Final answer: **D**",
   ``\\boxed{A}``, "The answer is: maybe", "The answer is hypertension" (an option's text);
2. a reply that starts with the answer: "C) ...", "(B)", "D.", "Yes, because ...", "Maybe." (not one
   that recites the options, "A. ...\nB. ...", which commits to none);
3. a reply that starts with an option's text.

Letters are only read as labels where an article cannot be meant: an upper-case letter not followed
by a letter or digit after an answer statement, and at the start of a reply only when followed by
``)``, ``.``, ``:`` or the end ("A 45-year-old man ..." is not an answer). "Maybe" is credited like
"yes" and "no"; Meditron's ``evaluate.py`` only accepts a-e, yes and no, so it can never credit a
correct "maybe" (11% of PubMedQA's labels).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_CUE = re.compile(
    r"\\boxed\{"
    r"|(?:\banswers?\b|\b(?:correct|right|best|final|most likely)\s+(?:option|choice|response)\b)"
    r"(?:\s*(?:is|would\s+be|should\s+be|will\s+be|must\s+be|:|=|-|–|—))+",
    re.IGNORECASE,
)
_FILLER = re.compile(
    r"^(?:\s*(?:therefore|thus|then|clearly|likely|most\s+likely|probably|definitely|indeed|"
    r"option|choice|letter|the|[\"'`\[(]))*\s*",
    re.IGNORECASE,
)
_LETTER = re.compile(r"^([A-Za-z])(?:\)|\]|\}|(?![A-Za-z0-9]))")  # an opening bracket went with the filler
_LOWER_LABEL = re.compile(r"^[a-z](?:\)|\]|[.:]?\s*(?:$|\n))")
_AMBIGUOUS = re.compile(r"^\s*(?:or|and|/|,)\s*\(?[A-Za-z](?![A-Za-z0-9])", re.IGNORECASE)
_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Za-z])(?:[).:]|\s*$))")
_MARKUP = re.compile(r"\*\*|__|`")
_LISTED = re.compile(r"^\s*\(?([A-Z])[).:]", re.MULTILINE)


def extract_answer(text: str, choices: Sequence[str], options: Sequence[str] | None = None) -> int | None:
    """Index into ``choices`` of the answer ``text`` commits to; None when it commits to none."""
    text = _MARKUP.sub("", text)
    parsers = [_letter_at_start if _are_letters(choices) else _word_at_start]
    for match in reversed(list(_CUE.finditer(text))):
        tail = _FILLER.sub("", text[match.end() :], count=1)
        found = _first_parse(tail, choices, options, parsers + [_option_at_start], strict=False)
        if found is not None:
            return found
    start = text.lstrip()
    return _first_parse(start, choices, options, parsers + [_option_at_start], strict=True)


def _first_parse(tail: str, choices, options, parsers, *, strict: bool) -> int | None:
    for parse in parsers:
        found = parse(tail, choices, options, strict)
        if found is not None:
            return found
    return None


def _are_letters(choices: Sequence[str]) -> bool:
    return all(len(c) == 1 and c.isalpha() and c.isupper() for c in choices)


def _letter_at_start(tail: str, choices, options, strict: bool) -> int | None:
    """A choice letter opening ``tail``. After an answer statement a bare capital counts ("is C because");
    lower case only in brackets or alone ("is (c)", "is c."). At the start of a reply the letter must be
    closed by ``)``, ``.``, ``:`` or the end, so that "A patient ..." is not read as option A."""
    if strict:
        match = _LEADING_LETTER.match(tail)
        letter = match and (match.group(1) or match.group(2))
        if letter and len(set(_LISTED.findall(tail))) > 1:  # the reply recites the options: no commitment
            return None
    else:
        match = _LETTER.match(tail)
        letter = match and match.group(1)
        if letter and letter.islower() and not _LOWER_LABEL.match(tail):
            return None
        if match and _AMBIGUOUS.match(tail[match.end() :]):
            return None
    if not letter or letter.upper() not in choices:
        return None
    return list(choices).index(letter.upper())


def _word_at_start(tail: str, choices, options, strict: bool) -> int | None:
    """A choice word (yes / no / maybe, or any word choices) opening ``tail``, case-insensitively."""
    lowered = tail.lower()
    for i, choice in sorted(enumerate(choices), key=lambda item: -len(item[1])):
        if re.match(rf"^{re.escape(choice.lower())}(?![A-Za-z0-9])", lowered):
            return i
    return None


def _option_at_start(tail: str, choices, options, strict: bool) -> int | None:
    """An option's text opening ``tail`` (the longest that matches, so "X and Y" beats "X")."""
    if not options:
        return None
    norm = _normalize(tail)
    matches = [
        (len(opt), i)
        for i, opt in enumerate(map(_normalize, options))
        if opt and norm.startswith(opt) and not norm[len(opt) : len(opt) + 1].isalnum()
    ]
    return max(matches)[1] if matches else None


def _normalize(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def majority_vote(answers: Sequence[int | None]) -> int | None:
    """The most frequent parsed answer; on a tie the one that appeared first. None when none parsed."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)
