"""The OpenAI-compatible wire format: request models, OpenAI-style errors, and response/stream objects.

Requests are validated here rather than by FastAPI so that every failure has OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`) and status 400 instead of FastAPI's 422.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator



class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unauthorized() -> ApiError:
    return ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                    code="invalid_api_key")


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist: GET /v1/models lists the one this endpoint serves.",
                    param="model", code="model_not_found")


def param_path(location: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role', as OpenAI names parameters."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors(include_url=False)[0]
    location = tuple(part for part in first["loc"] if not (isinstance(part, str) and part.startswith("function-")))
    # Union members add their type names to the location; they are no parameter names.
    location = tuple(p for p in location if p not in ("str", "list[str]", "list[ContentPart]", "TextPart"))
    param = param_path(location) or None
    kind = first["type"]
    if kind == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if kind.endswith(("_type", "_parsing")):
        return ApiError(400, f"Invalid type for '{param}': {first['msg']}.", param=param, code="invalid_type")
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"Invalid value for '{param}': {message}.", param=param, code="invalid_value")


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return validate(data, model)


def validate(data: dict[str, Any], model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant"]
    # None: an assistant turn as other OpenAI-compatible servers return it (with a refusal, say)
    content: str | list[dict[str, Any]] | None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[Any] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content, info):
        if content is None:
            if info.data.get("role") != "assistant":
                raise ValueError("content may be null only in an assistant message")
            return content
        if isinstance(content, list):
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"a content part of type {part.get('type')!r} is not supported: this endpoint "
                                     'takes text, as a string or parts {"type": "text", "text": "..."}')
        return content

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, tool_calls):
        if tool_calls:
            raise ValueError("tool calls are not supported by this endpoint")
        return tool_calls

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        return self.content if isinstance(self.content, str) else "".join(part["text"] for part in self.content)


class GenerationRequest(WireModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    retrieval: Literal["auto", "always", "never"] | None = None
    ignore_eos: bool = Field(default=False, description="Generate max_tokens whatever the model says (vLLM's "
                             "extension, for load tests that need equal lengths).")
    user: str | None = None
    stream_options: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("stop accepts at most 4 sequences")
        return stop

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage_in_stream(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @field_validator("messages")
    @classmethod
    def _has_user_message(cls, messages):
        if not any(m.role == "user" for m in messages):
            raise ValueError("messages must contain at least one user message")
        return messages

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def question(self) -> str:
        return next(m.text() for m in reversed(self.messages) if m.role == "user")


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo):
        if echo:
            raise ValueError("echo is not supported")
        return echo

    def completion_limit(self) -> int | None:
        return self.max_tokens

    def question(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question()}]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens), **extra}


def completion_response(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                        completion_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens), **extra}


def chat_chunk(request_id: str, model: str, delta: dict[str, str], finish_reason: str | None = None,
               **extra: Any) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None = None,
                     **extra: Any) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}], **extra}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def model_card(model: str, root: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "ragtune", "root": root, "parent": None}


def models_list(model: str, root: str) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model, root)]}
