"""Model cards: ``MODEL_CARD.md`` with Hugging Face front matter, filled from a run directory's artifacts.

:class:`CardConfig` is the recipe's ``card:`` section; :func:`write_card` writes the card (``medfoundry card``).
"""

from medfoundry.card.config import CardConfig
from medfoundry.card.write import add_subcommand, write_card

__all__ = ["CardConfig", "add_subcommand", "write_card"]
