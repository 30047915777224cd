"""Prompt strings: a task's documents rendered in one prompt style.

The context of a question is built exactly as lm-eval 0.4 builds it for plain-text (non-chat)
multiple choice::

    description + (demo_text + target_delimiter + demo_answer + fewshot_delimiter) * k + question_text

and each continuation is ``target_delimiter + choice``. The two built-in styles:

* ``lm_eval`` (default): lm-eval's own ``doc_to_text`` strings for pubmedqa, medqa_4options, medmcqa
  and mmlu_* (with MMLU's description line), byte for byte; medqa_5options extends the MedQA format
  with option E (lm-eval has no 5-option task).
* ``meditron``: Meditron's evaluation format (epfLLM/meditron ``evaluation/benchmarks.py``:
  ``format_mcq`` renders ``Question: ...?\\n\\nOptions:\\nA. ...``; ``inference.py`` joins
  ``system + "\\n" + prompt + "\\n" + "The answer is:"``, with the per-benchmark system prompts of
  ``evaluation/instructions.json``, which ``inference.py`` loads; the copy used here is the one kept in
  forks of the repository, e.g. iimpulse/meditron; few-shot demonstrations are
  ``prompt + "\\nThe answer is: " + gold`` joined by blank lines). Meditron generates after the
  instruction; scoring a continuation `` X`` after ``The answer is:`` is the same string its few-shot
  demonstrations show. Its chain-of-thought prompt ends with the instruction "Let's think step by
  step." and a newline, as its zero-shot prompts do.

In chain-of-thought mode the question uses the style's ``cot_text``; demonstrations stay solved
examples (question and answer), as no worked reasoning ships with these benchmarks.
"""

from __future__ import annotations

import ast

from medfoundry.errors import ConfigError, MedfoundryError
from medfoundry.eval.fields import Doc, lookup, render
from medfoundry.eval.tasks import ChoiceTask

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class PromptBuilder:
    """One task in one prompt style: questions, choices, targets and demonstrations of its documents."""

    def __init__(self, task: ChoiceTask, style: str):
        if style not in task.prompts:
            raise ConfigError(f"{task.source}: task {task.task} has no prompt style {style!r} "
                              f"(it has {', '.join(task.prompts)})")
        self.task, self.style, self.spec = task, style, task.prompts[style]

    def _where(self, field: str) -> str:
        return f"{self.task.source}: {field}"

    def question(self, doc: Doc, *, cot: bool = False) -> str:
        if not cot:
            return render(self.spec.text, doc.fields, self._where(f"prompts.{self.style}.text"))
        if self.spec.cot_text is None:
            raise ConfigError(f"{self.task.source}: prompts.{self.style} has no cot_text, so task {self.task.task} "
                              "cannot run in chain-of-thought mode with this style")
        return render(self.spec.cot_text, doc.fields, self._where(f"prompts.{self.style}.cot_text"))

    def choices(self, doc: Doc) -> list[str]:
        spec = self.spec.choices or self.task.choices
        if isinstance(spec, list):
            return spec
        where = self._where("choices")
        try:
            value = ast.literal_eval(render(spec, doc.fields, where))
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise ConfigError(f"{where}: must render a non-empty list of non-empty strings (document {doc.id})")
        return value

    def continuations(self, doc: Doc) -> list[str]:
        return [self.spec.target_delimiter + choice for choice in self.choices(doc)]

    def target(self, doc: Doc) -> int:
        """Index of the correct choice."""
        spec, choices = self.task.target, self.choices(doc)
        value = lookup(doc.fields, spec.field, self._where("target.field"))
        text = str(value).strip()
        if spec.kind == "choice":
            index = choices.index(text) if text in choices else None
        elif spec.kind == "letter":
            index = LETTERS.index(text.upper()) if len(text) == 1 and text.upper() in LETTERS else None
        elif spec.kind == "index":
            index = int(text) if text.lstrip("-").isdigit() else None
        else:
            index = spec.map.get(text)
        if index is None or not 0 <= index < len(choices):
            raise MedfoundryError(f"task {self.task.task} ({self.task.source}): document {doc.id} has target "
                                  f"{spec.field}={value!r}, not a valid {spec.kind} for choices {choices}")
        return index

    def options(self, doc: Doc) -> list[str] | None:
        """The options' texts in choice order (for answers that name an option instead of its letter)."""
        if self.task.options is None:
            return None
        value = lookup(doc.fields, self.task.options, self._where("options"))
        return [str(v) for v in (value.values() if isinstance(value, dict) else value)]

    def demonstration(self, doc: Doc) -> str:
        """A solved example: the question, the target delimiter and the correct choice."""
        return self.question(doc) + self.spec.target_delimiter + self.choices(doc)[self.target(doc)]

    def context(self, doc: Doc, demonstrations: list[str], *, cot: bool = False) -> str:
        delimiter = self.spec.fewshot_delimiter
        return self.spec.description + "".join(d + delimiter for d in demonstrations) + self.question(doc, cot=cot)
