"""k-shot prompts equal to lm-eval 0.4.13's: the same demonstrations, in the same order, for the same questions.

lm-eval builds the contexts in-process from local task YAML files that include its own ``pubmedqa`` and
``medqa_4options`` tasks, with ``dataset_path: json`` over the same documents medfoundry reads:
PubMedQA's official test set and fold 0's train set (the pool of lm-eval's pubmedqa, bigbio's
``pubmed_qa_labeled_fold0_source`` train split, rebuilt from ori_pqal.json by PubMedQA's own split
script), and for MedQA a stand-in train split (MedQA's train split is not in ../shared/data, so the last
273 test questions play that role through medfoundry's hub loader, the path a user who is online takes
with ``fewshot_source: medqa_4options:train``). ``set_fewshot_seed`` and ``build_all_requests(limit=50)``
are what ``simple_evaluate`` calls. Every context must be byte-identical, and a tiny model's
log-likelihoods of the first questions must agree within 1e-4.
"""

from __future__ import annotations

import json
import random

import pytest

from conftest import SHARED_DATA, shared
from medfoundry.config import validate
from medfoundry.eval.config import EvalConfig
from medfoundry.eval.data import load_split
from medfoundry.eval.fewshot import lm_eval_sample
from medfoundry.eval.fields import Doc
from medfoundry.eval.lm_eval_tasks import pubmedqa_splits, write_local_task
from medfoundry.eval.loglik import LoglikRequest, score_requests
from medfoundry.eval.run import prepare
from medfoundry.eval.tasks import BUILTIN_DIR, TaskRegistry, deep_merge, parse_entry, read_task_file
from medfoundry.model.load import load_model
from test_eval_loglik import gpt2_dir  # noqa: F401 (module fixture)

BENCHMARKS = SHARED_DATA / "benchmarks"
LIMIT = 50
MEDQA_TRAIN_FROM = 1000  # medqa test questions 1000.. stand in for its train split

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def registry() -> TaskRegistry:
    shared("benchmarks/pubmedqa/ori_pqal.json")
    shared("benchmarks/medqa/us_4_options_test.jsonl")
    return TaskRegistry([BUILTIN_DIR])


def config(**fields) -> EvalConfig:
    return validate(
        EvalConfig, {"output_dir": "unused", "models": ["unused"], "benchmarks_dir": str(BENCHMARKS), **fields}
    )


def medqa_hub_record(doc: Doc, i: int) -> dict:
    """A medqa document in the schema of GBaker/MedQA-USMLE-4-options-hf, which lm-eval's medqa task reads."""
    f = doc.fields
    endings = {f"ending{j}": f["options"][k] for j, k in enumerate("ABCD")}
    return {"id": f"train-{i}", "sent1": f["question"], **endings, "label": "ABCD".index(f["answer_idx"])}


@pytest.fixture(scope="module")
def medqa_records(registry) -> dict[str, list[dict]]:
    docs = load_split(registry.get("medqa_4options"), "test", BENCHMARKS)
    return {
        "test": [medqa_hub_record(d, i) for i, d in enumerate(docs)],
        "train": [medqa_hub_record(d, i) for i, d in enumerate(docs[MEDQA_TRAIN_FROM:])],
    }


def medqa_hub(medqa_records):
    def loader(path: str, name: str | None, split: str):
        assert (path, split) == ("GBaker/MedQA-USMLE-4-options-hf", "train")
        return medqa_records["train"]

    return loader


def prepared(registry, name: str, shots: int, medqa_records=None, **fields):
    if name == "medqa_4options":
        fields.setdefault("fewshot_source", "medqa_4options:train")
    cfg = config(tasks=[name], num_fewshot=shots, limit=LIMIT, **fields)
    hub = medqa_hub(medqa_records) if medqa_records else None
    return prepare(registry.get(name), cfg, registry, hub_loader=hub)


@pytest.fixture(scope="module")
def lm_eval_tasks(registry, medqa_records, tmp_path_factory) -> dict:
    """lm-eval's own pubmedqa and medqa_4options task objects over the local documents."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lm_eval_fewshot")
    write_local_task(root, "pubmedqa", "pubmedqa/pubmedqa.yaml", pubmedqa_splits(registry.get("pubmedqa"), BENCHMARKS))
    write_local_task(root, "medqa_4options", "medqa/medqa.yaml", medqa_records)
    names = ("pubmedqa", "medqa_4options")
    manager = TaskManager(include_path=str(root), include_defaults=False)
    loaded = manager.load([f"ours_{n}" for n in names])["tasks"]
    return {name: loaded[f"ours_{name}"] for name in names}


def lm_eval_requests(task, shots: int, seed: int = 1234, limit: int = LIMIT) -> list[list[tuple[str, str]]]:
    """(context, continuation) per document, as ``simple_evaluate`` sets the task up and builds its requests."""
    task.set_config("num_fewshot", shots)
    task.set_fewshot_seed(seed)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    docs: dict[int, list] = {}
    for inst in task.instances:
        docs.setdefault(inst.doc_id, []).append(tuple(inst.arguments))
    return [docs[i] for i in sorted(docs)]


def ours(p) -> list[list[tuple[str, str]]]:
    return [[(context, c) for c in continuations] for context, continuations in zip(p.contexts, p.continuations)]


# -- the pool: PubMedQA's own split script ------------------------------------------------------------


def test_pubmedqa_splits_are_the_split_scripts(registry):
    """The script's test set is the official one id for id and in order, which a single misplaced draw of its
    generator would break; fold 0's train/dev sets are then the next draws (450 + 50, the other 500)."""
    pubmedqa = registry.get("pubmedqa")
    split = {name: load_split(pubmedqa, name, BENCHMARKS) for name in ("test", "train", "dev", "train_dev")}
    truth = json.loads(shared("benchmarks/pubmedqa/test_ground_truth.json").read_text(encoding="utf-8"))
    assert [d.id for d in split["test"]] == list(truth)
    assert [len(split[n]) for n in ("train", "dev", "train_dev")] == [450, 50, 500]
    train, dev = {d.id for d in split["train"]}, {d.id for d in split["dev"]}
    assert not train & dev and train | dev == {d.id for d in split["train_dev"]}
    labels = [d.fields["final_decision"] for d in split["train"]]
    assert (labels.count("yes"), labels.count("no"), labels.count("maybe")) == (249, 152, 49)  # stratified


# -- the sampler --------------------------------------------------------------------------------------


def test_lm_eval_sample_is_context_sampler_draw_for_draw():
    """Without and with the evaluated document in the pool (n + 1 drawn, it removed), duplicates included."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.samplers import ContextSampler

    records = [{"q": f"question {i % 17}", "a": i % 3} for i in range(40)]  # rows 17.. repeat rows 0..
    docs = [Doc(str(i), r) for i, r in enumerate(records)]
    theirs, mine, rnd = ContextSampler(records, rnd=1234), [], random.Random(1234)
    expected = []
    for i in range(60):
        n, j = 1 + i % 5, i % len(records)
        exclude = i % 2 == 1
        expected.append(theirs.sample(n, eval_doc=records[j] if exclude else None))
        mine.append([d.fields for d in lm_eval_sample(rnd, docs, n, docs[j] if exclude else None)])
    assert mine == expected


def test_per_question_sampler_is_medfoundrys_own(registry):
    """The former default (``random``, now ``per_question``) stays: each question its own draw, said in the notes."""
    tree = deep_merge(read_task_file(BUILTIN_DIR / "pubmedqa.yaml"), {"fewshot": {"sampler": "random"}})
    task = parse_entry(tree, "<test>")
    assert task.fewshot.sampler == "per_question"
    cfg = config(tasks=["pubmedqa"], num_fewshot=2, limit=4)
    p = prepare(task, cfg, registry)
    assert p.notes == [
        "demonstrations drawn per question by (seed, task, question id) (fewshot.sampler per_question), "
        "not lm-eval's draws"
    ]
    default = prepare(registry.get("pubmedqa"), cfg, registry)
    assert not default.notes and default.contexts != p.contexts
    # the run's fewshot_sampler replaces the task's, one way and the other
    run_level = prepare(registry.get("pubmedqa"), cfg.model_copy(update={"fewshot_sampler": "per_question"}), registry)
    assert (run_level.contexts, run_level.notes, run_level.fewshot_sampler) == (p.contexts, p.notes, "per_question")
    back = prepare(task, cfg.model_copy(update={"fewshot_sampler": "lm_eval"}), registry)
    assert (back.contexts, back.notes, back.fewshot_sampler) == (default.contexts, [], "lm_eval")


# -- contexts and log-likelihoods equal to lm-eval's -------------------------------------------------


@pytest.mark.parametrize(("name", "shots", "seed"), [("pubmedqa", 3, 1234), ("pubmedqa", 5, 1234), ("pubmedqa", 3, 7)])
def test_pubmedqa_k_shot_equals_lm_eval(registry, lm_eval_tasks, name, shots, seed):
    mine = prepared(registry, name, shots, fewshot_seed=seed)
    theirs = lm_eval_requests(lm_eval_tasks[name], shots, seed)
    assert mine.fewshot_source == "pubmedqa:train" and not mine.notes
    assert len(theirs) == len(mine.contexts) == LIMIT
    assert ours(mine) == theirs
    assert all(c.count("\nAnswer: ") == shots for c in mine.contexts)
    # lm-eval with limit=10 draws the first ten of the same sequence: a prefix, never other draws
    assert lm_eval_requests(lm_eval_tasks[name], shots, seed, limit=10) == theirs[:10]


def test_medqa_five_shot_equals_lm_eval(registry, lm_eval_tasks, medqa_records):
    mine = prepared(registry, "medqa_4options", 5, medqa_records)
    theirs = lm_eval_requests(lm_eval_tasks["medqa_4options"], 5)
    assert mine.fewshot_source == "medqa_4options:train"
    assert mine.notes == ["5-shot demonstrations from medqa_4options:train"]
    assert len(theirs) == len(mine.contexts) == LIMIT
    assert ours(mine) == theirs
    assert all(c.count("\nAnswer: ") == 5 for c in mine.contexts)


def test_k_shot_log_likelihoods_equal_lm_eval(registry, lm_eval_tasks, medqa_records, gpt2_dir):
    """medfoundry's scorer on its own k-shot prompts vs lm-eval's HFLM on lm-eval's instances, first questions."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    n = 2
    cases = [("pubmedqa", 3, None), ("medqa_4options", 5, medqa_records)]
    requests, instances = [], []
    for name, shots, records in cases:
        mine = prepared(registry, name, shots, records)
        requests += [LoglikRequest(c, tuple(cont)) for c, cont in zip(mine.contexts[:n], mine.continuations[:n])]
        for args in lm_eval_requests(lm_eval_tasks[name], shots, limit=n):
            instances += [Instance("loglikelihood", {}, a, len(instances)) for a in args]
    lm = load_model(gpt2_dir, precision="fp32", device="cpu", threads=1)
    scores = [s.loglik for request in score_requests(lm, requests, batch_size=4) for s in request]
    hflm = HFLM(pretrained=str(gpt2_dir), dtype="float32", device="cpu", batch_size=4)
    theirs = [t[0] for t in hflm.loglikelihood(instances, disable_tqdm=True)]
    assert [(r.context, c) for r in requests for c in r.continuations] == [i.args for i in instances]
    assert len(scores) == 3 * n + 4 * n and scores == pytest.approx(theirs, abs=1e-4)
