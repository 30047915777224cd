"""TextCleaner and QualityFilter: unit cases, then checks on the real corpus files."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from conftest import shared
from medfoundry.corpus.clean import LANGID_PREFIX, QualityFilter, TextCleaner, _clearly_english, _language_identifier
from medfoundry.corpus.config import CleanConfig
from medfoundry.errors import ConfigError

BODY = "Treatment reduced mortality in older patients."


def clean(text: str, **options) -> str:
    return TextCleaner(CleanConfig(**options)).clean(text)


def read_jsonl_gz(relpath: str) -> list[dict]:
    with gzip.open(shared(relpath), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def abstract_texts() -> list[str]:
    return [f"{r['title'] or ''}\n\n{r['abstract'] or ''}" for r in read_jsonl_gz("corpus/pubmed_abstracts.jsonl.gz")]


# --- TextCleaner ---------------------------------------------------------------------------------


def test_unicode_forms():
    text = "Cafe\u0301 \ufb01brosis"  # decomposed é, "fi" ligature
    assert clean(text, unicode_form="NFC") == "Café \ufb01brosis"
    assert clean(text, unicode_form="NFKC") == "Café fibrosis"
    assert clean(text, unicode_form="none") == text


def test_control_characters_and_mis_decoded_bytes():
    assert clean("a\x00b\x07c\ufeffd\u200be\tf") == "abcde f"
    assert clean("ranges 1\x964 and ours\xe2\x80\x94theirs") == "ranges 1–4 and ours—theirs"


def test_whitespace_keeps_paragraphs_and_headings():
    text = "  ## Methods  \r\n\r\nWe  measured\t\tthe\u00a0dose .  \n\n\n\n## Results\nIt  worked ! \n"
    assert clean(text) == "## Methods\n\nWe measured the dose.\n\n## Results\nIt worked!"


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "P &lt; 0.05 and &gt;2-fold; &quot;barcode&quot; of SK&amp;F 108566",
            'P < 0.05 and >2-fold; "barcode" of SK&F 108566',
        ),
        ("52&amp;emsp14;mol%; 4.4&ndash;8.2%; 80 &mgr;m; TGF-&bgr;1, NF-&kgr;B, DEN4&Dgr;30", None),
        ("AT&T, R&D and SK&F stay; so does &unknown;", "AT&T, R&D and SK&F stay; so does &unknown;"),
        ("cancer progression &NA; The neutrophil pathway", "cancer progression\n\nThe neutrophil pathway"),
        ("Title\n\n&NA; Immune cells communicate.", "Title\n\nImmune cells communicate."),
    ],
)
def test_entities_decoded(text, expected):
    expected = expected or "52 mol%; 4.4–8.2%; 80 μm; TGF-β1, NF-κB, DEN4Δ30"
    assert clean(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ('BACKGROUND: id="Par1">Many pregnant women', "BACKGROUND: Many pregnant women"),
        ('REGISTRATION: xmlns:ns0="http://www.w3.org/1999/xlink" id="Par4">NCT02371954.', "REGISTRATION: NCT02371954."),
        ('ABSTRACT.AIMS: id="ejhf642-para-0006">Haemodynamic', "ABSTRACT.AIMS: Haemodynamic"),
        ('Patients said "no" and id="x" was "kept" > 2 times.', None),  # quotes without `">` are text
    ],
)
def test_xml_attribute_debris(text, expected):
    assert clean(text) == (expected or text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A title.\n\nUNLABELLED: Bile acid transport.", "A title.\n\nBile acid transport."),
        ("A title.\n\nUNLABELLED Immune cells promote it.", "A title.\n\nImmune cells promote it."),
        ("A title.\n\nUNLABELLED : Visualizing genes.", "A title.\n\nVisualizing genes."),
        ("in healthy volunteers. UNLABELLED Although effective, it", "in healthy volunteers. Although effective, it"),
        ("Cells were UNLABELLED controls.", None),  # not a label: mid-sentence
    ],
)
def test_unlabelled_placeholder(text, expected):
    assert clean(text) == (expected or text)


def test_urls_removed_with_their_brackets():
    text = "Data are at https://example.org/data?id=3. See (www.trials.org/x) or http://a.b/c, then stop."
    assert clean(text) == "Data are at. See or, then stop."
    assert clean(text, remove_urls=False) == text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("as shown [3].", "as shown."),
        ("prior work [2, 3], and [4–6] agree [1-3,7].", "prior work, and agree."),
        ("after anesthesia.[1] Patients", "after anesthesia. Patients"),
        ("[Ca2+]i rose; [18F]FDG uptake [95% CI 1.2-3.4] fell", "[Ca2+]i rose; [18F]FDG uptake [95% CI 1.2-3.4] fell"),
        ("median 36 [11-83] days, age 56 yr [36-69], 5580 pmol/L [4320-6786]", None),
        ("PTHrP[1-34] and [1,2]-Wittig and [1,2,4]triazole", None),
    ],
)
def test_bracket_refs(text, expected):
    assert clean(text) == (text if expected is None else expected)
    assert clean(text, remove_bracket_refs=False) == text


@pytest.mark.parametrize(
    "notice",
    [
        "Copyright © 2015 Elsevier Ltd. All rights reserved.",
        "© 2020 The Authors.",
        "This article is protected by copyright. All rights reserved.",
        "Published by Elsevier B.V.",
        "(c) 2009 Wiley-Liss, Inc.",
        "All rights reserved.",
        "Copyright 2001 S. Karger AG, Basel",
        "©2016 AACR.",
        "\ufffd 2012 Wiley Periodicals, Inc.",
        "© 2015 The Authors. Ultrasound in Obstetrics & Gynecology published by John Wiley & Sons Ltd on behalf "
        "of the International Society of Ultrasound in Obstetrics and Gynecology.",
        "(PsycINFO Database Record (c) 2019 APA, all rights reserved).",
        "(ABSTRACT TRUNCATED AT 250 WORDS)",
    ],
)
def test_trailing_notices_removed(notice):
    assert clean(f"{BODY} {notice}") == BODY
    assert clean(f"{BODY}\n{notice}\n\nNext paragraph.") == f"{BODY}\n\nNext paragraph."
    assert clean(f"{BODY} {notice}", remove_boilerplate=False) == f"{BODY} {notice}"


def test_notice_at_start_takes_only_its_sentences():
    text = "© Joanna Moncrieff 2013. All rights reserved. A challenging reappraisal of antipsychotics, " + "x " * 80
    assert clean(text).startswith("A challenging reappraisal")


def test_trademark_sign_is_not_a_notice():
    text = "Simvastatin was compared with Zocor©, in 43 volunteers. Copyright law is not discussed."
    assert clean(text) == text


@pytest.mark.parametrize(
    "sentence",
    [
        "We compared (a) 1995 births, (b) 2000 births and (c) 2005 births.",
        "We reviewed how the Copyright Office registers software.",
        "Published 2019 data from the registry were analysed.",
        "Copyright 2010 law reforms were studied.",
    ],
)
def test_text_that_only_looks_like_a_notice_is_kept(sentence):
    after = "Mortality fell in every cohort and most claims were approved."
    for text in (f"{BODY} {sentence} {after}", f"{BODY} {sentence}", f"{sentence} {after}", f"{BODY}\n{sentence}"):
        assert clean(text) == text


def test_notice_followed_by_running_text_takes_only_its_sentence():
    text = f"{BODY} Copyright © 2015 Elsevier Inc. Mortality fell in every cohort."
    assert clean(text) == f"{BODY} Mortality fell in every cohort."


def test_real_abstracts_lose_their_notices():
    texts = abstract_texts()
    cleaner = TextCleaner(CleanConfig())
    notice = re.compile(r"All rights reserved|(?:Copyright|©) ?\d{4}|\(ABSTRACT TRUNCATED|ELECTRONIC SUPPLEMENTARY")
    before = sum(bool(notice.search(t)) for t in texts)
    cleaned = [cleaner.clean(t) for t in texts]
    after = [t for t in cleaned if notice.search(t)]
    assert before > 350  # 492 abstracts carry one of the notices handled
    assert after == []
    assert all(cleaner.clean(t) == t for t in cleaned[:3000])  # idempotent


@pytest.mark.parametrize(
    "pattern, count",
    [
        (r"&#?\w+;", 345),  # &lt; &gt; &quot; &amp; &NA; &bgr; ...
        (r'(?<![\w:-])(?!xmlns)[\w:-]+="[^"\n]*">', 78),  # id="Par1"> after a section label
        (r"xmlns:", 364),
        (r"UNLABELLED", 54),
    ],
)
def test_real_abstracts_lose_markup_debris(pattern, count):
    cleaner = TextCleaner(CleanConfig())
    texts = [t for t in abstract_texts() if re.search(pattern, t)]
    assert len(texts) == count
    assert [t for t in map(cleaner.clean, texts) if re.search(pattern, t)] == []


# --- QualityFilter -------------------------------------------------------------------------------

ENGLISH = (
    "Patients with acute heart failure were randomized to intravenous furosemide or placebo. The primary "
    "outcome was dyspnea relief at 24 hours, and secondary outcomes included renal function and mortality."
)
NON_ENGLISH = {
    "fr": "Le patient a été hospitalisé pour une insuffisance cardiaque aiguë. Le traitement par diurétiques "
    "a permis une amélioration rapide des symptômes, mais la fonction rénale s'est dégradée pendant le séjour.",
    "de": "Der Patient wurde wegen einer akuten Herzinsuffizienz stationär aufgenommen. Unter der Therapie mit "
    "Diuretika besserten sich die Beschwerden rasch, die Nierenfunktion verschlechterte sich jedoch deutlich.",
    "es": "El paciente fue hospitalizado por insuficiencia cardíaca aguda. El tratamiento con diuréticos mejoró "
    "rápidamente los síntomas, pero la función renal empeoró durante la estancia en el hospital.",
}


def test_reasons():
    check = QualityFilter(CleanConfig(min_chars=50, max_chars=1000, min_words=20)).check
    assert check(ENGLISH) is None
    assert check(" \n\t ") == ("empty", "no text after cleaning")
    assert check("Too short.") == ("too_short", "chars=10 < 50")
    assert check(ENGLISH * 10)[0] == "too_long"
    assert check("word " * 15) == ("too_few_words", "words=15 < 20")


@pytest.mark.parametrize("lang", sorted(NON_ENGLISH))
def test_not_english(lang):
    reason, detail = QualityFilter(CleanConfig(min_chars=50)).check(NON_ENGLISH[lang])
    assert reason == "not_english"
    assert re.fullmatch(rf"lang={lang} p=(0\.[5-9]\d|1\.00)", detail)
    assert QualityFilter(CleanConfig(min_chars=50, language=None)).check(NON_ENGLISH[lang]) is None
    assert QualityFilter(CleanConfig(min_chars=50, language=lang)).check(NON_ENGLISH[lang]) is None


def test_language_threshold():
    assert QualityFilter(CleanConfig(min_chars=50, language_threshold=1.0)).check(NON_ENGLISH["es"]) is None


def test_real_english_is_kept():
    """General-domain replay text is all English; the abstracts hold exactly two non-English ones."""
    check = QualityFilter(CleanConfig(min_chars=0, min_words=0)).check
    replay = [r["text"] for r in read_jsonl_gz("corpus/general_replay.jsonl.gz")]
    assert [check(t) for t in replay if check(t)] == []
    flagged = [t for t in abstract_texts() if check(t)]
    assert len(flagged) <= 3
    assert any(t.strip().startswith("Le syndrome de la dent couronnée") for t in flagged)


def test_english_shortcut_agrees_with_py3langid():
    """Texts that _clearly_english lets through without py3langid are English to py3langid too."""
    texts = [r["text"] for r in read_jsonl_gz("corpus/general_replay.jsonl.gz")] + abstract_texts()[:3000]
    prefixes = [t[:LANGID_PREFIX] for t in texts if _clearly_english(t[:LANGID_PREFIX])]
    assert len(prefixes) > 0.9 * len(texts)
    assert all(_language_identifier().classify(p)[0] == "en" for p in prefixes)
    assert not any(_clearly_english(t) for t in NON_ENGLISH.values())


def test_unknown_language_is_a_config_error():
    with pytest.raises(ConfigError, match="clean.language 'xx'"):
        QualityFilter(CleanConfig(language="xx"))
