"""Model cards: ``MODEL_CARD.md`` with Hugging Face front matter, filled from a run directory's artifacts.

:class:`CardConfig` is the recipe's ``card:`` section; :func:`write_card` writes the card, :func:`card_stage` the
card with its manifest (``medfoundry card``, the recipe's card stage).
"""

from medfoundry.card.config import CardConfig, CardRunConfig
from medfoundry.card.write import card_stage, write_card

__all__ = ["CardConfig", "CardRunConfig", "card_stage", "write_card"]
