"""Typed configuration of ``medfoundry serve``: the model (:class:`~medfoundry.generation.config.EngineConfig`),
where to listen, and the limits the server enforces. Importing this module does not load torch or FastAPI."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from medfoundry.generation.config import EngineConfig

API_KEY_ENV = "MEDFOUNDRY_API_KEY"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full 2,048-token prompt is ~10 KB of text, or ~14 KB of token ids


class ServeConfig(EngineConfig):
    """An OpenAI-compatible server on one model."""

    host: str = Field("127.0.0.1", description="address to bind (default loopback only; 0.0.0.0 for all)")
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(
        default_factory=lambda: os.environ.get(API_KEY_ENV),
        description=f"require 'Authorization: Bearer KEY' on every route but the web page's shell and /health "
        f"(default: ${API_KEY_ENV}; none = open)",
    )
    served_model_name: str | None = Field(None, description="the model id clients send (default: the directory name)")
    max_queue: int = Field(64, ge=0, description="requests waiting for a slot before 429s")
    max_tokens: int | None = Field(
        None, ge=1, description="largest max_tokens a request may ask (default: max_seq_len)"
    )
    max_prompt_tokens: int | None = Field(None, ge=1, description="longest prompt accepted (default: max_seq_len - 1)")
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1, description="larger bodies get a 413 before they are read"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
