"""Declarative eval tasks on the official benchmark files: splits, targets, prompts byte-identical to
lm-eval's (built offline from local copies of the same documents), Meditron's format, few-shot
selection, hub field mappings (with a fake loader) and the errors a user meets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import SHARED_DATA, shared
from medfoundry.config import validate
from medfoundry.errors import ConfigError, MedfoundryError
from medfoundry.eval.config import EvalConfig
from medfoundry.eval.data import load_split
from medfoundry.eval.fewshot import fewshot_pool
from medfoundry.eval.fields import Doc
from medfoundry.eval.prompts import PromptBuilder
from medfoundry.eval.run import prepare, registry_for
from medfoundry.eval.tasks import BUILTIN_DIR, TaskRegistry

BENCHMARKS = SHARED_DATA / "benchmarks"
MMLU = [
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
]


def config(**fields) -> EvalConfig:
    return validate(
        EvalConfig,
        {
            "output_dir": "unused",
            "models": ["unused"],
            "tasks": ["pubmedqa"],
            "benchmarks_dir": str(BENCHMARKS),
            **fields,
        },
    )


@pytest.fixture(scope="module")
def registry() -> TaskRegistry:
    shared("benchmarks")
    return TaskRegistry([BUILTIN_DIR])


def prepared(registry, name: str, **fields):
    cfg = config(tasks=[name], **fields)
    return prepare(registry.get(name), cfg, registry)


def test_builtin_tasks_and_splits(registry):
    assert {
        "pubmedqa",
        "medqa_4options",
        "medqa_5options",
        "medmcqa",
        "mmlu_medical",
        *(f"mmlu_{s}" for s in MMLU),
    } == set(registry.names)
    plan = registry.plan(["pubmedqa", "mmlu_medical", "mmlu_anatomy"])
    assert plan.requested == ["pubmedqa", "mmlu_medical", "mmlu_anatomy"]
    assert [t.task for t in plan.tasks] == ["pubmedqa", *(f"mmlu_{s}" for s in MMLU)]  # each task once

    pubmedqa = registry.get("pubmedqa")
    test, train = load_split(pubmedqa, "test", BENCHMARKS), load_split(pubmedqa, "train_dev", BENCHMARKS)
    truth = json.loads((BENCHMARKS / "pubmedqa/test_ground_truth.json").read_text())
    assert len(test) == len(train) == 500 and [d.id for d in test] == list(truth)  # the official order too
    assert not {d.id for d in train} & set(truth)
    builder = PromptBuilder(pubmedqa, "lm_eval")
    assert all(builder.choices(d)[builder.target(d)] == truth[d.id] for d in test)

    medmcqa = registry.get("medmcqa")
    docs = load_split(medmcqa, "test", BENCHMARKS)
    assert len(docs) == 4183 and docs[0].id == "45258d3d-b974-44dd-a161-c3fccbdadd88"
    assert [PromptBuilder(medmcqa, "lm_eval").target(d) for d in docs[:50]] == [d.fields["cop"] - 1 for d in docs[:50]]
    assert len(load_split(registry.get("medqa_5options"), "test", BENCHMARKS)) == 1273
    anatomy = registry.get("mmlu_anatomy")
    assert len(load_split(anatomy, "test", BENCHMARKS)) == 135 and len(load_split(anatomy, "dev", BENCHMARKS)) == 5


# -- lm-eval equality ---------------------------------------------------------------------------


def _lm_eval_records(name: str, docs: list[Doc]) -> list[dict]:
    """The documents in the schema of the hub dataset lm-eval's task reads."""
    f = [d.fields for d in docs]
    if name == "pubmedqa":
        return [
            {"QUESTION": r["QUESTION"], "CONTEXTS": r["CONTEXTS"], "final_decision": r["final_decision"]} for r in f
        ]
    if name == "medqa_4options":
        return [
            {
                "sent1": r["question"],
                **{f"ending{i}": r["options"][k] for i, k in enumerate("ABCD")},
                "label": "ABCD".index(r["answer_idx"]),
            }
            for r in f
        ]
    if name == "medmcqa":
        return [{k: r[k] for k in ("question", "opa", "opb", "opc", "opd")} | {"cop": r["cop"] - 1} for r in f]
    return [
        {"question": r["question"], "choices": [r[k] for k in "ABCD"], "answer": "ABCD".index(r["answer"])} for r in f
    ]


def _lm_eval_yaml(name: str, files: dict, cache: Path) -> dict:
    from lm_eval import tasks as lm_tasks

    base = Path(lm_tasks.__file__).parent
    source = {
        "pubmedqa": "pubmedqa/pubmedqa.yaml",
        "medqa_4options": "medqa/medqa.yaml",
        "medmcqa": "medmcqa/medmcqa.yaml",
    }.get(name, f"mmlu/default/{name}.yaml")
    return {
        "include": str(base / source),
        "task": f"ours_{name}",
        "tag": None,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files, "cache_dir": str(cache)},
        "training_split": None,
        "validation_split": None,
        "test_split": "test",
    }


@pytest.fixture(scope="module")
def lm_eval_instances(registry, tmp_path_factory):
    """lm-eval's (context, continuation) arguments per task and document, zero-shot and MMLU 5-shot."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lm_eval")
    names = ["pubmedqa", "medqa_4options", "medmcqa", *(f"mmlu_{s}" for s in MMLU)]
    for name in names:
        task = registry.get(name)
        files = {}
        for split in ("test", "dev") if name.startswith("mmlu") else ("test",):
            path = root / f"{name}_{split}.jsonl"
            path.write_text(
                "".join(json.dumps(r) + "\n" for r in _lm_eval_records(name, load_split(task, split, BENCHMARKS)))
            )
            files[split] = str(path)
        (root / f"{name}.yaml").write_text(yaml.safe_dump(_lm_eval_yaml(name, files, root / "cache")))
    manager = TaskManager(include_path=str(root), include_defaults=False)
    instances = {}
    for shots in (0, 5):
        for name in names if shots == 0 else names[3:]:
            task = manager.load([f"ours_{name}"])["tasks"][f"ours_{name}"]
            task.set_config("num_fewshot", shots)
            task.set_fewshot_seed(1234)
            task.build_all_requests(rank=0, world_size=1)
            docs: dict[int, list] = {}
            for inst in task.instances:
                docs.setdefault(inst.doc_id, []).append(inst.arguments)
            instances[name, shots] = [docs[i] for i in sorted(docs)]
    return instances


@pytest.mark.parametrize("name", ["pubmedqa", "medqa_4options", "medmcqa", *(f"mmlu_{s}" for s in MMLU)])
def test_prompts_equal_lm_eval_zero_shot(registry, lm_eval_instances, name):
    ours = prepared(registry, name)
    theirs = lm_eval_instances[name, 0]
    assert len(theirs) == len(ours.contexts) == ours.total
    for context, continuations, arguments in zip(ours.contexts, ours.continuations, theirs):
        assert [(context, c) for c in continuations] == [tuple(a) for a in arguments]


@pytest.mark.parametrize("subject", MMLU)
def test_mmlu_five_shot_equals_lm_eval(registry, lm_eval_instances, subject):
    ours = prepared(registry, f"mmlu_{subject}", num_fewshot=5)
    theirs = lm_eval_instances[f"mmlu_{subject}", 5]
    assert ours.fewshot_source == f"mmlu_{subject}:dev" and not ours.notes
    for context, continuations, arguments in zip(ours.contexts, ours.continuations, theirs):
        assert [(context, c) for c in continuations] == [tuple(a) for a in arguments]
    assert ours.contexts[0].count("\nAnswer: ") == 5


# -- Meditron's format ---------------------------------------------------------------------------


def test_meditron_style(registry):
    medmcqa = prepared(registry, "medmcqa", prompt_style="meditron", limit=1)
    assert medmcqa.contexts[0] == (
        "You are a medical doctor answering realworld medical entrance exam questions. Based on your understanding of "
        "basic and clinical science, medical knowledge, and mechanisms underlying health, disease, patient care, and "
        "modes of therapy, answer the following multiple-choice question. Select one correct answer from A to D. Base "
        "your answer on the current and standard practices referenced in medical guidelines.\n"
        "Question: Which of the following is not true for myelinated nerve fibers:?\n\nOptions:\n"
        "A. Impulse through myelinated fibers is slower than non-myelinated fibers\n"
        "B. Membrane currents are generated at nodes of Ranvier\nC. Saltatory conduction of impulses is seen\n"
        "D. Local anesthesia is effective only when the nerve is not covered by myelin sheath\nThe answer is:"
    )
    assert medmcqa.continuations[0] == [" A", " B", " C", " D"] and medmcqa.targets == [0]

    pubmedqa = prepared(registry, "pubmedqa", prompt_style="meditron", limit=2, num_fewshot=1)
    demo, question = pubmedqa.contexts[0].split("\n", 1)[1].split("\n\n")
    assert demo.endswith(("\nThe answer is: yes", "\nThe answer is: no", "\nThe answer is: maybe"))
    assert question.endswith(
        "\nIs anorectal endosonography valuable in dyschesia?\nThe answer is:"  # the official test order
    )

    cot = prepared(registry, "medqa_5options", prompt_style="meditron", mode="cot", limit=1)
    assert cot.kind == "cot" and cot.contexts[0].endswith(
        "E. Refuse to dictate the operative report\nLet's think step by step.\n"
    )
    assert "from A to E" in cot.contexts[0] and cot.options[0][4] == "Refuse to dictate the operative report"


# -- few-shot -------------------------------------------------------------------------------------


def test_fewshot_is_seeded_and_never_from_test(registry):
    """lm-eval's sampler (the default): a shorter run is a prefix of a longer one (tests/test_eval_fewshot_lm_eval.py
    compares the draws with lm-eval's)."""
    a = prepared(registry, "pubmedqa", num_fewshot=3, limit=6)
    b = prepared(registry, "pubmedqa", num_fewshot=3, limit=3)
    c = prepared(registry, "pubmedqa", num_fewshot=3, limit=6, fewshot_seed=7)
    assert a.contexts[:3] == b.contexts and a.contexts != c.contexts
    assert a.contexts[0].rsplit("\n\n", 1)[0] != a.contexts[1].rsplit("\n\n", 1)[0]  # each question a new draw

    pubmedqa = registry.get("pubmedqa")
    pool = fewshot_pool(pubmedqa, 3, style="lm_eval", source=None, get_task=registry.get, benchmarks_dir=BENCHMARKS)
    test_ids = {d.id for d in load_split(pubmedqa, "test", BENCHMARKS)}
    picked = {d.id for i in range(50) for d in pool.select(3, seed=1234, task="pubmedqa", doc_id=str(i))}
    assert len(picked) > 20 and not picked & test_ids


def test_medqa_fewshot_needs_a_stated_source(registry):
    with pytest.raises(
        ConfigError,
        match=r"medqa_4options: 5-shot prompts need demonstrations, but MedQA's train "
        r"and dev splits are not in ../shared/data.*fewshot_source=TASK\[:SPLIT\]",
    ):
        prepared(registry, "medqa_4options", num_fewshot=5)
    borrowed = prepared(
        registry, "medqa_4options", num_fewshot=2, limit=2, fewshot_source="mmlu_professional_medicine:dev"
    )
    assert borrowed.fewshot_source == "mmlu_professional_medicine:dev"
    assert borrowed.notes == [
        "2-shot demonstrations from mmlu_professional_medicine:dev, not medqa_4options's own "
        "(MedQA's train and dev splits are not in ../shared/data, only its test set)"
    ]
    dev = load_split(registry.get("mmlu_professional_medicine"), "dev", BENCHMARKS)
    assert borrowed.contexts[0].startswith(dev[0].fields["question"].strip())  # first_n: the lender's sampler
    with pytest.raises(ConfigError, match="medqa_5options's test split; demonstrations never come from a test set"):
        prepared(registry, "medqa_4options", num_fewshot=2, fewshot_source="medqa_5options:test")


# -- hub loaders (offline, with a fake loader) -----------------------------------------------------

HUB_RECORDS = {
    "medqa_4options": lambda r: {
        "id": "x",
        "sent1": r["question"],
        "label": "ABCD".index(r["answer_idx"]),
        **{f"ending{i}": r["options"][k] for i, k in enumerate("ABCD")},
    },
    "medqa_5options": lambda r: {**r, "options": [{"key": k, "value": v} for k, v in r["options"].items()]},
    "medmcqa": lambda r: {**r, "cop": r["cop"] - 1},
    "mmlu_anatomy": lambda r: {
        "question": r["question"],
        "subject": "anatomy",
        "choices": [r[k] for k in "ABCD"],
        "answer": "ABCD".index(r["answer"]),
    },
    "pubmedqa": lambda r: {**r, "pubid": 42},
}


@pytest.mark.parametrize("name", sorted(HUB_RECORDS))
def test_hub_records_map_onto_the_local_schema(registry, name, tmp_path):
    task = registry.get(name)
    local = load_split(task, "test", BENCHMARKS)[:3]
    calls = []

    def fake_load(path, config_name, split):
        calls.append((path, config_name, split))
        return [HUB_RECORDS[name](dict(d.fields)) for d in local]

    hub = load_split(task, "test", tmp_path, hub_loader=fake_load)  # no local file under tmp_path
    assert calls == [(task.hub.path, task.hub.name, task.hub.splits["test"])]
    for style in ("lm_eval", "meditron"):
        builder = PromptBuilder(task, style)
        assert [builder.context(d, []) for d in hub] == [builder.context(d, []) for d in local]
        assert [builder.target(d) for d in hub] == [builder.target(d) for d in local]


def test_hub_failure_and_missing_file_messages(registry, tmp_path):
    def offline(path, name, split):
        raise ConnectionError("no network")

    with pytest.raises(
        MedfoundryError,
        match=r"data file .*/medmcqa/dev.jsonl not found.*; its hub loader "
        r"\(openlifescienceai/medmcqa\) failed: ConnectionError: no network$",
    ):
        load_split(registry.get("medmcqa"), "test", tmp_path, hub_loader=offline)
    task = registry.get("mmlu_anatomy").model_copy(update={"hub": None})
    with pytest.raises(
        MedfoundryError,
        match=rf"data file {tmp_path}/mmlu/test/anatomy_test.csv not found\. For the official files, set "
        r"benchmarks_dir in the eval config \(or --set benchmarks_dir=DIR\) or the MEDFOUNDRY_BENCHMARKS",
    ):
        load_split(task, "test", tmp_path)


# -- user tasks and errors -----------------------------------------------------------------------


def write_user_task(directory: Path, **changes) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "drugs.csv").write_text(
        "id,stem,right,wrong\nd1,Aspirin inhibits,COX,ACE\nd2,Statins inhibit,HMG-CoA reductase,COX\n"
    )
    definition = {
        "task": "drug_targets",
        "data": {"path": str(directory / "drugs.csv"), "id_field": "id"},
        "splits": {"test": {}},
        "choices": "{{ [right, wrong] }}",
        "target": {"field": "right"},
        "prompts": {"lm_eval": {"text": "{{ stem }}"}},
        **changes,
    }
    (directory / "drug_targets.yaml").write_text(yaml.safe_dump(definition))
    return directory


def test_user_task_folder_with_cloze_choices(tmp_path, registry):
    folder = write_user_task(tmp_path / "mine")
    cfg = config(tasks=["drug_targets"], task_dirs=[str(folder)])
    reg = registry_for(cfg)
    p = prepare(reg.get("drug_targets"), cfg, reg)
    assert p.doc_ids == ["d1", "d2"] and p.contexts == ["Aspirin inhibits", "Statins inhibit"]
    assert p.continuations == [[" COX", " ACE"], [" HMG-CoA reductase", " COX"]] and p.targets == [0, 0]


@pytest.mark.parametrize(
    "template",
    [
        "{{ stem.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('true') }}",
    ],
)
def test_templates_cannot_reach_python_objects(tmp_path, template):
    """A task file may come from anyone: its templates render in Jinja's sandbox, so reaching Python's objects (the
    way to run code from a template) is refused with an error naming the task file, not executed."""
    folder = write_user_task(tmp_path / "evil", prompts={"lm_eval": {"text": template}})
    cfg = config(tasks=["drug_targets"], task_dirs=[str(folder)])
    reg = registry_for(cfg)
    with pytest.raises(
        ConfigError,
        match=rf"{folder}/drug_targets.yaml: prompts.lm_eval.text: refused by the template sandbox: access to "
        r"attribute '__\w+__' of '\w+' object is unsafe",
    ):
        prepare(reg.get("drug_targets"), cfg, reg)


def test_clear_errors(tmp_path, registry):
    with pytest.raises(ConfigError, match="unknown task 'pubmedq'; did you mean 'pubmedqa'?"):
        registry.get("pubmedq")
    folder = write_user_task(tmp_path / "bad", prompts={"lm_eval": {"text": "{{ stem }} {{ steem }}"}})
    cfg = config(tasks=["drug_targets"], task_dirs=[str(folder)])
    reg = registry_for(cfg)
    with pytest.raises(
        ConfigError,
        match=rf"{folder}/drug_targets.yaml: prompts.lm_eval.text: 'steem' is undefined "
        r"\(the documents have the fields id, right, stem, wrong\)",
    ):
        prepare(reg.get("drug_targets"), cfg, reg)
    with pytest.raises(
        ConfigError, match="task pubmedqa has no prompt style 'meditorn' \\(it has lm_eval, meditron\\)"
    ):
        prepared(registry, "pubmedqa", prompt_style="meditorn")
    (folder / "typo.yaml").write_text(
        "task: typo\nsplits: {test: {path: x.jsonl}}\nchoices: [a]\ntarget: {field: y}\n"
        "prompts: {lm_eval: {text: x}}\nfewshots: {split: train}\n"
    )
    with pytest.raises(
        ConfigError, match="typo.yaml: invalid configuration\n  fewshots: unknown field; did you mean 'fewshot'?"
    ):
        TaskRegistry([folder]).get("typo")
