"""The recipe's ``card:`` section: what a run's artifacts cannot tell about its model.

Kept free of heavy imports: the recipe runner imports :class:`CardConfig` to validate recipes.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from medfoundry.config import StrictModel


class CardConfig(StrictModel):
    """Every field is optional; the card states what is not given instead of leaving a blank."""

    model_name: str | None = Field(
        None, description="the model's name (default: the recipe's name, else the run folder's)"
    )
    description: str | None = Field(None, description="opening paragraph (default: the recipe's description)")
    developers: str | None = Field(None, description="who trained the model")
    license: str | None = Field(None, description="a Hugging Face license id, e.g. apache-2.0")
    language: list[str] = Field(
        default_factory=list, description="ISO 639-1 codes (default: the corpus's language filter, else en)"
    )
    datasets: list[str] = Field(default_factory=list, description="Hugging Face Hub ids of the training data")
    base_model: str | None = Field(
        None, description="Hub id of the model training started from (front matter base_model)"
    )
    repo_id: str | None = Field(
        None,
        description="Hub id the model is published under (used in the loading example; "
        "default: the local model directory)",
    )
    tags: list[str] = Field(default_factory=list, description="added to medical, biomedical, medfoundry")
    intended_uses: str | None = Field(None, description="replaces the stock direct-use paragraph")
    out_of_scope_uses: str | None = Field(None, description="added to the stock out-of-scope uses")
    limitations: str | None = Field(None, description="added to the stock bias, risks and limitations")
    hardware: str | None = Field(None, description="the training hardware, when the card is written on another machine")
    power_watts: float | None = Field(
        None,
        gt=0,
        description="average power draw per training process, in W (default: an assumed figure per device kind)",
    )
    grid_intensity: float | None = Field(
        None, ge=0, description="grid carbon intensity in gCO2eq/kWh; emissions are estimated only when given"
    )
    citation: str | None = Field(None, description="BibTeX entry for this model")

    @field_validator("language", mode="before")
    @classmethod
    def _one_language(cls, value):
        return [value] if isinstance(value, str) else value


class CardRunConfig(StrictModel):
    """``medfoundry card``: the card of a run directory (``medfoundry run``) or of a pretrain / finetune output."""

    run_dir: str = Field(description="the run directory, or a pretrain / finetune output directory")
    overrides: list[str] = Field(
        default_factory=list, description="card fields set on top of recipe.yaml's card section, as key=value"
    )
