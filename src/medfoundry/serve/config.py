"""Typed configuration of ``medfoundry serve``: the model (:class:`~medfoundry.generation.config.EngineConfig`),
where to listen, who may connect, and the limits the server enforces. Importing this module does not load
torch or FastAPI.

The API key comes from a file (``--api-key-file``) or the environment (``$MEDFOUNDRY_API_KEY``), never from the
command line, where every user of the machine could read it (``ps``). Without a key the server binds loopback
only, unless ``--insecure-no-key`` says that an open server elsewhere is meant.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from medfoundry.errors import ConfigError
from medfoundry.generation.config import EngineConfig

API_KEY_ENV = "MEDFOUNDRY_API_KEY"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full 2,048-token prompt is ~10 KB of text, or ~14 KB of token ids
DEFAULT_MAX_LOGPROBS = 20  # vLLM's default --max-logprobs (OpenAI allows 5 for completions, 20 for chat)
DEFAULT_REQUEST_TIMEOUT = 600.0  # seconds: 2,048 tokens at 4 tokens/s, on a busy CPU


class ServeConfig(EngineConfig):
    """An OpenAI-compatible server on one model."""

    host: str = Field("127.0.0.1", description="address to bind (default loopback only; 0.0.0.0 for all)")
    port: int = Field(8000, ge=0, le=65535)
    api_key_file: Path | None = Field(
        None,
        description="file holding the API key that every route but the web page's shell and /health then needs "
        f"('Authorization: Bearer KEY'; default: ${API_KEY_ENV}; none = open, loopback only)",
    )
    api_key: str | None = Field(
        default_factory=lambda: os.environ.get(API_KEY_ENV) or None,
        repr=False,
        description=f"the API key itself (default: ${API_KEY_ENV}); api_key_file wins over it",
    )
    insecure_no_key: bool = Field(False, description="serve without an API key on an address other than loopback")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="without an API key, Host names answered besides localhost, 127.0.0.1, [::1] and --host",
    )
    served_model_name: str | None = Field(
        None,
        description="the model id clients send (default: the run's name, from the model's card or the training "
        "stage that exported it, else the directory name)",
    )
    max_queue: int = Field(64, ge=0, description="requests waiting for a slot before 429s")
    max_tokens: int | None = Field(
        None, ge=1, description="largest max_tokens a request may ask (default: max_seq_len)"
    )
    max_prompt_tokens: int | None = Field(None, ge=1, description="longest prompt accepted (default: max_seq_len - 1)")
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1, description="larger bodies get a 413 before they are read"
    )
    max_logprobs: int = Field(
        DEFAULT_MAX_LOGPROBS,
        ge=0,
        description="largest logprobs (completions) or top_logprobs (chat) a request may ask",
    )
    request_timeout: float = Field(
        DEFAULT_REQUEST_TIMEOUT,
        gt=0,
        description="seconds a request may take, waiting included; then it ends with an error and frees its slot",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    def key(self) -> str | None:
        """The API key: the first line of ``api_key_file``, else ``api_key`` (``$MEDFOUNDRY_API_KEY``), else None."""
        if self.api_key_file is None:
            return self.api_key
        try:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--api-key-file {self.api_key_file}: cannot read it ({exc})") from None
        if not key or any(c.isspace() for c in key):
            raise ConfigError(f"--api-key-file {self.api_key_file}: must hold the key alone, on one line")
        return key

    def check_exposure(self, key: str | None) -> None:
        """Refuse to serve without a key on anything but loopback, unless ``insecure_no_key`` asks for it."""
        if key is None and not is_loopback(self.host) and not self.insecure_no_key:
            raise ConfigError(
                f"serving on {self.host} without an API key would let anyone who reaches the port use the model: "
                f"give a key (--api-key-file FILE, or ${API_KEY_ENV}), or --insecure-no-key to serve it open"
            )


def run_name(model: str) -> str | None:
    """The name of the run that made the model folder ``model``: its card's (``README.md`` front matter,
    ``model-index[0].name``, as ``medfoundry card`` writes it), else, for the ``model/`` folder a training stage
    exported (its ``manifest.json`` one level up), the recipe's name (``run.json`` of the run folder) or the
    stage's output folder's name; None for anything else (a Hub id, a GGUF file, a plain folder)."""
    import json

    import yaml

    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    try:
        text = (folder / "README.md").read_text(encoding="utf-8")[: 1 << 16] if (folder / "README.md").is_file() else ""
        if text.startswith("---\n"):
            front = yaml.safe_load(text[4:].split("\n---", 1)[0])
            index = front.get("model-index") if isinstance(front, dict) else None
            name = index[0].get("name") if isinstance(index, list) and index and isinstance(index[0], dict) else None
            if isinstance(name, str) and name.strip():
                return name.strip()
        stage = folder.resolve().parent
        manifest = json.loads((stage / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(manifest, dict) or manifest.get("stage") not in ("pretrain", "finetune"):
        return None
    if (manifest.get("outputs") or {}).get("model") != folder.resolve().name:
        return None
    try:
        recipe = json.loads((stage.parent / "run.json").read_text(encoding="utf-8")).get("recipe")
    except (OSError, ValueError, AttributeError):
        recipe = None
    return recipe if isinstance(recipe, str) and recipe else stage.name


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback interface only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
