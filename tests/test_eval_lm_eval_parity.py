"""Scorer-level parity with lm-eval 0.4.13: ``HFLM.loglikelihood`` and ``score_requests`` on the same real
MedQA and PubMedQA questions (lm-eval's prompts), full option texts as multi-token continuations, two-shot
contexts sharing their exemplars, trailing whitespace, an empty context, a context that starts with the BOS
text, greedy continuations, and a 64-token window that forces left truncation. Every log-likelihood must
agree within 1e-4 and every greedy flag exactly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import shared
from medfoundry.eval.loglik import LoglikRequest, score_requests
from medfoundry.model.load import load_model
from test_eval_loglik import gpt2_dir, llama_dir  # noqa: F401 (module fixtures)

N_QUESTIONS = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def medqa_docs(n: int, start: int = 0) -> list[dict]:
    lines = shared("benchmarks/medqa/us_4_options_test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[start : start + n]]


def medqa_prompt(doc: dict) -> str:
    options = "".join(f"{key}. {value}\n" for key, value in doc["options"].items())
    return f"Question: {doc['question']}\n{options}Answer:"


def medqa_requests() -> list[LoglikRequest]:
    """lm-eval's medqa_4options prompt; letters, then the option texts themselves."""
    requests = []
    for doc in medqa_docs(N_QUESTIONS):
        requests.append(LoglikRequest(medqa_prompt(doc), (" A", " B", " C", " D")))
        requests.append(LoglikRequest(medqa_prompt(doc), tuple(" " + value for value in doc["options"].values())))
    return requests


def few_shot_requests() -> list[LoglikRequest]:
    """Two-shot MedQA as lm-eval lays out few-shot contexts (exemplar, target delimiter, answer, "\n\n"):
    every context starts with the same exemplars, which the scorer runs once."""
    shots = "".join(f"{medqa_prompt(doc)} {doc['answer_idx']}\n\n" for doc in medqa_docs(2, start=N_QUESTIONS))
    return [LoglikRequest(shots + medqa_prompt(doc), (" A", " B", " C", " D")) for doc in medqa_docs(4)]


def pubmedqa_requests() -> list[LoglikRequest]:
    """lm-eval's pubmedqa prompt on the first questions of the official test split."""
    records = json.loads(shared("benchmarks/pubmedqa/ori_pqal.json").read_text(encoding="utf-8"))
    test_ids = list(json.loads(shared("benchmarks/pubmedqa/test_ground_truth.json").read_text(encoding="utf-8")))
    requests = []
    for pmid in test_ids[:N_QUESTIONS]:
        doc = records[pmid]
        context = "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(doc["CONTEXTS"]), doc["QUESTION"])
        requests.append(LoglikRequest(context, (" yes", " no", " maybe")))
    return requests


def edge_requests(lm) -> list[LoglikRequest]:
    """Trailing whitespace, an empty context, the BOS text in front, and the model's own greedy continuation."""
    requests = [
        LoglikRequest("Question: Is aspirin an NSAID?\nAnswer: ", ("yes", "no", "maybe")),
        LoglikRequest("", ("The patient", " fever", "Answer: yes")),
        LoglikRequest(lm.tokenizer.decode([lm.tokenizer.bos_token_id]) + "Question: fever?\nAnswer:", (" yes", " no")),
    ]
    context = "Abstract: Fever resolved after treatment.\nAnswer:"
    ids = lm.tokenizer.encode(context)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    requests.append(LoglikRequest(context, (lm.tokenizer.decode(ids[-3:]), lm.tokenizer.decode(ids[-3:-2]), " no")))
    return requests


def lm_eval_scores(model_dir: Path, requests: list[LoglikRequest], **kwargs) -> list[tuple[float, bool]]:
    """HFLM built directly (no task registry, no simple_evaluate): lm-eval's scoring without its start-up."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hflm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4, **kwargs)
    instances = [
        Instance("loglikelihood", {}, (r.context, c), i) for i, r in enumerate(requests) for c in r.continuations
    ]
    return hflm.loglikelihood(instances, disable_tqdm=True)


def compare(lm, model_dir: Path, requests: list[LoglikRequest], **kwargs) -> None:
    ours = [s for request in score_requests(lm, requests, batch_size=5) for s in request]
    theirs = lm_eval_scores(model_dir, requests, **kwargs)
    assert len(ours) == len(theirs)
    assert [s.loglik for s in ours] == pytest.approx([t[0] for t in theirs], abs=1e-4)
    assert [s.is_greedy for s in ours] == [t[1] for t in theirs]
    assert any(s.is_greedy for s in ours) and any(s.tokens > 1 for s in ours)


@pytest.mark.parametrize("name", ["gpt2_dir", "llama_dir"])
def test_medqa_and_pubmedqa_match_lm_eval(name, request):
    """GPT-2 (no BOS) and a LLaMA whose tokenizer adds BOS, on contexts of 150-900 tokens."""
    model_dir = request.getfixturevalue(name)
    lm = load_model(model_dir, precision="fp32", device="cpu", threads=1)
    compare(lm, model_dir, medqa_requests() + pubmedqa_requests() + few_shot_requests() + edge_requests(lm))


def test_left_truncation_matches_lm_eval(gpt2_dir):
    """A 64-token window: every MedQA and PubMedQA input is cut from the left, by continuation length."""
    lm = dataclasses.replace(load_model(gpt2_dir, precision="fp32", device="cpu", threads=1), max_length=64)
    requests = medqa_requests()[:6] + pubmedqa_requests()[:4]
    assert all(len(lm.tokenizer.encode(r.context)) > 64 for r in requests)
    compare(lm, gpt2_dir, requests + edge_requests(lm), max_length=64)
