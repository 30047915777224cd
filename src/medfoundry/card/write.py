"""``medfoundry card RUN_DIR``: the card file, its copy in the model directory, and the card stage."""

from __future__ import annotations

import time
from pathlib import Path

from medfoundry.card.artifacts import STAGE_DIRS, Run, load_run
from medfoundry.card.config import CardConfig, CardRunConfig
from medfoundry.config import apply_overrides, load_yaml, validate
from medfoundry.errors import InputError
from medfoundry.io import write_text
from medfoundry.manifest import MANIFEST, Manifest, output_fingerprint

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


def card_stage(cfg: CardRunConfig) -> Manifest:
    """The card stage: write the card, and its manifest in ``run_dir/card`` (the manifests it was made from are
    its inputs)."""
    start = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    path = write_card(run_dir, cfg.overrides)
    sources = [run_dir, *(run_dir / name for name in STAGE_DIRS)]
    manifest = Manifest(
        stage="card",
        config=cfg.model_dump(mode="json"),
        inputs={str(d): output_fingerprint(d) for d in sources if (d / MANIFEST).is_file()},
        outputs={"card": f"../{CARD_NAME}"},
        timings={"total_s": time.perf_counter() - start},
        details={"card": str(path)},
    )
    manifest.write(run_dir / "card")
    return manifest
