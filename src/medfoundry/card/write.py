"""``medfoundry card RUN_DIR``: the card file, its copy in the model directory, and the subcommand."""

from __future__ import annotations

from pathlib import Path

from medfoundry.card.artifacts import Run, load_run
from medfoundry.card.config import CardConfig
from medfoundry.config import apply_overrides, load_yaml, validate
from medfoundry.errors import InputError
from medfoundry.io import write_text

CARD_NAME = "MODEL_CARD.md"


def read_recipe(run_dir: Path) -> dict:
    """The recipe the run was made with (``recipe.yaml``, written by ``medfoundry run``), or ``{}``."""
    path = run_dir / "recipe.yaml"
    return load_yaml(path) if path.is_file() else {}


def card_config(recipe: dict, overrides: list[str], source: str) -> CardConfig:
    """The recipe's ``card:`` section with ``key=value`` overrides on top."""
    tree = apply_overrides(dict(recipe.get("card") or {}), overrides)
    return validate(CardConfig, tree, source)


def render(run: Run) -> str:
    from medfoundry.card.front_matter import front_matter
    from medfoundry.card.sections import SECTIONS, opening

    if run.model_path is None:
        raise InputError(str(run.dir), "no model to describe: the run has no pretrain, finetune or eval stage")
    blocks = [opening(run), *(section(run) for section in SECTIONS)]
    return front_matter(run) + "\n" + "\n\n".join("\n".join(block) for block in blocks) + "\n"


def write_card(run_dir: Path, overrides: list[str] | None = None) -> Path:
    """Write ``run_dir/MODEL_CARD.md`` and, for a model the run trained, the same text as its ``README.md``
    (the file the Hugging Face Hub shows). Returns the card's path."""
    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    card = card_config(recipe, overrides or [], f"{run_dir / 'recipe.yaml'}: card")
    run = load_run(run_dir, card, recipe)
    content = render(run)
    path = run_dir / CARD_NAME
    write_text(path, content)
    if run.final is not None:
        write_text(run.final.model.path / "README.md", content)
    return path


def add_subcommand(commands, func) -> None:
    """Register ``medfoundry card`` with ``func`` as its handler."""
    card = commands.add_parser(
        "card", help="write MODEL_CARD.md (Hugging Face front matter and model-index) from a run directory's manifests"
    )
    card.add_argument("run_dir", help="a run directory (medfoundry run), or a pretrain / finetune output directory")
    card.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a card field on top of recipe.yaml's card section, e.g. --set license=apache-2.0 (repeatable)",
    )
    card.set_defaults(func=func)
