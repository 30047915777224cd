"""Declarative evaluation tasks: YAML files validated into typed specs, and the registry that finds them.

A task is data, not code, so that users add benchmarks without touching the engine. Three kinds:

* a multiple-choice task (:class:`ChoiceTask`): where its splits are (local files, relative to the
  benchmarks directory, or a Hugging Face dataset for users who are online), how records become
  documents (``fields``), the answer choices and the target, and one prompt per style (Jinja
  templates, like lm-eval's ``doc_to_text``);
* a perplexity task (:class:`PerplexityTask`): a corpus directory, a JSONL/text file or token shards;
* a group (:class:`TaskGroup`): tasks reported together with a size-weighted average, as lm-eval
  aggregates MMLU.

Built-in tasks live in the ``tasks/`` folder beside this module (package data; the folder has no
``__init__.py``, so ``medfoundry.eval.tasks`` is this module). Files whose name starts with ``_`` are
shared fragments pulled in with ``include:`` (deep-merged, the including file winning).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from medfoundry.config import StrictModel, load_yaml, validate
from medfoundry.errors import ConfigError

BUILTIN_DIR = Path(__file__).with_name("tasks")
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"

# a field of a document: a dotted path into the record (``choices.0``, ``options.A``), a Jinja template
# rendered to a string (``"{{ cop + 1 }}"``), or a list / mapping of paths
FieldValue = str | list[str] | dict[str, str]


class SplitSpec(StrictModel):
    """Where one split's documents are. Unset fields are taken from the task's ``data`` section."""

    path: str | None = Field(None, description="file relative to the benchmarks directory, or absolute")
    format: Literal["jsonl", "json", "csv"] | None = Field(
        None, description="default from the suffix; json is a list of records or a dict keyed by document id"
    )
    columns: list[str] | None = Field(None, description="csv: the column names of a file without a header row")
    id_field: str | None = Field(
        None, description="field holding the document id (default: the key of a json dict, else the record's position)"
    )
    ids_file: str | None = Field(None, description="JSON dict or list of document ids: keep only those")
    exclude_ids: bool = Field(False, description="keep the documents NOT in ids_file instead")
    pqal_split: str | None = Field(
        None,
        pattern=r"^(test|fold[0-9]_(train|dev))$",
        description="PubMedQA PQA-L (a json dict keyed by PMID, ori_pqal.json): the split PubMedQA's own "
        "preprocess/split_dataset.py makes (random.seed(0); 500 test, then 10 folds of the other 500): test, "
        "or foldN_train (450) / foldN_dev (50), in that script's order. bigbio/pubmed_qa, lm-eval's dataset, "
        "ships these files",
    )


class TargetSpec(StrictModel):
    """The index of the correct choice, read from one field of the document."""

    field: str
    kind: Literal["choice", "letter", "index", "map"] = Field(
        "choice",
        description="choice: the value is one of the choices; letter: A, B, ...; index: 0-based; "
        "map: looked up in `map` (e.g. MedMCQA's cop 1-4)",
    )
    map: dict[str, int] | None = None

    @field_validator("map", mode="before")
    @classmethod
    def _keys_as_text(cls, value):
        """YAML reads ``{1: 0}`` with integer keys; values are compared as text."""
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _map_with_kind_map(self) -> TargetSpec:
        if (self.kind == "map") != (self.map is not None):
            raise ValueError("`map` is required with kind 'map' and only allowed with it")
        return self


class PromptSpec(StrictModel):
    """One prompt style of a task. Templates are Jinja over the document's fields, as in lm-eval.

    A ``chat`` style asks a fine-tuned chat model in the format it was trained in: the question is a
    user turn, rendered at run time with the evaluated model's own chat template (see
    :mod:`medfoundry.eval.prompts`), and it is scored by log-likelihood only.
    """

    text: str = Field(
        description="the question; the context ends here and the continuation is "
        "target_delimiter + choice (chat: the user turn's content)"
    )
    cot_text: str | None = Field(None, description="the question for chain-of-thought generation")
    description: str = Field(
        "", description="put once before the demonstrations (lm-eval's `description`; chat: the system message)"
    )
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    choices: list[str] | None = Field(None, description="this style's choices, when they differ from the task's")
    chat: bool = Field(
        False,
        description="the question is a user turn rendered through the model's chat template "
        "with the generation prompt; demonstrations are earlier user/assistant turns",
    )
    options_apart: bool = Field(
        False,
        description="chat: the task's `options` go with the user turn apart from the "
        "question, and each choice is answered 'A. <option text>', as "
        "medfoundry.sft's converters build multiple-choice conversations",
    )

    @model_validator(mode="after")
    def _chat_settings(self) -> PromptSpec:
        if self.chat and self.cot_text is not None:
            raise ValueError("a chat style is scored by log-likelihood only: cot_text is not supported with chat")
        if self.options_apart and not self.chat:
            raise ValueError("options_apart applies to chat styles (set chat: true)")
        return self


class FewshotSpec(StrictModel):
    split: str | None = Field(None, description="where demonstrations come from; never the test split")
    sampler: Literal["lm_eval", "per_question", "first_n", "fixed"] = Field(
        "lm_eval",
        description="lm_eval: lm-eval 0.4's default sampler, one Random(fewshot_seed) per task consumed in "
        "document order (rnd.sample(pool, k) per question), the same draws as lm-eval from the same pool; "
        "per_question (medfoundry's own; formerly `random`): each question its own Random(seed, task, pool, "
        "question id), independent of document order; first_n: the first k in file order (lm-eval's MMLU); "
        "fixed: the same k for every question (Meditron)",
    )
    note: str | None = Field(None, description="why the split may be missing, shown when it is")

    @field_validator("sampler", mode="before")
    @classmethod
    def _old_name(cls, value):
        """``random`` was the per-question sampler's name before ``lm_eval`` became the default."""
        return "per_question" if value == "random" else value


class GenerationSpec(StrictModel):
    stop: list[str] = Field(default_factory=lambda: ["\n\nQuestion:", "###"])


class HubSpec(StrictModel):
    """A Hugging Face dataset with the same documents, used when a local file is absent and ``datasets``
    is installed. ``fields`` maps its records onto the local files' schema, so templates and target
    work unchanged."""

    path: str
    name: str | None = None
    splits: dict[str, str] = Field(description="our split -> the hub's split (e.g. test: validation)")
    fields: dict[str, FieldValue] = Field(default_factory=dict)
    id_field: str | None = None


class ChoiceTask(StrictModel):
    """A multiple-choice task, scored by log-likelihood or answered by chain-of-thought generation."""

    task: str = Field(pattern=NAME_PATTERN)
    alias: str | None = Field(None, description="name in results.json (lm-eval's task_alias)")
    title: str | None = Field(None, description="column header in comparison tables")
    version: float | int | str = 1
    mode: Literal["loglik", "cot"] = "loglik"
    data: SplitSpec = Field(default_factory=SplitSpec, description="defaults for every split")
    splits: dict[str, SplitSpec] = Field(default_factory=dict)
    test_split: str = "test"
    fields: dict[str, FieldValue] = Field(default_factory=dict, description="extra document fields")
    choices: list[str] | str = Field(description="a list, or a Jinja template rendering a Python list literal")
    options: str | None = Field(
        None,
        description="field with the options' texts (list, or dict in choice "
        "order); lets chain-of-thought answers name an option",
    )
    target: TargetSpec
    prompts: dict[str, PromptSpec] = Field(min_length=1)
    fewshot: FewshotSpec = Field(default_factory=FewshotSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    hub: HubSpec | None = None
    _source: str = PrivateAttr("<inline>")

    @model_validator(mode="after")
    def _splits_make_sense(self) -> ChoiceTask:
        known = set(self.splits) | set(self.hub.splits if self.hub else ())
        if self.test_split not in known:
            raise ValueError(f"test_split {self.test_split!r} is neither in `splits` nor in `hub.splits`")
        if self.fewshot.split == self.test_split:
            raise ValueError("fewshot.split is the test split: demonstrations must never come from the test set")
        return self

    @property
    def source(self) -> str:
        return self._source

    def split_spec(self, split: str) -> SplitSpec | None:
        """The split's local file settings, with the ``data`` defaults filled in; None when it has no local file."""
        if split not in self.splits:
            return None
        merged = {**self.data.model_dump(exclude_unset=True), **self.splits[split].model_dump(exclude_unset=True)}
        return SplitSpec(**merged)


class PerplexitySource(StrictModel):
    path: str = Field(
        description="a corpus directory, a .jsonl(.gz) or .txt(.gz) file, or token shards "
        "(a tokenize output directory or one split of it); relative to the working directory"
    )
    split: str = "val"
    text_field: str = "text"
    max_length: int | None = Field(None, gt=0, description="window length; default the model's context")
    stride: int | None = Field(None, gt=0, description="default max_length (disjoint windows, as lm-eval)")
    limit_tokens: int | None = Field(None, gt=0, description="token shards: stop after this many tokens")
    sources: list[str] | None = Field(
        None,
        description="corpus / JSONL: only documents whose 'source' is one of these "
        "(e.g. a corpus's held-out abstracts alone)",
    )


class PerplexityTask(StrictModel):
    task: str = Field(pattern=NAME_PATTERN)
    alias: str | None = None
    title: str | None = None
    version: float | int | str = 1
    perplexity: PerplexitySource
    _source: str = PrivateAttr("<inline>")

    @property
    def source(self) -> str:
        return self._source


class TaskGroup(StrictModel):
    group: str = Field(pattern=NAME_PATTERN)
    alias: str | None = None
    title: str | None = None
    version: float | int | str = 1
    tasks: list[str] = Field(min_length=1)
    weight_by_size: bool = Field(True, description="average weighted by each task's size, as lm-eval's MMLU groups")
    _source: str = PrivateAttr("<inline>")

    @property
    def source(self) -> str:
        return self._source


Task = ChoiceTask | PerplexityTask
Entry = ChoiceTask | PerplexityTask | TaskGroup


def entry_name(entry: Entry) -> str:
    return entry.group if isinstance(entry, TaskGroup) else entry.task


def display_title(entry: Entry) -> str:
    return entry.title or entry.alias or entry_name(entry)


def parse_entry(tree: dict, source: str) -> Entry:
    """Validate one task definition (a YAML file's content or an inline mapping of the run config)."""
    model = TaskGroup if "group" in tree else PerplexityTask if "perplexity" in tree else ChoiceTask
    entry = validate(model, tree, source)
    entry._source = source
    return entry


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``; nested mappings are merged, everything else replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = deep_merge(merged[key], value)
        merged[key] = value
    return merged


def read_task_file(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A task file's mapping with its ``include:`` chain resolved (paths relative to the including file)."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: include cycle ({' -> '.join(str(p) for p in (*_seen, path))})")
    tree = load_yaml(path)
    include = tree.pop("include", None)
    if include is None:
        return tree
    return deep_merge(read_task_file(path.parent / str(include), (*_seen, path)), tree)


@dataclass
class Plan:
    """What a run evaluates: the leaf tasks in order (each once) and the groups over them."""

    requested: list[str]
    tasks: list[Task]
    groups: list[tuple[TaskGroup, list[str]]] = field(default_factory=list)


class TaskRegistry:
    """Task and group definitions by name: the built-in folder first, then each user folder (a later
    definition of the same name replaces an earlier one, so a user can adapt a built-in task)."""

    def __init__(self, dirs: list[Path]):
        self.files: dict[str, Path] = {}
        for directory in dirs:
            if not directory.is_dir():
                raise ConfigError(f"{directory}: task folder not found")
            for path in sorted(directory.glob("*.yaml")):
                if not path.name.startswith("_"):
                    self.files[self._name_in(path)] = path

    @staticmethod
    def _name_in(path: Path) -> str:
        tree = load_yaml(path)
        name = tree.get("task", tree.get("group"))
        if not isinstance(name, str):
            raise ConfigError(f"{path}: a task file needs a `task:` (or `group:`) name")
        return name

    @property
    def names(self) -> list[str]:
        return sorted(self.files)

    def get(self, name: str) -> Entry:
        if name not in self.files:
            close = difflib.get_close_matches(name, self.names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"available: {', '.join(self.names)}"
            raise ConfigError(f"unknown task {name!r}; {hint}")
        path = self.files[name]
        return parse_entry(read_task_file(path), str(path))

    def plan(self, requested: list[str | dict]) -> Plan:
        """Resolve names (tasks or groups) and inline definitions into leaf tasks and groups."""
        plan = Plan(requested=[], tasks=[])
        for i, item in enumerate(requested):
            entry = self.get(item) if isinstance(item, str) else parse_entry(item, f"<config tasks.{i}>")
            if entry_name(entry) in plan.requested:
                continue
            plan.requested.append(entry_name(entry))
            if isinstance(entry, TaskGroup):
                members = [self._leaf(name, entry) for name in entry.tasks]
                plan.groups.append((entry, [m.task for m in members]))
                plan.tasks.extend(members)
            else:
                plan.tasks.append(entry)
        plan.tasks = list({task.task: task for task in plan.tasks}.values())
        return plan

    def _leaf(self, name: str, group: TaskGroup) -> Task:
        entry = self.get(name)
        if isinstance(entry, TaskGroup):
            raise ConfigError(f"{group.source}: group {group.group!r} lists the group {name!r}; groups hold tasks only")
        return entry
