"""Answer extraction from chains of thought, on realistic model outputs, and self-consistency votes."""

from __future__ import annotations

import pytest

from medfoundry.eval.answers import extract_answer, majority_vote

LETTERS4, LETTERS5 = list("ABCD"), list("ABCDE")
YNM = ["yes", "no", "maybe"]
OPTIONS = ["Hypertension", "Type 2 diabetes mellitus", "Hypertension and diabetes", "Asthma"]

LETTER_CASES = [
    ("The answer is (C).", 2),
    ("Answer: C.", 2),
    ("Answer: C", 2),
    ("answer: b", 1),
    ("The answer is: D ###", 3),
    ("C) Hypertension is the most common cause.", 2),
    ("(B) because the patient is young.", 1),
    ("D.", 3),
    ("A", 0),
    ("**Answer:** B", 1),
    ("Therefore, the answer is **D**.", 3),
    ("Final answer: \\boxed{A}", 0),
    ("The correct option is B, since the others are contraindicated.", 1),
    ("The best answer is option C.", 2),
    ("So the answer would be [A].", 0),
    ("The answer is 'B'.", 1),
    ("the answer is c", 2),
    ("The answer is (c) because", 2),
    ("The answer is:\nB\n", 1),
    # a chain of thought weighs options before concluding: the last statement counts
    (
        "Option A is wrong because of the age. Option B fits the labs. The answer is not A. Therefore the answer is B.",
        1,
    ),
    ("Answer: Let's see. The patient has a fever. Thus, the answer is (D).", 3),
    ("The answer is (C). The answer is therefore clear from the history.", 2),
    # statements that commit to no valid choice
    ("A 45-year-old man presents with chest pain.", None),
    ("A. Inhibition of proteasome\nB. Hyperstabilization of microtubules\nC. Generation of free radicals", None),
    ("A. Inhibition of proteasome\nB. Hyperstabilization of microtubules\n\nThe correct answer is:\nC. Generation", 2),
    ("So the answer is a hormone.", None),
    ("The answer is E.", None),  # no option E among four
    ("The answer is A or B.", None),
    ("I am not sure.", None),
    ("", None),
    ("The answer is uncertain.", None),
]


@pytest.mark.parametrize(("text", "expected"), LETTER_CASES)
def test_letters(text, expected):
    assert extract_answer(text, LETTERS4) == expected


def test_five_options_accept_e():
    assert extract_answer("The answer is E.", LETTERS5) == 4
    assert extract_answer("E) Refuse to dictate the operative report", LETTERS5) == 4


WORD_CASES = [
    ("The answer is: maybe", 2),  # Meditron's evaluate.py cannot credit this
    ("Maybe.", 2),
    ("The answer is yes.", 0),
    ("Yes, statins reduce atrial fibrillation after surgery.", 0),
    ("no", 1),
    ("Answer: No. The trial was underpowered.", 1),
    ("The results are mixed, so the answer is maybe ###", 2),
    ("Answer: **Yes**", 0),
    ("The study shows benefit. Therefore, the answer is probably yes.", 0),
    ("The answer is not yes: the answer is no.", 1),
    ("The answer is not clear.", None),
    ("Nobody knows.", None),
    ("The answer is unknown.", None),
]


@pytest.mark.parametrize(("text", "expected"), WORD_CASES)
def test_yes_no_maybe(text, expected):
    assert extract_answer(text, YNM) == expected


OPTION_CASES = [
    ("The answer is hypertension and diabetes.", 2),  # the longest option that matches
    ("The answer is Hypertension.", 0),
    ("The correct answer is type 2 diabetes mellitus, given the HbA1c.", 1),
    ("Asthma", 3),
    ("The answer is the asthma.", 3),
    ("The answer is hyperthyroidism.", None),
]


@pytest.mark.parametrize(("text", "expected"), OPTION_CASES)
def test_option_text(text, expected):
    assert extract_answer(text, LETTERS4, OPTIONS) == expected


def test_letter_beats_option_text_in_the_same_statement():
    assert extract_answer("The answer is (A) Type 2 diabetes mellitus", LETTERS4, OPTIONS) == 0


def test_majority_vote_with_deterministic_ties():
    assert majority_vote([1, 2, 2, None, 1, 2]) == 2
    assert majority_vote([3, 1, 1, 3]) == 3  # tie: the answer seen first
    assert majority_vote([None, 0, None]) == 0
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
