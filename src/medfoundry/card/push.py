"""``medfoundry push RUN_DIR REPO_ID``: a run's model on the Hugging Face Hub, in one commit.

The repository gets the exported model's files at its root, the run's ``MODEL_CARD.md`` as ``README.md`` (the
page the Hub shows), the run model's evaluation (``eval/results.json``, ``eval/results.md``) and, on request, the
LoRA adapter in ``adapter/``. RUN_DIR is a run directory (``medfoundry run``: its last training stage's model), a
pretrain / finetune output directory, or a plain Hugging Face model directory whose card is its ``MODEL_CARD.md``
or ``README.md``. Only safetensors weights are pushed: a pickle anywhere in the upload is refused.

The files are linked into a staging folder laid out as the repository will be, and ``upload_folder`` sends that
folder whole, so what ``--dry-run`` lists is exactly what is uploaded. The card's front matter is checked here,
offline, before anything is sent (``ModelCard.validate`` asks the Hub's API; the Hub checks it again on upload).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medfoundry.card.artifacts import TRAINING_STAGES, training_stage
from medfoundry.card.write import CARD_NAME
from medfoundry.errors import ConfigError, InputError, StageFailed
from medfoundry.manifest import MANIFEST, Manifest

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # torch.load / pickle formats
EVAL_FILES = ("results.json", "results.md")
# front matter field -> the types the Hub's model card schema accepts for it
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "license": (str,),
    "license_name": (str,),
    "license_link": (str,),
    "language": (str, list),
    "datasets": (str, list),
    "base_model": (str, list),
    "tags": (list,),
    "metrics": (list,),
    "pipeline_tag": (str,),
    "library_name": (str,),
    "model_name": (str,),
}
LIST_OF_STRINGS = ("language", "datasets", "base_model", "tags", "metrics")


@dataclass(frozen=True)
class Upload:
    """One file of the repository: where it goes and where it comes from."""

    path_in_repo: str
    source: Path

    @property
    def size(self) -> int:
        return self.source.stat().st_size


@dataclass(frozen=True)
class Sources:
    """What a RUN_DIR holds for the repository."""

    model: Path
    card: Path
    eval: Path | None  # the folder with the run model's results.json, if the run evaluated it
    adapter: Path | None  # the LoRA adapter folder, if the run saved one


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "run_dir",
        help="a run directory (medfoundry run), a pretrain / finetune output directory, or a Hugging Face model "
        "directory with its MODEL_CARD.md or README.md",
    )
    command.add_argument("repo_id", help="the Hub repository, e.g. my-org/biomed-gpt2 (created if absent)")
    command.add_argument("--private", action="store_true", help="create the repository private")
    command.add_argument("--dry-run", action="store_true", help="list the files and check the card; upload nothing")
    command.add_argument("--revision", metavar="BRANCH", help="push to this branch (created if absent); default main")
    command.add_argument("--commit-message", metavar="TEXT", help="default: 'Upload <model> with medfoundry'")
    command.add_argument(
        "--include-adapter", action="store_true", help="also the LoRA adapter (adapter/) of a LoRA fine-tuning run"
    )
    command.add_argument("--no-eval", dest="include_eval", action="store_false", help="leave the eval results out")


def find_sources(run_dir: Path, include_adapter: bool) -> Sources:
    """The model, card, evaluation and adapter of ``run_dir``; a missing piece is an :class:`InputError`."""
    if not run_dir.is_dir():
        raise InputError(str(run_dir), "not a directory")
    if (run_dir / "config.json").is_file():
        if include_adapter:
            raise InputError(str(run_dir), "--include-adapter: a model directory has no adapter; push its run")
        return Sources(run_dir, _model_dir_card(run_dir), None, None)
    stage_dir = run_dir if training_stage(run_dir) else _last_training(run_dir)
    stage = Manifest.read(stage_dir, TRAINING_STAGES).stage  # a stage that has not finished has no manifest
    model = stage_dir / "model"
    if not model.is_dir():
        raise InputError(
            str(model),
            f"not found: the {stage} stage exported no full model (a LoRA run with lora.merge: false saves only "
            "adapter/); set lora.merge: true and run it again",
        )
    card = run_dir / CARD_NAME
    if not card.is_file():
        raise InputError(str(card), f"not found: write the card first: medfoundry card {run_dir}")
    evaluation = _eval_dir(run_dir, model) if stage_dir != run_dir else None
    return Sources(model, card, evaluation, _adapter_dir(stage_dir) if include_adapter else None)


def _model_dir_card(model: Path) -> Path:
    for name in (CARD_NAME, "README.md"):
        if (model / name).is_file():
            return model / name
    raise InputError(str(model / CARD_NAME), "not found (nor README.md): the model directory has no card")


def _last_training(run_dir: Path) -> Path:
    """The run's last training stage folder (finetune, else pretrain): the model its card describes."""
    for stage in reversed(TRAINING_STAGES):
        if (run_dir / stage).is_dir():
            return run_dir / stage
    raise InputError(
        str(run_dir),
        "no pretrain/ or finetune/ stage here, so no model to push; give a run directory, a training output "
        "directory or a Hugging Face model directory",
    )


def _eval_dir(run_dir: Path, model: Path) -> Path | None:
    """``eval/<name>`` of the run's model, when the eval stage scored it (matched by the model's path, or by its
    ``<stage>/model`` tail when the run was moved)."""
    if not (run_dir / "eval" / MANIFEST).is_file():
        return None
    models = Manifest.read(run_dir / "eval", "eval").details.get("models", {})
    same = [name for name, m in models.items() if Path(m["path"]).resolve() == model.resolve()]
    tail = [name for name, m in models.items() if Path(m["path"]).parts[-2:] == model.parts[-2:]]
    name = next(iter(same or tail), None)
    return run_dir / "eval" / name if name is not None else None


def _adapter_dir(stage_dir: Path) -> Path:
    adapter = stage_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise InputError(str(adapter), "not found: --include-adapter needs a LoRA fine-tuning run (lora: set)")
    return adapter


def plan_upload(sources: Sources) -> list[Upload]:
    """Every file of the repository, sorted by its path there. Pickles are refused, weights must be safetensors."""
    files = [Upload("README.md", sources.card)]
    files += [Upload(rel, path) for rel, path in _folder_files(sources.model) if rel not in ("README.md", CARD_NAME)]
    if not any(f.path_in_repo.endswith(".safetensors") for f in files):
        raise InputError(str(sources.model), "no .safetensors weights: not an exported medfoundry model")
    if sources.eval is not None:
        files += [Upload(f"eval/{name}", sources.eval / name) for name in EVAL_FILES if (sources.eval / name).is_file()]
    if sources.adapter is not None:
        files += [Upload(f"adapter/{rel}", path) for rel, path in _folder_files(sources.adapter)]
    for upload in files:
        if upload.source.suffix in PICKLE_SUFFIXES:
            raise InputError(
                str(upload.source),
                "a pickle file (loading it can run code): push uploads safetensors only; remove it or convert it",
            )
    return sorted(files, key=lambda f: f.path_in_repo)


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(posix path relative to ``folder``, path) of every file under it but hidden ones (locks, temporaries)."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            found.append((rel.as_posix(), path))
    return found


def check_card(path: Path) -> dict:
    """The card's front matter, checked offline: it parses, ``huggingface_hub.ModelCardData`` accepts it (its
    model-index included), and each known field has a type the Hub's schema allows. Returns the metadata."""
    import yaml
    from huggingface_hub import ModelCardData, metadata_load

    try:
        metadata = metadata_load(path)
    except yaml.YAMLError as exc:
        raise InputError(str(path), f"the YAML front matter does not parse: {_one_line(exc)}") from None
    except ValueError as exc:
        raise InputError(str(path), f"the front matter is not a YAML mapping ({exc})") from None
    if not metadata:
        raise InputError(str(path), "no YAML front matter (--- ... --- at the top): write it with medfoundry card")
    for field, types in FIELD_TYPES.items():
        _check_field(path, metadata, field, types)
    if metadata.get("license") == "other" and not metadata.get("license_name"):
        raise InputError(str(path), "license: other needs license_name (and license_link) in the front matter")
    try:
        ModelCardData(**metadata)
    except (ValueError, TypeError) as exc:
        raise InputError(str(path), f"invalid front matter: {_one_line(exc)}") from None
    return metadata


def _check_field(path: Path, metadata: dict, field: str, types: tuple[type, ...]) -> None:
    value = metadata.get(field)
    if value is None:
        return
    allowed = " or ".join("a list of strings" if t is list else "a string" for t in types)
    if not isinstance(value, types) or (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
        raise InputError(str(path), f"front matter {field}: {value!r} must be {allowed}")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def describe(files: list[Upload]) -> list[str]:
    """One line per file: its path in the repository, size in bytes, and source."""
    width = max(len(f.path_in_repo) for f in files)
    total = sum(f.size for f in files)
    lines = [f"  {f.path_in_repo:<{width}}  {f.size:>13,} B  {f.source}" for f in files]
    return [*lines, f"  {len(files)} files, {total:,} B"]


def stage_folder(files: list[Upload], folder: Path) -> None:
    """The repository's layout in ``folder``: a symbolic link per file (nothing copied)."""
    for upload in files:
        target = folder / upload.path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(upload.source.resolve(), target)


def push(
    run_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    include_adapter: bool = False,
    include_eval: bool = True,
    log=print,
) -> list[Upload]:
    """Check, list and (unless ``dry_run``) upload the run's repository in one commit. Returns its files."""
    sources = find_sources(Path(run_dir), include_adapter)
    if not include_eval:
        sources = Sources(sources.model, sources.card, None, sources.adapter)
    files = plan_upload(sources)
    metadata = check_card(sources.card)
    where = f"{repo_id}@{revision}" if revision else repo_id
    log(f"push: {run_dir} -> {where}{' (dry run: nothing uploaded)' if dry_run else ''}")
    for line in describe(files):
        log(line)
    log(f"card: front matter valid (license {metadata.get('license') or 'not set'})")
    if repo_id not in sources.card.read_text(encoding="utf-8"):
        log(f"note: the card does not name {repo_id}; medfoundry card {run_dir} --set repo_id={repo_id} puts it in")
    if not dry_run:
        _upload(files, repo_id, private, revision, commit_message or f"Upload {sources.model.name} with medfoundry")
        log(f"push: uploaded to https://huggingface.co/{repo_id}")
    return files


def _upload(files: list[Upload], repo_id: str, private: bool, revision: str | None, message: str) -> None:
    import httpx
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if get_token() is None:
        raise ConfigError("push: no Hugging Face token: set HF_TOKEN or log in once with `hf auth login`")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="medfoundry-push-") as staging:
            stage_folder(files, Path(staging))
            api.upload_folder(repo_id=repo_id, folder_path=staging, revision=revision, commit_message=message)
    except (HfHubHTTPError, httpx.TransportError) as exc:
        raise StageFailed(f"push: {repo_id}: {_one_line(exc)} (nothing was committed; run it again)") from None
