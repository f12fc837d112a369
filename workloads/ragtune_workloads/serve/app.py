"""The Ray Serve application: Ingress (HTTP) → Retriever (index) and Generator (model + adapter).

`build_app({"config": PATH})` is the import path KubeRay's serveConfigV2 names
(`ragtune_workloads.serve.app:build_app`); `python -m ragtune_workloads.serve` runs the same application in one
pod. The deployment named `Generator` is the one the operator scales (num_replicas / autoscaling_config).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragtune.api.workload import ServeConfig

from . import openai_api as api
from .answer import Answerer, Plan
from .auth import ApiKey
from .config import (endpoint_settings, engine_settings, load_config, model_context_length, parse_config,
                     verify_adapter)
from .engines import GenerationParams, choose_engine, create_engine, vllm_available
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .retriever import RetrievalService

log = logging.getLogger(__name__)
READY_TIMEOUT_SECONDS = 5.0
# Requests a retriever replica embeds and searches together. No waiting for company: while one batch runs, the
# next requests queue up and form the next batch by themselves, so batching costs nothing at low load.
RETRIEVAL_BATCH_SIZE = 16
RETRIEVAL_BATCH_WAIT_S = 0.0


# --------------------------------------------------------------------------------------------------- Retriever


@serve.deployment(name="Retriever", max_ongoing_requests=128, ray_actor_options={"num_cpus": 0})
class RetrieverDeployment:
    def __init__(self, config: dict[str, Any]):
        self.service = RetrievalService(parse_config(config).retrieval)

    @serve.batch(max_batch_size=RETRIEVAL_BATCH_SIZE, batch_wait_timeout_s=RETRIEVAL_BATCH_WAIT_S)
    async def retrieve(self, requests: list[tuple[str, int]]) -> list[dict[str, Any]]:
        answers: list[dict[str, Any] | None] = [None] * len(requests)
        for k in {k for _, k in requests}:
            positions = [i for i, (_, want) in enumerate(requests) if want == k]
            found = await asyncio.to_thread(self.service.retrieve_many, [requests[i][0] for i in positions], k)
            for i, answer in zip(positions, found):
                answers[i] = answer
        return answers

    async def version(self) -> str:
        name, _ = await asyncio.to_thread(self.service.current_version)
        return name

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


# --------------------------------------------------------------------------------------------------- Generator


@serve.deployment(name="Generator", max_ongoing_requests=64)
class GeneratorDeployment:
    def __init__(self, config: dict[str, Any]):
        serve_config = parse_config(config)
        verify_adapter(serve_config)
        settings = endpoint_settings(serve_config)
        context_length = model_context_length(settings.base_model, serve_config.spec.engine.max_model_len)
        kind = choose_engine(serve_config.spec.engine.name, vllm_available())
        self.engine = create_engine(kind, engine_settings(serve_config, context_length))
        log.info("generator ready: %s engine, model %s, adapter %s", kind, settings.base_model,
                 serve_config.adapter.name if settings.uses_adapter else "none")

    async def generate(self, prompt_ids: list[int], params: dict[str, Any], use_adapter: bool) -> dict[str, Any]:
        started = time.perf_counter()
        result = await self.engine.generate(prompt_ids, GenerationParams(**params), use_adapter)
        return {**asdict(result), "seconds": time.perf_counter() - started}

    async def stream(self, prompt_ids: list[int], params: dict[str, Any],
                     use_adapter: bool) -> AsyncIterator[dict[str, Any]]:
        started = time.perf_counter()
        async for delta in self.engine.stream(prompt_ids, GenerationParams(**params), use_adapter):
            item = asdict(delta)
            if delta.finish_reason:
                item["seconds"] = time.perf_counter() - started
            yield item

    def engine_name(self) -> str:
        return self.engine.name

    def __del__(self):
        # vLLM runs its engine core in a child process: stop it with the replica rather than leave it orphaned.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


# ----------------------------------------------------------------------------------------------------- Ingress

http = FastAPI(title="ragtune endpoint", docs_url=None, redoc_url=None, openapi_url=None)


@http.exception_handler(api.ApiError)
async def _api_error(request: Request, exc: api.ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@http.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(api.ApiError(exc.status_code, message, code=code).body(), status_code=exc.status_code)


@http.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    error = api.ApiError(500, f"The server failed to answer: {type(exc).__name__}: {exc}", type="server_error")
    return JSONResponse(error.body(), status_code=500)


def _streaming(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@serve.deployment(name="Ingress", max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress(http)
class Ingress:
    def __init__(self, config: dict[str, Any], generator: DeploymentHandle, retriever: DeploymentHandle | None):
        from transformers import AutoTokenizer

        serve_config: ServeConfig = parse_config(config)
        self.settings = endpoint_settings(serve_config)
        self.context_length = model_context_length(self.settings.base_model, serve_config.spec.engine.max_model_len)
        self.tokenizer = AutoTokenizer.from_pretrained(self.settings.base_model)
        self.api_key = ApiKey(serve_config.api_key_file)
        self.generator = generator
        self.retriever = retriever
        self.metrics = Metrics()
        self.answerer = Answerer(self.settings, self.tokenizer, self.context_length,
                                 self._retrieve if retriever is not None else None)

    async def _retrieve(self, query: str, k: int) -> dict[str, Any]:
        return await self.retriever.retrieve.remote((query, k))

    # ---- helpers ---------------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self.api_key.allows(request.headers.get("authorization")):
            raise api.unauthorized()

    def _check_model(self, model: str) -> None:
        if model != self.settings.served_model:
            raise api.model_not_found(model)

    def _observe(self, route: str, status: int, started: float) -> None:
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _record_plan(self, plan: Plan) -> None:
        if plan.retrieval.get("index_version"):
            self.metrics.record_retrieval(plan.retrieval_seconds, plan.cache)
        outcome = "dont-know" if plan.canned is not None else (
            "retrieved" if plan.retrieval["used"] else f"skipped-{plan.retrieval['reason']}")
        self.metrics.retrievals.labels(outcome).inc()

    def _extra(self, plan: Plan, generation_seconds: float, started: float) -> dict[str, Any]:
        return {"sources": plan.public_sources, "retrieval": plan.retrieval,
                "timings": {"retrieval_ms": round(plan.retrieval_seconds * 1000, 3),
                            "generation_ms": round(generation_seconds * 1000, 3),
                            "total_ms": round((time.perf_counter() - started) * 1000, 3)}}

    async def _generate(self, plan: Plan) -> dict[str, Any]:
        if plan.canned is not None:
            return {"text": plan.canned, "completion_tokens": 0, "finish_reason": "stop", "seconds": 0.0}
        result = await self.generator.generate.remote(plan.prompt_ids, asdict(plan.params), plan.use_adapter)
        self.metrics.generation_latency.observe(result["seconds"])
        self.metrics.record_tokens(len(plan.prompt_ids), result["completion_tokens"])
        return result

    async def _deltas(self, plan: Plan) -> AsyncIterator[dict[str, Any]]:
        if plan.canned is not None:
            yield {"text": plan.canned, "completion_tokens": 0, "finish_reason": "stop", "seconds": 0.0}
            return
        stream = self.generator.options(stream=True).stream.remote(plan.prompt_ids, asdict(plan.params),
                                                                   plan.use_adapter)
        async for item in stream:
            if item["finish_reason"]:
                self.metrics.generation_latency.observe(item["seconds"])
                self.metrics.record_tokens(len(plan.prompt_ids), item["completion_tokens"])
            yield item

    async def _sse(self, route: str, started: float, plan: Plan, request_id: str, chat: bool,
                   include_usage: bool) -> AsyncIterator[bytes]:
        model = self.settings.served_model
        extra = {"sources": plan.public_sources, "retrieval": plan.retrieval}
        status = 200
        try:
            if chat:  # the first chunk names the role and carries the sources, as soon as they are known
                yield api.sse(api.chat_chunk(request_id, model, {"role": "assistant", "content": ""}, **extra))
            completion_tokens, sources_sent = 0, chat
            async for item in self._deltas(plan):
                completion_tokens = item["completion_tokens"]
                if not (item["text"] or item["finish_reason"]):
                    continue
                more = {} if sources_sent else extra  # completions carry them on their first chunk
                sources_sent = True
                chunk = (api.chat_chunk(request_id, model, {"content": item["text"]} if item["text"] else {},
                                        item["finish_reason"], **more) if chat else
                         api.completion_chunk(request_id, model, item["text"], item["finish_reason"], **more))
                yield api.sse(chunk)
            if include_usage:
                usage = api.usage(len(plan.prompt_ids), completion_tokens)
                yield api.sse({"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": int(time.time()), "model": model, "choices": [], "usage": usage})
            yield api.sse("[DONE]")
        except Exception as exc:  # the status line is already sent: report in the stream, OpenAI style
            status = 500
            log.exception("streaming failed")
            yield api.sse(api.ApiError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                       type="server_error").body())
        finally:
            self._observe(route, status, started)

    async def _complete(self, request: Request, route: str, chat: bool) -> Response:
        started = time.perf_counter()
        try:
            self._authorize(request)
            body = api.parse_body(await request.body(),
                                  api.ChatCompletionRequest if chat else api.CompletionRequest)
            self._check_model(body.model)
            plan = await self.answerer.plan(body)
            self._record_plan(plan)
            request_id = api.new_id("chatcmpl" if chat else "cmpl")
            if body.stream:
                return _streaming(self._sse(route, started, plan, request_id, chat, body.include_usage_in_stream()))
            result = await self._generate(plan)
            build = api.chat_response if chat else api.completion_response
            answer = build(request_id, self.settings.served_model, result["text"], result["finish_reason"],
                           len(plan.prompt_ids), result["completion_tokens"],
                           self._extra(plan, result["seconds"], started))
        except api.ApiError as exc:
            self._observe(route, exc.status, started)
            raise
        self._observe(route, 200, started)
        return JSONResponse(answer)

    # ---- routes ----------------------------------------------------------------------------------------------

    @http.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, "/v1/chat/completions", chat=True)

    @http.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "/v1/completions", chat=False)

    @http.get("/v1/models")
    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(api.models_list(self.settings.served_model, self.settings.base_model))

    @http.get("/ask")
    async def ask(self, request: Request, q: str | None = None, retrieval: str | None = None) -> Response:
        """A question in the query string, the answer and its sources back: for people and quick checks."""
        started = time.perf_counter()
        try:
            self._authorize(request)
            if not q or not q.strip():
                raise api.ApiError(400, "Missing required parameter: 'q'.", param="q",
                                   code="missing_required_parameter")
            body = api.validate({"model": self.settings.served_model, "prompt": q, "temperature": 0,
                                 **({"retrieval": retrieval} if retrieval else {})}, api.CompletionRequest)
            plan = await self.answerer.plan(body)
            self._record_plan(plan)
            result = await self._generate(plan)
        except api.ApiError as exc:
            self._observe("/ask", exc.status, started)
            raise
        self._observe("/ask", 200, started)
        return JSONResponse({"answer": result["text"], **self._extra(plan, result["seconds"], started)})

    @http.get("/healthz")
    async def healthz(self) -> Response:
        return JSONResponse({"status": "ok"})

    @http.get("/readyz")
    async def readyz(self) -> Response:
        try:
            engine = await asyncio.wait_for(self.generator.engine_name.remote(), READY_TIMEOUT_SECONDS)
            version = None
            if self.retriever is not None:
                version = await asyncio.wait_for(self.retriever.version.remote(), READY_TIMEOUT_SECONDS)
        except Exception as exc:
            return JSONResponse({"status": "not ready", "reason": f"{type(exc).__name__}: {exc}"}, status_code=503)
        return JSONResponse({"status": "ready", "model": self.settings.served_model, "engine": engine,
                             "mode": self.settings.mode, "index_version": version})

    @http.get("/metrics")
    async def metrics_endpoint(self) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# ------------------------------------------------------------------------------------------------- the builder


def generator_actor_options(config: ServeConfig) -> dict[str, Any]:
    gpus = config.spec.resources.gpu
    return {"num_gpus": gpus, "num_cpus": 1} if gpus else {"num_cpus": 1}


def build_from_config(config: ServeConfig) -> serve.Application:
    settings = endpoint_settings(config)
    wire = config.model_dump(mode="json", by_alias=True)
    generator = GeneratorDeployment.options(ray_actor_options=generator_actor_options(config)).bind(wire)
    retriever = RetrieverDeployment.bind(wire) if settings.has_index else None
    return Ingress.bind(wire, generator, retriever)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve application builder: args {"config": path of the ServeConfig JSON}."""
    return build_from_config(load_config(args["config"]))
