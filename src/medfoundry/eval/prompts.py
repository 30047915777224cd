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

A chat style (``chat: true``; the built-in ``instruct``) asks a fine-tuned chat model exactly as
``medfoundry finetune`` trained it on the same benchmark data (``medfoundry.sft.converters``): its
context is a list of messages, ``[system (the description)] + (user, assistant) * k + user``, as
lm-eval's ``fewshot_as_multiturn``; :func:`chat_prompt` renders them at run time with the evaluated
model's own chat template and the generation prompt, and the continuations (``target_delimiter``
+ choice, the delimiter empty) are scored right after it. With ``options_apart`` a multiple-choice
user turn is the converters' own: the question stripped, the options kept apart as
``message["options"]``, and each choice the converters' answer ``"A. <option text>"``.
"""

from __future__ import annotations

import ast
import re

from medfoundry.errors import ConfigError, MedfoundryError
from medfoundry.eval.fields import Doc, lookup, render
from medfoundry.eval.tasks import ChoiceTask
from medfoundry.sft.converters import multiple_choice
from medfoundry.sft.formats import Conversation, Message

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# a chat template that lays out a question's options itself reads them from the message
_READS_OPTIONS = re.compile(r"""message\s*(\[\s*['"]options['"]\s*\]|\.options\b)""")


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """A chat style's context rendered with the tokenizer's chat template and the generation prompt.

    Options go to the template as ``message["options"]`` when it renders them (the built-in chatml and
    biomed_llama templates do); any other template gets them folded into the content as
    :meth:`Message.folded` does, which is how the SFT Renderer trains with a model's own template.
    """
    keep_options = bool(_READS_OPTIONS.search(tokenizer.get_chat_template()))
    turns = messages if keep_options else [_folded(turn) for turn in messages]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def _folded(turn: dict) -> dict:
    return {"role": turn["role"], "content": Message(turn["role"], turn["content"], turn.get("options")).folded()}


def _turn(message: Message) -> dict:
    """A message as ``apply_chat_template`` takes it, with its options (if any) kept apart."""
    turn = {"role": message.role, "content": message.content}
    return {**turn, "options": dict(message.options)} if message.options else turn


def _known_styles(task: ChoiceTask) -> str:
    """The task's prompt styles, chat styles apart (they need a model with a chat template)."""
    plain = [name for name, spec in task.prompts.items() if not spec.chat]
    chat = [name for name, spec in task.prompts.items() if spec.chat]
    listed = f"(it has {', '.join(plain) or 'no plain-text style'})"
    return listed + (f"; chat styles, for models with a chat template: {', '.join(chat)}" if chat else "")


class PromptBuilder:
    """One task in one prompt style: questions, choices, targets and demonstrations of its documents."""

    def __init__(self, task: ChoiceTask, style: str):
        if style not in task.prompts:
            raise ConfigError(f"{task.source}: task {task.task} has no prompt style {style!r} {_known_styles(task)}")
        self.task, self.style, self.spec = task, style, task.prompts[style]
        if self.spec.options_apart and task.options is None:
            raise ConfigError(
                f"{task.source}: prompts.{style}.options_apart needs the task's `options` field "
                "(where each document's option texts are)"
            )

    def _where(self, field: str) -> str:
        return f"{self.task.source}: {field}"

    def question(self, doc: Doc, *, cot: bool = False) -> str:
        if not cot:
            return render(self.spec.text, doc.fields, self._where(f"prompts.{self.style}.text"))
        if self.spec.cot_text is None:
            raise ConfigError(
                f"{self.task.source}: prompts.{self.style} has no cot_text, so task {self.task.task} "
                "cannot run in chain-of-thought mode with this style"
            )
        return render(self.spec.cot_text, doc.fields, self._where(f"prompts.{self.style}.cot_text"))

    def choices(self, doc: Doc) -> list[str]:
        """What is scored: the labels, or with ``options_apart`` the converters' answers ``"A. <option text>"``."""
        if not self.spec.options_apart:
            return self._labels(doc)
        return [self._converted(doc, letter).messages[-1].content for letter in self._labels(doc)]

    def _labels(self, doc: Doc) -> list[str]:
        """The choices of the task (or of this style), which the target indexes: letters for multiple choice."""
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
        spec, choices = self.task.target, self._labels(doc)
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
            raise MedfoundryError(
                f"task {self.task.task} ({self.task.source}): document {doc.id} has target "
                f"{spec.field}={value!r}, not a valid {spec.kind} for choices {choices}"
            )
        return index

    def options(self, doc: Doc) -> list[str] | None:
        """The options' texts in choice order (for answers that name an option instead of its letter)."""
        if self.task.options is None:
            return None
        value = lookup(doc.fields, self.task.options, self._where("options"))
        return [str(v) for v in (value.values() if isinstance(value, dict) else value)]

    def _converted(self, doc: Doc, letter: str) -> Conversation:
        """The document as medfoundry.sft's converters make a multiple-choice conversation, answered ``letter``."""
        letters, texts = self._labels(doc), self.options(doc)
        if len(letters) != len(texts):
            raise ConfigError(
                f"{self._where('options')}: document {doc.id} has {len(texts)} options for the "
                f"{len(letters)} choices {letters}"
            )
        options = dict(zip(letters, texts))
        return multiple_choice(self.question(doc), options, letter, None, self.task.source, None, doc.id)

    def _user_turn(self, doc: Doc) -> dict:
        if self.spec.options_apart:
            return _turn(self._converted(doc, self._labels(doc)[self.target(doc)]).messages[0])
        return _turn(Message("user", self.question(doc)))

    def demonstration(self, doc: Doc) -> str | list[dict]:
        """A solved example: the question, the target delimiter and the correct choice; for a chat style the
        user turn and the assistant's answer (the correct choice, as lm-eval's multi-turn few-shot)."""
        answer = self.choices(doc)[self.target(doc)]
        if self.spec.chat:
            return [self._user_turn(doc), {"role": "assistant", "content": answer}]
        return self.question(doc) + self.spec.target_delimiter + answer

    def context(self, doc: Doc, demonstrations: list, *, cot: bool = False) -> str | list[dict]:
        """The text before the continuations; for a chat style the messages its chat template renders."""
        if self.spec.chat:
            return self._chat_context(doc, demonstrations, cot)
        delimiter = self.spec.fewshot_delimiter
        return self.spec.description + "".join(d + delimiter for d in demonstrations) + self.question(doc, cot=cot)

    def _chat_context(self, doc: Doc, demonstrations: list[list[dict]], cot: bool) -> list[dict]:
        if cot:
            raise ConfigError(
                f"{self.task.source}: prompts.{self.style} is a chat style, scored by log-likelihood "
                f"only, so task {self.task.task} cannot run in chain-of-thought mode with it"
            )
        system = [{"role": "system", "content": self.spec.description}] if self.spec.description else []
        return system + [turn for demo in demonstrations for turn in demo] + [self._user_turn(doc)]
