"""The server's OpenAPI description (``/openapi.json``), complete enough to test the server against.

FastAPI derives the requests from the pydantic models; this module adds what it cannot know: the
answers each route gives (its errors in OpenAI's format, streams as ``text/event-stream`` whose events
are JSON chunks and a final ``[DONE]``), the limits of this server (the one model name it serves, the
largest ``max_tokens``) and, with an API key, the bearer scheme and its 401 on every route that is
not public (without one, the 421 of a foreign Host on every route). FastAPI's default 422 is dropped:
invalid requests are answered with 400s, as OpenAI does.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from medfoundry.serve.guard import is_public
from medfoundry.serve.protocol import ErrorResponse

CAUSES = {
    400: "Invalid request: the message names the field and the rule (or limit) it breaks.",
    401: "Missing or wrong API key (send 'Authorization: Bearer <key>').",
    404: "No such model: this server serves one, named in /v1/models.",
    413: "The request body is larger than the server's limit (--max-body-bytes).",
    415: "The request body is not declared as JSON (send 'Content-Type: application/json').",
    421: "The Host header names a host this server, which has no API key, does not answer for (--allowed-host).",
    429: "Every batch slot and waiting place is taken: retry later.",
    500: "The model failed while generating (the server log says why).",
    504: "The generation took longer than the server's limit (--request-timeout).",
}
REF = "#/components/schemas/{model}"


def errors(*statuses: int) -> dict:
    """Route ``responses`` for error statuses, each an OpenAI error body."""
    return {status: {"model": ErrorResponse, "description": CAUSES[status]} for status in statuses}


def generation_responses(answer: type[BaseModel], chunk: type[BaseModel]) -> dict:
    """A generation route's ``responses``: the JSON answer, or (``"stream": true``) server-sent events."""
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {
                            "anyOf": [
                                {"$ref": REF.format(model=chunk.__name__)},
                                {"$ref": REF.format(model=ErrorResponse.__name__)},
                            ]
                        },
                    },
                ]
            }
        },
    }
    stream = {
        "text/event-stream": {
            "schema": event,
            "description": "each event's data is one JSON chunk (or an "
            "error, if generation fails mid-stream); the last is [DONE]",
        }
    }
    return {
        200: {
            "model": answer,
            "description": 'The answer, or with "stream": true a stream of chunks',
            "content": stream,
        },
        **errors(400, 404, 413, 415, 429, 500, 504),
    }


def install(app: FastAPI, *, model: str, max_tokens: int, secured: bool, chunks: list[type[BaseModel]]) -> None:
    """Make ``app.openapi()`` (served at /openapi.json) build the completed description once."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            _add_chunks(schema, chunks)
            _drop_422(schema)
            _limit_requests(schema, model, max_tokens)
            if secured:
                _require_key(schema)
            else:
                _require_local_host(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _operations(schema: dict):
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            yield path, operation


def _add_chunks(schema: dict, chunks: list[type[BaseModel]]) -> None:
    """The stream chunks' models: only the event schemas refer to them, so FastAPI does not collect them."""
    _, definitions = models_json_schema([(m, "serialization") for m in chunks], ref_template=REF)
    schema["components"]["schemas"].update(definitions.get("$defs", {}))


def _drop_422(schema: dict) -> None:
    for _, operation in _operations(schema):
        operation["responses"].pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)


def _limit_requests(schema: dict, model: str, max_tokens: int) -> None:
    """The served model's name is the only valid ``model``; ``max_tokens`` has this server's maximum."""
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        properties = schema["components"]["schemas"][name]["properties"]
        properties["model"]["enum"] = [model]
        for field in ("max_tokens", "max_completion_tokens"):
            for option in properties.get(field, {}).get("anyOf", []):
                if option.get("type") == "integer":
                    option["maximum"] = max_tokens


def _require_key(schema: dict) -> None:
    schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operation in _operations(schema):
        if not is_public(path):
            operation["security"] = [{"bearer": []}]
            _add_error(operation, 401)


def _require_local_host(schema: dict) -> None:
    for _, operation in _operations(schema):
        _add_error(operation, 421)


def _add_error(operation: dict, status: int) -> None:
    operation["responses"][str(status)] = {
        "description": CAUSES[status],
        "content": {"application/json": {"schema": {"$ref": REF.format(model=ErrorResponse.__name__)}}},
    }
