"""Hugging Face Hub ids (``org/name`` or ``org/name@revision``) as model and tokenizer references: resolved to a
snapshot folder of the Hugging Face cache, which :mod:`medfoundry.model.load` then treats as any local folder
(safetensors only unless ``allow_pickle``, no ``auto_map``, no remote code).

Only what a checkpoint needs under those rules is downloaded (:data:`SAFE_PATTERNS`): safetensors weights, JSON
(configs, tokenizer, safetensors index), Jinja chat templates and the tokenizer's vocabulary files; never a
``*.py`` file, and pickled weights (``pytorch_model*.bin``) only when ``allow_pickle`` is given and the snapshot
has no safetensors weights, the one case in which they would be loaded.

``HF_HUB_OFFLINE=1`` reads the cache only (``HF_HOME`` / ``HF_HUB_CACHE`` say where it is); a model missing
there, like any failed download, is one :class:`~medfoundry.errors.InputError` line.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from medfoundry.errors import InputError

SAFE_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "tokenizer.model", "merges.txt", "vocab.txt")
PICKLE_PATTERNS = ("pytorch_model*.bin",)  # the pickled weights transformers loads (its index is a .json)
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?", re.ASCII)
_MAX_REPO_ID = 96  # huggingface_hub's validate_repo_id


def is_hub_id(reference: str | Path) -> bool:
    """Whether ``reference`` names a Hub repository: ``org/name[@revision]`` (the Hub's repo id rules) that is
    not an existing local path (a local path always wins) nor a ``.gguf`` file name."""
    text = str(reference)
    match = _HUB_ID.fullmatch(text)
    if match is None or text.endswith(".gguf"):
        return False
    repo = match["repo"]
    valid = len(repo) <= _MAX_REPO_ID and ".." not in repo and "--" not in repo and not repo.endswith(".git")
    return valid and len(text) < 256 and not Path(text).exists()  # checked last: a short name, no OSError


def split(reference: str) -> tuple[str, str | None]:
    """``org/name@revision`` -> (``org/name``, ``revision`` or None)."""
    repo, _, revision = str(reference).partition("@")
    return repo, revision or None


def repo_name(reference: str) -> str:
    """The name a Hub model goes by in reports and the API: its repository's name (``SmolLM2-135M``), with the
    revision when one is pinned (``SmolLM2-135M@v1``)."""
    repo, revision = split(reference)
    name = repo.rsplit("/", 1)[-1]
    return f"{name}@{revision}" if revision else name


def resolve(reference: str, *, allow_pickle: bool = False) -> Path:
    """The snapshot folder of Hub id ``reference`` in the Hugging Face cache, downloaded first when needed
    (:data:`SAFE_PATTERNS`; with ``allow_pickle``, pickled weights too when the snapshot has no safetensors)."""
    folder = _snapshot(reference, SAFE_PATTERNS)
    if allow_pickle and not any(folder.glob("*.safetensors")):
        folder = _snapshot(reference, SAFE_PATTERNS + PICKLE_PATTERNS)
    return folder


def commit(reference: str, *, cached: bool = False) -> str:
    """The commit a Hub id resolves to (the name of the snapshot folder of its ``config.json``, the one file fetched
    for it: keying a recipe downloads no weights; with ``cached``, the one in the cache, never asking the Hub):
    what keys and manifests record, so that a moved branch is another input."""
    return config_folder(reference, cached=cached).name


def config_folder(reference: str, *, cached: bool = False) -> Path:
    """A snapshot folder of Hub id ``reference`` holding only its ``config.json`` (downloaded when needed): what
    planning a run needs, without the weights of a 70B model."""
    from huggingface_hub import constants, hf_hub_download

    repo, revision = split(reference)
    offline = cached or constants.is_offline_mode()
    with _download_errors(reference, cached=cached):
        path = hf_hub_download(repo, "config.json", revision=revision, local_files_only=offline)
    return Path(path).parent


def _snapshot(reference: str, patterns: tuple[str, ...], *, cached: bool = False) -> Path:
    from huggingface_hub import constants, snapshot_download

    repo, revision = split(reference)
    offline = cached or constants.is_offline_mode()
    with _download_errors(reference, cached=cached):
        folder = snapshot_download(repo, revision=revision, allow_patterns=list(patterns), local_files_only=offline)
    return Path(folder)


@contextmanager
def _download_errors(reference: str, *, cached: bool = False):
    """A failed lookup or download of ``reference`` as one :class:`InputError` line saying what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = split(reference)
    offline = cached or constants.is_offline_mode()
    fetch = f"`hf download {repo}{f' --revision {revision}' if revision else ''}`"
    try:
        yield
    except RevisionNotFoundError:
        raise InputError(reference, f"the Hugging Face Hub has no revision {revision!r} of {repo}") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise InputError(
            reference,
            "not a local path, nor a model on the Hugging Face Hub that this account can read (a private or gated "
            "model needs `hf auth login` and its access granted)",
        ) from None
    except (LocalEntryNotFoundError, IncompleteSnapshotError) as exc:
        if offline:
            raise InputError(
                reference,
                f"not a local path, nor in the Hugging Face cache ({constants.HF_HUB_CACHE}) with HF_HUB_OFFLINE=1: "
                f"run {fetch} once online, or unset HF_HUB_OFFLINE",
            ) from None
        raise InputError(
            reference,
            f"not in the Hugging Face cache, and the download failed: {_first_line(exc)} (without a network, "
            "HF_HUB_OFFLINE=1 reads the cache alone and fails at once)",
        ) from None
    except (HTTPError, OSError) as exc:  # the Hub's HTTP errors, the network's, the disk's
        raise InputError(reference, f"download from the Hugging Face Hub failed: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
