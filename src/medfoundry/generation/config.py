"""Typed configuration of generation: how tokens are chosen (:class:`SamplingConfig`), which model the engine
loads (:class:`EngineConfig`), and the ``generate`` and ``chat`` commands built on them.

:class:`SamplingConfig` is the one set of sampling names: the ``generate``, ``chat`` and ``serve`` flags, the
recipe's ``generate`` stage, eval's chain-of-thought settings and the server's request mapping all fill it,
and the engine reads it per request. Importing this module does not load torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from medfoundry.config import StrictModel
from medfoundry.errors import InputError

GREEDY_BELOW = 1e-5  # a smaller temperature is greedy (as in vLLM): dividing logits by it overflows to inf, then NaN


class SamplingConfig(StrictModel):
    """How one generation chooses its tokens. Conventions follow the OpenAI API and vLLM: ``temperature`` 0 is
    greedy; ``top_k`` 0 (or -1) and ``top_p`` 1 disable those filters; ``frequency_penalty`` and
    ``presence_penalty`` count generated tokens only, ``repetition_penalty`` the prompt's too."""

    max_tokens: int = Field(256, ge=1, description="tokens to generate at most")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_k: int = Field(0, ge=-1, description="sample among the k likeliest tokens (0 or -1 = all)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages repeating prompt or output tokens")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="per earlier occurrence in the output")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="once per token present in the output")
    stop: list[str] | None = Field(None, description="stop before any of these texts (cut out of the output)")
    seed: int | None = Field(None, description="makes sampling reproducible; default: a random seed per generation")
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token")

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, value: int) -> int:
        return max(value, 0)  # vLLM's -1 means "off", like 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def stops(self) -> tuple[str, ...]:
        """The non-empty stop sequences."""
        return tuple(s for s in self.stop or () if s)


class EngineConfig(StrictModel):
    """A model loaded into the generation engine: what ``generate``, ``chat`` and ``serve`` share."""

    model: str = Field(description="Hugging Face checkpoint directory, Hub id (org/name[@revision]) or .gguf file")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 where the hardware computes in bf16, else fp32"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    threads: int = Field(0, ge=0, description="CPU threads (0 = all)")
    max_batch: int = Field(8, ge=1, description="requests generated together")
    max_seq_len: int | None = Field(
        None, ge=2, description="prompt + generated tokens per request (default: the model's context, at most 2048)"
    )
    chat_template: str | None = Field(None, description="Jinja chat template file (default: the tokenizer's)")
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="compile the decode step with torch.compile (auto: on a CUDA GPU with Triton, and in serve, "
        "where it is compiled at start-up, on a CPU too)",
    )
    allow_pickle: bool = Field(
        False, description="allow pickled weights (pytorch_model.bin), loaded with torch.load(weights_only=True)"
    )

    def load_engine(self, *, long_lived: bool = False):
        """The :class:`~medfoundry.generation.engine.Engine` on this model; ``long_lived``: for a process that
        serves many requests (see :func:`medfoundry.generation.compiled.should_compile`)."""
        from medfoundry.generation.engine import Engine

        return Engine.load(
            self.model,
            precision=self.precision,
            device=self.device,
            threads=self.threads,
            max_batch=self.max_batch,
            max_seq_len=self.max_seq_len,
            allow_pickle=self.allow_pickle,
            compile=self.compile,
            long_lived=long_lived,
        )

    def template(self) -> str | None:
        """The chat template file's text, or None for the tokenizer's own."""
        if not self.chat_template:
            return None
        path = Path(self.chat_template)
        if not path.is_file():
            raise InputError(str(path), "chat template not found")
        return path.read_text(encoding="utf-8")


class GenerateConfig(EngineConfig):
    """Prompts answered by a model, written as JSONL records (``medfoundry generate``, the recipe's ``generate``)."""

    prompts: list[str] = Field(default_factory=list)
    prompts_file: str | None = Field(
        None,
        description="a .jsonl file with a 'prompt' field per line (other fields are copied to the output), "
        "or a text file with one prompt per line; read after `prompts`",
    )
    chat: bool | None = Field(
        None, description="send each prompt as a user message through the chat template; default: when there is one"
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    output: str | None = Field(None, description="JSONL file to write (default: standard output)")

    @model_validator(mode="before")
    @classmethod
    def _sampling_nested(cls, data):
        misplaced = sorted(set(data) & set(SamplingConfig.model_fields)) if isinstance(data, dict) else []
        if misplaced:
            raise ValueError(
                f"{', '.join(misplaced)}: sampling fields go under sampling (e.g. sampling: {{max_tokens: 64}})"
            )
        return data

    @model_validator(mode="after")
    def _some_prompts(self) -> GenerateConfig:
        if not self.prompts and not self.prompts_file:
            raise ValueError("no prompts: give them as arguments or with --file (prompts or prompts_file)")
        return self


class ChatConfig(EngineConfig):
    """A conversation in the terminal (``medfoundry chat``)."""

    system: str | None = Field(None, description="system message that starts the conversation")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.7))
