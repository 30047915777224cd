"""Chat templates and prompt-loss masks: a conversation becomes token ids plus a per-token loss flag.

Every template is a Jinja chat template stored with the tokenizer, so the text a model is trained on
is exactly what ``tokenizer.apply_chat_template`` produces later at evaluation and serving time:
``chatml`` (Meditron: ``<|im_start|>``/``<|im_end|>`` added as special tokens, and ``<|im_end|>``
made the end-of-sequence token so generation stops at the end of a turn), ``biomed_llama``
(``### Question`` / ``### Options`` / ``### Answer``, each answer closed by the EOS token), and
``model`` (the base tokenizer's own template).

The loss mask comes from rendering, not from searching tokens: for each assistant turn the template
renders the conversation up to that turn with the generation prompt, then with the turn itself; the
first must be a prefix of the second (and of everything rendered after it), and the difference is
the response. The whole conversation is tokenized once, and a token carries loss when its characters
overlap a response, so the ids are those of ``apply_chat_template`` on the same messages. Whitespace
that a template prints after a response's closing special token (ChatML's newline after
``<|im_end|>``) carries no loss: generation has stopped by then.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfoundry.errors import ConfigError
from medfoundry.io import lone_surrogate, write_json
from medfoundry.sft.config import TemplateConfig
from medfoundry.sft.formats import Conversation, Message

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

_OPTIONS_JINJA = (
    "{%- if message['options'] is defined and message['options'] -%}{{ '\\n\\n' + options_header }}"
    "{%- for key, value in message['options'].items() -%}{{ '\\n' + key + '. ' + value }}{%- endfor -%}"
    "{%- endif -%}"
)

CHATML = (
    "{%- set options_header = 'Options:' -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}" + _OPTIONS_JINJA + "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

BIOMED_LLAMA = (
    "{%- set options_header = '### Options:' -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' -%}{{ '\\n\\n' }}{%- endif -%}"
    "{{ '### Question:\\n' + message['content'] }}" + _OPTIONS_JINJA + "{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Answer:\\n' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Answer:\\n' }}{%- endif -%}"
)

BUILTIN = {"chatml": CHATML, "biomed_llama": BIOMED_LLAMA}


def load_base_tokenizer(spec: str | Path):
    """The base tokenizer as a ``transformers`` tokenizer.

    ``spec`` is an HF tokenizer or model folder (or a Hub id of one), a GPT-2 style ``vocab.json`` +
    ``merges.txt`` folder (given GPT-2's special-token conventions), or a ``.gguf`` model file (its embedded
    tokenizer). It is staged in a temporary folder, so the folder it is saved to later holds only what
    ``save_pretrained`` writes (a stale ``special_tokens_map.json`` would override the new EOS token).
    """
    from medfoundry.model.export import copy_tokenizer
    from medfoundry.model.load import is_gguf, load_tokenizer, resolve_reference

    spec = resolve_reference(spec)
    if is_gguf(spec):
        return load_tokenizer(spec)
    if not spec.is_dir():
        raise ConfigError(f"tokenizer: {spec} is neither a tokenizer/model folder nor a .gguf file")
    with tempfile.TemporaryDirectory() as staging:
        copy_tokenizer(spec, Path(staging))
        return load_tokenizer(staging)


def install_template(tokenizer, cfg: TemplateConfig) -> list[int]:
    """Give ``tokenizer`` the template of ``cfg`` and return the ids of the tokens this added (the model's
    embeddings must grow by as many rows)."""
    if cfg.name == "model":
        if not tokenizer.chat_template:
            raise ConfigError(
                "template.name is 'model' but the tokenizer has no chat template: use template chatml or biomed_llama"
            )
        return []
    if tokenizer.eos_token is None:
        raise ConfigError(f"template {cfg.name!r} closes every response with the EOS token, but the tokenizer has none")
    added = []
    if cfg.name == "chatml":
        from tokenizers import AddedToken

        missing = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]  # SmolLM2 has them already
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        added = tokenizer.convert_tokens_to_ids(missing)
        tokenizer.eos_token = IM_END
    tokenizer.chat_template = BUILTIN[cfg.name]
    return added


def save_tokenizer(tokenizer, directory: Path, added_ids: list[int], base: str) -> None:
    """Save the tokenizer with its chat template (``chat_template.jinja``); when tokens were added, a
    ``vocab_extension.json`` lets :func:`medfoundry.model.resize.resize_for_tokenizer` grow the model."""
    tokenizer.save_pretrained(str(directory))
    if added_ids:
        write_json(
            directory / "vocab_extension.json",
            {
                "base_dir": str(base),
                "base_vocab_size": added_ids[0],
                "vocab_size": added_ids[-1] + 1,
                "added_ids": added_ids,
                "added_tokens": tokenizer.convert_ids_to_tokens(added_ids),
            },
        )


@dataclass(frozen=True)
class Example:
    """A rendered conversation: token ids and which of them are training targets."""

    ids: np.ndarray  # int64
    loss: np.ndarray  # bool, True where the token is predicted with loss
    boundary_tokens: int  # tokens that straddle a prompt/response boundary (the tokenizer merged across it)


class Renderer:
    """Renders conversations with one tokenizer and template into :class:`Example`."""

    def __init__(self, tokenizer, cfg: TemplateConfig):
        if not tokenizer.chat_template:
            raise ConfigError("the tokenizer has no chat template: call install_template first")
        self.tokenizer, self.cfg = tokenizer, cfg
        self.fold = cfg.name == "model"  # a foreign template knows only 'content': options go into it
        self.end_tokens = tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)

    def messages(self, conversation: Conversation) -> list[dict]:
        """The conversation as ``apply_chat_template`` messages (system prompt added when configured and absent)."""
        turns = list(conversation.messages)
        if self.cfg.system_prompt and conversation.system is None:
            turns.insert(0, Message("system", self.cfg.system_prompt))
        return [_as_dict(m, self.fold) for m in turns]

    def _render(self, messages: list[dict], generation: bool, conversation: Conversation) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as exc:  # jinja errors and the templates' own raise_exception
            raise conversation.error(f"template {self.cfg.name!r} cannot render this record: {exc}") from None

    def response_spans(self, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of the responses that carry loss."""
        messages = self.messages(conversation)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        targets = turns[-1:] if self.cfg.train_on == "last" else turns
        text, spans = "", []
        for i in turns:
            prompt = self._render(messages[:i], True, conversation)
            full = self._render(messages[: i + 1], False, conversation)
            if not prompt.startswith(text) or not full.startswith(prompt):
                raise conversation.error(
                    f"template {self.cfg.name!r} does not render this conversation incrementally (turn {i + 1}: the "
                    "prompt is not a prefix of prompt + response), so the response cannot be located for the loss "
                    "mask; use template chatml or biomed_llama"
                )
            if i in targets:
                spans.append((len(prompt), self._response_end(full, len(prompt), conversation)))
            text = full
        return text, spans

    def _response_end(self, full: str, start: int, conversation: Conversation) -> int:
        """End of the response: after its closing special token, before any whitespace printed after it."""
        stripped = full.rstrip()
        if not stripped.endswith(self.end_tokens) or len(stripped) <= start:
            raise conversation.error(
                f"template {self.cfg.name!r} does not close the assistant turn with a special end token "
                f"(it renders {full[start:][-40:]!r}): the model would never learn to stop"
            )
        return len(stripped)

    def __call__(self, conversation: Conversation) -> Example:
        text, spans = self.response_spans(conversation)
        surrogate = lone_surrogate(text)
        if surrogate is not None:  # the Rust tokenizer takes UTF-8 only: it would fail with a bare UnicodeEncodeError
            raise conversation.error(
                f"the record holds a lone UTF-16 surrogate (\\u{ord(surrogate):04x}), "
                "which is not a character: it cannot be tokenized"
            )
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        loss = np.zeros(len(offsets), dtype=bool)
        straddling = np.zeros(len(offsets), dtype=bool)
        for a, b in spans:
            loss |= (starts < b) & (ends > a)
            straddling |= ((starts < a) & (ends > a)) | ((starts < b) & (ends > b))
        return Example(np.asarray(encoded["input_ids"], dtype=np.int64), loss, int(straddling.sum()))


def _as_dict(message: Message, fold: bool) -> dict:
    if fold or not message.options:
        return {"role": message.role, "content": message.folded() if fold else message.content}
    return {"role": message.role, "content": message.content, "options": dict(message.options)}


def prepare_tokenizer(spec: str, cfg: TemplateConfig, directory: Path):
    """The base tokenizer with the template installed, saved in ``directory``: ``(tokenizer, added ids)``."""
    tokenizer = load_base_tokenizer(spec)
    added = install_template(tokenizer, cfg)
    save_tokenizer(tokenizer, directory, added, spec)
    return tokenizer, added
