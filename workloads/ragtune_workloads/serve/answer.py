"""From an API request to what the generator gets: route, retrieve, filter by score, pack, or answer
"don't know". Independent of Ray: `retrieve(query, k)` starts the retrieval and returns an awaitable of the
retriever's answer; the prompt without context is rendered and measured while it runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import prompts, routing
from .config import EndpointSettings
from .engines import GenerationParams
from .openai_api import ApiError, ChatCompletionRequest, CompletionRequest

Retrieve = Callable[[str, int], Awaitable[dict[str, Any]]]
PUBLIC_SOURCE_FIELDS = ("id", "document", "title", "section", "chunk", "score", "index_version")


@dataclass
class Plan:
    """What to do for one request: generate from `prompt_ids`, or return `canned` without calling the model."""

    params: GenerationParams
    use_adapter: bool
    prompt_ids: list[int] = field(default_factory=list)
    canned: str | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    retrieval: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, dict[str, int]] = field(default_factory=dict)
    retrieval_seconds: float = 0.0

    @property
    def public_sources(self) -> list[dict[str, Any]]:
        return [{key: source.get(key) for key in PUBLIC_SOURCE_FIELDS} for source in self.sources]


def completion_budget(requested: int | None, default: int, context_length: int) -> int:
    """An explicit max_tokens is honoured (or refused); the default leaves at least half the window to the prompt
    (and shrinks further to the room a longer prompt leaves, `Answerer.plan`)."""
    if requested is not None:
        if requested >= context_length:
            raise ApiError(400, f"max_tokens is {requested}, but this model's maximum context length is "
                           f"{context_length} tokens.", param="max_tokens", code="context_length_exceeded")
        return requested
    return max(1, min(default, context_length // 2))


def generation_params(request: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> GenerationParams:
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop=tuple(request.stop_sequences()),
        seed=request.seed,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        ignore_eos=request.ignore_eos,
    )


class Answerer:
    def __init__(self, settings: EndpointSettings, tokenizer: Any, context_length: int, retrieve: Retrieve | None):
        self.settings = settings
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.retrieve = retrieve
        self.chunk_tokens = prompts.TokenCounts(tokenizer)
        self.frame_sizes = prompts.FrameSizes(tokenizer)

    def retrieval_choice(self, requested: str | None) -> str:
        choice = requested or self.settings.default_retrieval
        if choice == "always" and not self.settings.has_index:
            raise ApiError(400, "retrieval 'always' was requested, but this endpoint serves a fine-tuned model "
                           "without an index: use 'never' or 'auto'.", param="retrieval", code="invalid_value")
        return choice

    async def plan(self, request: ChatCompletionRequest | CompletionRequest) -> Plan:
        s = self.settings
        choice = self.retrieval_choice(request.retrieval)
        question = request.question()
        messages = request.conversation()
        explicit = request.completion_limit() is not None
        max_tokens = completion_budget(request.completion_limit(), s.default_max_tokens, self.context_length)
        plan = Plan(generation_params(request, max_tokens), s.uses_adapter)
        route = routing.decide(choice, question, s.has_index)
        plan.retrieval = {"mode": choice, "used": False, "reason": route.reason}
        direct_system = prompts.system_prompt(s.mode, s.system, grounded=False)
        param = "prompt" if isinstance(request, CompletionRequest) else "messages"

        def direct() -> prompts.Prompt:
            try:
                return prompts.direct_prompt(self.tokenizer, direct_system, messages, plan.params.max_tokens,
                                             self.context_length)
            except prompts.PromptTooLongError as exc:
                room = self.context_length - exc.prompt_tokens
                if explicit or room < 1:
                    raise self._too_long(exc, param, explicit) from None
                # no max_tokens asked for: the endpoint's default, shrunk to the room the prompt leaves
                plan.params = replace(plan.params, max_tokens=room)
                return prompts.direct_prompt(self.tokenizer, direct_system, messages, room, self.context_length)

        if not route.retrieve:
            plan.prompt_ids = direct().token_ids
            return plan

        started = time.perf_counter()
        retrieval = asyncio.ensure_future(self.retrieve(question, s.top_k))
        # While the query is embedded and searched (off the event loop), the prompt without context is measured
        # (estimated, for a conversation shape seen before): its tokens are what the context must fit next to.
        frame: prompts.Frame | prompts.PromptTooLongError
        try:
            frame = prompts.grounded_frame(self.tokenizer, prompts.system_prompt(s.mode, s.system, grounded=True),
                                           s.template, messages, question, max_tokens, self.context_length,
                                           self.chunk_tokens, self.frame_sizes)
        except prompts.PromptTooLongError as exc:
            frame = exc
        except BaseException:
            retrieval.cancel()
            raise
        if isinstance(frame, prompts.PromptTooLongError):
            try:
                direct()  # too long even without the endpoint's template: refused before any retrieval
            except ApiError:
                retrieval.cancel()
                raise
        found = await retrieval
        plan.retrieval_seconds = time.perf_counter() - started
        plan.cache = found.get("cache", {})
        plan.retrieval.update(index_version=found["version"], retrieved=len(found["hits"]))
        usable = routing.above_threshold(found["hits"], s.score_threshold)
        if not usable:
            # A request that cannot fit is refused whatever the index holds, not answered "don't know".
            direct()
            plan.retrieval["reason"] = "below-threshold"
            plan.canned = routing.DONT_KNOW_ANSWER
            return plan
        if isinstance(frame, prompts.PromptTooLongError):
            raise self._too_long(frame, param, explicit)
        try:
            prompt = frame.pack(usable)
        except prompts.PromptTooLongError as exc:
            raise self._too_long(exc, param, explicit) from None
        plan.retrieval["used"] = True
        plan.prompt_ids = prompt.token_ids
        plan.sources = prompt.sources
        return plan

    @staticmethod
    def _too_long(exc: prompts.PromptTooLongError, param: str, explicit: bool) -> ApiError:
        default = "" if explicit else (" The completion's share is this endpoint's default (engine.maxTokens), as "
                                       "the request set no max_tokens: set a smaller one to leave more room.")
        return ApiError(400, str(exc) + default, param=param, code="context_length_exceeded")
