"""``medfoundry run RECIPE``: every stage of a recipe in order, each skipped when already done.

A stage's key hashes its wired config, the keys of the stages before it, the package version and a
fingerprint (path, size, modification time) of every file outside the run directory that its config
names (corpus sources, a model to continue, benchmark files). ``run_dir/stages.json`` records each
stage's key and status; a stage whose recorded key matches and which finished is skipped, so
re-running a recipe does nothing, and changing a stage reruns it and every stage after it. A stage
that was interrupted with the same key is run again into the same directory, where the stage's own
resumption applies (training continues from its last checkpoint); every stage after a stage that ran
runs again too, since it read the old output. A stage whose key changed starts
from an empty directory: the old one is kept as ``run_dir/.previous/<stage>`` until the next change,
never deleted outright.

Each stage's wired config is written to ``run_dir/configs/<stage>.yaml``, so any stage can be rerun
alone with its own command (``medfoundry pretrain runs/x/configs/pretrain.yaml``, or under torchrun).
The run ends with ``run_dir/report.md`` (:mod:`medfoundry.recipe.report`) and ``run_dir/run.json``.
"""

from __future__ import annotations

import glob
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import xxhash
import yaml

from medfoundry import __version__
from medfoundry.config import StrictModel, apply_overrides, load_yaml, validate
from medfoundry.errors import ConfigError
from medfoundry.io import write_json, write_text
from medfoundry.recipe.config import RecipeConfig, final_model, wire


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    tree = apply_overrides(load_yaml(path), overrides or [])
    return validate(RecipeConfig, tree, str(path))


def run_recipe(
    recipe: RecipeConfig,
    *,
    start: str | None = None,
    until: str | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or, with ``dry_run``, plan) the recipe's stages; returns the run summary written to run.json.

    ``start`` reruns that stage and every later one even when done; ``until`` stops after that stage.
    """
    configs = wire(recipe)  # every stage validated before any work
    present = recipe.present()
    for name, option in ((start, "--from"), (until, "--until")):
        if name is not None and name not in present:
            raise ConfigError(f"{option} {name}: not a stage of this recipe (its stages: {', '.join(present)})")
    run = Path(recipe.run_dir)
    state = _read_state(run)
    keys = _keys(recipe, configs, present)
    chosen = present[: present.index(until) + 1] if until else present
    forced = set(present[present.index(start) :]) if start else set()
    summary = {"recipe": recipe.name, "version": __version__, "run_dir": str(run), "stages": {}}
    if not dry_run:
        run.mkdir(parents=True, exist_ok=True)
        write_text(
            run / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)
        )
    for stage in chosen:
        done = state.get(stage, {})
        cached = done.get("key") == keys[stage] and done.get("status") == "done" and stage not in forced
        if cached:
            log(f"run: {stage}: done earlier (key {keys[stage][:12]}), skipped")
            summary["stages"][stage] = {**done, "this_run": "cached"}
            continue
        if dry_run:
            log(f"run: {stage}: would run (key {keys[stage][:12]})")
            summary["stages"][stage] = {"key": keys[stage], "this_run": "would run"}
            continue
        if done.get("key") != keys[stage] or stage in forced:
            _supersede(run, stage)
        summary["stages"][stage] = {**_run_stage(recipe, configs, stage, keys[stage], state, log), "this_run": "ran"}
        forced |= set(present[present.index(stage) + 1 :])  # what follows read this stage's new output
    if not dry_run:
        from medfoundry.recipe.report import write_report

        summary["report"] = str(write_report(recipe, run, _read_state(run)))
        write_json(run / "run.json", summary)
    return summary


def _run_stage(recipe: RecipeConfig, configs: dict, stage: str, key: str, state: dict, log) -> dict:
    run = Path(recipe.run_dir)
    if stage in configs:
        write_text(
            run / "configs" / f"{stage}.yaml", yaml.safe_dump(configs[stage].model_dump(mode="json"), sort_keys=False)
        )
    log(f"run: {stage}: running (key {key[:12]})")
    started = time.time()
    state[stage] = {"key": key, "status": "running", "started": started}
    _write_state(run, state)
    result = STAGE_RUNNERS[stage](recipe, configs.get(stage))
    state[stage] = {
        "key": key,
        "status": "done",
        "started": started,
        "seconds": round(time.time() - started, 1),
        "result": result,
    }
    _write_state(run, state)
    log(f"run: {stage}: done in {state[stage]['seconds']:,.0f} s")
    return state[stage]


# ---------------------------------------------------------------------------------------------- keys


def _keys(recipe: RecipeConfig, configs: dict[str, StrictModel], present: list[str]) -> dict[str, str]:
    """Chained keys: each stage's hash covers every earlier stage's key."""
    keys, previous = {}, ""
    run = Path(recipe.run_dir).resolve()
    for stage in present:
        payload = (recipe.card if stage == "card" else configs[stage]).model_dump(mode="json")
        digest = xxhash.xxh3_128(
            json.dumps([stage, payload, previous, __version__], sort_keys=True, default=str).encode()
        )
        for fingerprint in _external_files(payload, run):
            digest.update(fingerprint.encode())
        keys[stage] = previous = digest.hexdigest()
    return keys


def _external_files(payload, run: Path) -> list[str]:
    """``path size mtime`` of every existing file a config string names (a file, a folder's files, or a glob)
    outside the run directory: changed inputs change the key."""
    found = []
    for value in _strings(payload):
        if len(value) > 4096 or "\n" in value:
            continue
        paths = [Path(p) for p in sorted(glob.glob(value))] if any(c in value for c in "*?[") else [Path(value)]
        for path in paths:
            try:
                resolved = path.resolve()
                if resolved == run or run in resolved.parents or not path.exists():
                    continue
            except OSError:
                continue
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            found += [f"{f} {f.stat().st_size} {f.stat().st_mtime_ns}" for f in files]
    return found


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


# ---------------------------------------------------------------------------------------------- state


def _read_state(run: Path) -> dict:
    path = run / "stages.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg}); remove it to rerun every stage") from None


def _write_state(run: Path, state: dict) -> None:
    write_json(run / "stages.json", state)


def _supersede(run: Path, stage: str) -> None:
    """Move the stage's old output aside (``.previous/<stage>``, replacing an older one) before it is rebuilt."""
    out = run / stage
    if not out.exists():
        return
    keep = run / ".previous" / stage
    if keep.exists():
        shutil.rmtree(keep)
    keep.parent.mkdir(parents=True, exist_ok=True)
    out.rename(keep)


# ---------------------------------------------------------------------------------------------- stages


def _corpus(recipe, cfg) -> dict:
    from medfoundry.corpus.build import build_corpus

    manifest = build_corpus(cfg)
    return {"documents_in": manifest["documents_in"], "documents_out": manifest["documents_out"]}


def _tokenizer(recipe, cfg) -> dict:
    from medfoundry.tokenizer.train import train_tokenizer

    manifest = train_tokenizer(cfg)
    return {
        "vocab_size": manifest["vocab_size"],
        "tokens_per_word": manifest["fertility"]["medfoundry"]["tokens_per_word"],
    }


def _tokens(recipe, cfg) -> dict:
    from medfoundry.tokenizer.shards import tokenize_corpus

    manifest = tokenize_corpus(
        Path(cfg.corpus_dir),
        Path(cfg.tokenizer_dir),
        Path(cfg.output_dir),
        eos_token=cfg.eos_token,
        dtype=cfg.dtype,
        workers=cfg.workers,
    )
    return {name: split["tokens"] for name, split in manifest["splits"].items()}


def _pretrain(recipe, cfg) -> dict:
    from medfoundry.train.loop import pretrain

    return pretrain(cfg)


def _finetune(recipe, cfg) -> dict:
    from medfoundry.sft.finetune import finetune

    return finetune(cfg)


def _eval(recipe, cfg) -> dict:
    from medfoundry.eval.run import evaluate

    result = evaluate(cfg, progress=True)
    return {"report": result["report"], "table": result["table"]}


def _generate(recipe, cfg) -> dict:
    from medfoundry.recipe.sample import generate_samples

    return generate_samples(final_model(recipe), cfg, Path(recipe.run_dir) / "generate" / "samples.jsonl")


def _card(recipe, cfg) -> dict:
    from medfoundry.card import write_card

    return {"card": str(write_card(Path(recipe.run_dir)))}


STAGE_RUNNERS: dict[str, Callable[[RecipeConfig, StrictModel | None], dict]] = {
    "corpus": _corpus,
    "tokenizer": _tokenizer,
    "tokens": _tokens,
    "pretrain": _pretrain,
    "finetune": _finetune,
    "eval": _eval,
    "generate": _generate,
    "card": _card,
}
