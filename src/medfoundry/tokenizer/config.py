"""Typed configuration of ``medfoundry tokenizer train`` and ``medfoundry tokenize``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medfoundry.config import StrictModel
from medfoundry.executor import ExecutorConfig

BIOMEDLM_TERMS = ["chromatography", "cytotoxicity", "Immunohistochemistry", "photosynthesis", "probiotic"]


class SpecialTokens(StrictModel):
    eos: str = "<|endoftext|>"
    pad: str = "<|pad|>"
    chat: list[str] = Field(
        default_factory=lambda: ["<|im_start|>", "<|im_end|>"], description="reserved for chat fine-tuning"
    )
    extra: list[str] = Field(default_factory=list)

    def all(self) -> list[str]:
        return list(dict.fromkeys([self.eos, self.pad, *self.chat, *self.extra]))


class FertilityConfig(StrictModel):
    references: dict[str, str] = Field(
        default_factory=dict, description="name -> tokenizer directory, e.g. {gpt2: ../shared/data/tokenizers/gpt2}"
    )
    terms: list[str] = Field(default_factory=lambda: list(BIOMEDLM_TERMS))
    top_domain_words: int = Field(20, ge=0, description="also show the most frequent long words of the corpus")
    min_word_chars: int = Field(10, ge=4)
    max_docs: int | None = Field(None, gt=0, description="cap on validation documents measured")


class TokenizerTrainConfig(StrictModel):
    corpus_dir: str = Field(
        description="a built corpus (medfoundry corpus build); its train split is the training text"
    )
    output_dir: str
    vocab_size: int = Field(28_896, ge=300, description="BioMedLM used 28,896")
    min_frequency: int = Field(2, ge=1)
    pretokenizer: Literal["biomedical", "gpt2"] = Field(
        "biomedical",
        description="biomedical keeps compounds such as IL-6, COVID-19, mg/kg, 5-fluorouracil and decimals "
        "in one piece",
    )
    sources: list[str] | None = Field(None, description="train only on these corpus sources (e.g. [abstracts, papers])")
    max_chars: int | None = Field(None, gt=0, description="stop reading training text after this many characters")
    model_max_length: int = Field(1024, gt=0)
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens)
    fertility: FertilityConfig = Field(default_factory=FertilityConfig)


class ExtendConfig(StrictModel):
    """Add domain tokens to an existing tokenizer for continued pretraining; every existing id is kept."""

    base_dir: str = Field(
        description="tokenizer to extend: a directory (tokenizer.json, or vocab.json + merges.txt), a Hub id "
        "(org/name[@revision]) or a .gguf model file"
    )
    corpus_dir: str
    output_dir: str
    add_tokens: int = Field(gt=0, description="number of new vocabulary entries")
    min_frequency: int = Field(20, ge=1, description="a word must occur this often in the train split to be considered")
    sources: list[str] | None = None
    max_chars: int | None = Field(None, gt=0)
    fertility: FertilityConfig = Field(default_factory=FertilityConfig)


class TokenizeConfig(StrictModel):
    corpus_dir: str
    tokenizer_dir: str
    output_dir: str
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    eos_token: str | None = Field(None, description="default: the tokenizer's eos_token")
    workers: int = Field(0, ge=0, description="local executor: processes, 0 = one per CPU core")
    executor: ExecutorConfig = Field(
        default_factory=ExecutorConfig, description="where the parts are tokenized: local processes or a Slurm job"
    )

    @model_validator(mode="after")
    def _distinct_dirs(self) -> TokenizeConfig:
        if self.output_dir in (self.corpus_dir, self.tokenizer_dir):
            raise ValueError("output_dir must differ from corpus_dir and tokenizer_dir")
        return self
