"""The Ray Serve application: Ingress (HTTP) → Retriever (index) and Generator (model + adapter).

`build_app({"config": PATH})` is the import path KubeRay's serveConfigV2 names
(`ragtune_workloads.serve.app:build_app`); `python -m ragtune_workloads.serve` runs the same application in one
pod. The deployment named `Generator` is the one the operator scales (num_replicas / autoscaling_config).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragtune.api.hybridendpoint import resolve_topology
from ragtune.api.workload import ServeConfig

from . import openai_api as api
from .answer import Answerer, Plan
from .auth import ApiKey
from .config import (endpoint_settings, engine_settings, load_config, model_context_length, parse_config,
                     stage_files, verify_adapter)
from .engines import GenerationParams, choose_engine, create_engine, vllm_available
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .retriever import QueryBatcher, RetrievalService

log = logging.getLogger(__name__)
READY_TIMEOUT_SECONDS = 5.0
# Requests a retriever replica embeds and searches together at most.
RETRIEVAL_BATCH_SIZE = 16


# ------------------------------------------------------------------------------------- retrieval and generation


class Retrieval:
    """Query embedding and search through the active index version, batched (`QueryBatcher`). Used in the
    Retriever deployment (split topology) and inside the Ingress (colocated)."""

    def __init__(self, config: ServeConfig, idle: Callable[[], bool] = lambda: True):
        self.service = RetrievalService(config.retrieval)
        self.batcher = QueryBatcher(self.service, RETRIEVAL_BATCH_SIZE, idle)

    def start(self, query: str, k: int) -> asyncio.Future:
        """Starts the retrieval now (on the event loop's thread) and returns its future."""
        return self.batcher.submit(query, k)

    async def version(self) -> str:
        name, _ = await asyncio.to_thread(self.service.current_version)
        return name

    def close(self) -> None:
        self.batcher.close()
        self.service.close()


class Generation:
    """The engine with the adapter checked, answering in plain dicts (what crosses a deployment boundary)."""

    def __init__(self, config: ServeConfig):
        config = stage_files(config)
        verify_adapter(config)
        settings = endpoint_settings(config)
        context_length = model_context_length(settings.base_model, config.spec.engine.max_model_len)
        kind = choose_engine(config.spec.engine.name, vllm_available())
        self.engine = create_engine(kind, engine_settings(config, context_length))
        self.active = 0  # requests generating now
        log.info("generator ready: %s engine, model %s, adapter %s", kind, settings.base_model,
                 config.adapter.name if settings.uses_adapter else "none")

    async def generate(self, prompt_ids: list[int], params: dict[str, Any], use_adapter: bool) -> dict[str, Any]:
        started = time.perf_counter()
        self.active += 1
        try:
            result = await self.engine.generate(prompt_ids, GenerationParams(**params), use_adapter)
        finally:
            self.active -= 1
        return {**asdict(result), "seconds": time.perf_counter() - started}

    async def stream(self, prompt_ids: list[int], params: dict[str, Any],
                     use_adapter: bool) -> AsyncIterator[dict[str, Any]]:
        started = time.perf_counter()
        self.active += 1
        try:
            async for delta in self.engine.stream(prompt_ids, GenerationParams(**params), use_adapter):
                item = asdict(delta)
                if delta.finish_reason:
                    item["seconds"] = time.perf_counter() - started
                yield item
        finally:
            self.active -= 1

    def engine_name(self) -> str:
        return self.engine.name

    def close(self) -> None:
        # vLLM runs its engine core in a child process: stop it with the replica rather than leave it orphaned.
        self.engine.close()


@serve.deployment(name="Retriever", max_ongoing_requests=128, ray_actor_options={"num_cpus": 0})
class RetrieverDeployment:
    def __init__(self, config: dict[str, Any]):
        self.retrieval = Retrieval(parse_config(config))

    async def retrieve(self, request: tuple[str, int]) -> dict[str, Any]:
        return await self.retrieval.start(*request)

    async def version(self) -> str:
        return await self.retrieval.version()

    def __del__(self):
        retrieval = getattr(self, "retrieval", None)
        if retrieval is not None:
            retrieval.close()


@serve.deployment(name="Generator", max_ongoing_requests=64)
class GeneratorDeployment:
    def __init__(self, config: dict[str, Any]):
        self.generation = Generation(parse_config(config))

    async def generate(self, prompt_ids: list[int], params: dict[str, Any], use_adapter: bool) -> dict[str, Any]:
        return await self.generation.generate(prompt_ids, params, use_adapter)

    async def stream(self, prompt_ids: list[int], params: dict[str, Any],
                     use_adapter: bool) -> AsyncIterator[dict[str, Any]]:
        async for item in self.generation.stream(prompt_ids, params, use_adapter):
            yield item

    def engine_name(self) -> str:
        return self.generation.engine_name()

    def __del__(self):
        generation = getattr(self, "generation", None)
        if generation is not None:
            generation.close()


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
    # The details (paths, internals) go to the log only; the client gets an id to find them by.
    incident = api.new_id("err")
    log.error("%s %s failed (%s): %s: %s", request.method, request.url.path, incident, type(exc).__name__, exc)
    error = api.ApiError(500, f"The server failed to answer; its log names the cause under {incident}.",
                         type="server_error", code="internal_error")
    return JSONResponse(error.body(), status_code=500)


def _streaming(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@serve.deployment(name="Ingress", max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress(http)
class Ingress:
    """The HTTP API. Split topology: `generator` and `retriever` are handles to their deployments. Colocated (both
    None): the engine and the index run in this replica, so a request crosses no deployment boundary."""

    def __init__(self, config: dict[str, Any], generator: DeploymentHandle | None = None,
                 retriever: DeploymentHandle | None = None):
        from transformers import AutoTokenizer

        serve_config: ServeConfig = stage_files(parse_config(config))  # the tokenizer is the model's
        colocated = generator is None
        self.settings = endpoint_settings(serve_config)
        self.context_length = model_context_length(self.settings.base_model, serve_config.spec.engine.max_model_len)
        self.tokenizer = AutoTokenizer.from_pretrained(self.settings.base_model)
        self.api_key = ApiKey(serve_config.api_key_file)
        self.generator = generator
        self.retriever = retriever
        self.local_generation = Generation(serve_config) if colocated else None
        # A lone query may use both cores for its embedding only while this replica generates nothing.
        self.local_retrieval = (Retrieval(serve_config, idle=lambda: self.local_generation.active == 0)
                                if colocated and self.settings.has_index else None)
        self.metrics = Metrics()
        has_retrieval = retriever is not None or self.local_retrieval is not None
        self.answerer = Answerer(self.settings, self.tokenizer, self.context_length,
                                 self._retrieve if has_retrieval else None)

    def _retrieve(self, query: str, k: int) -> Awaitable[dict[str, Any]]:
        if self.local_retrieval is not None:
            return self.local_retrieval.start(query, k)
        return self.retriever.retrieve.remote((query, k))

    async def _index_version(self) -> str | None:
        if self.local_retrieval is not None:
            return await self.local_retrieval.version()
        return await self.retriever.version.remote() if self.retriever is not None else None

    async def _engine_name(self) -> str:
        if self.local_generation is not None:
            return self.local_generation.engine_name()
        return await self.generator.engine_name.remote()

    def __del__(self):
        for part in (getattr(self, "local_retrieval", None), getattr(self, "local_generation", None)):
            if part is not None:
                part.close()

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
        with self.metrics.generating.track_inprogress():
            if self.local_generation is not None:
                result = await self.local_generation.generate(plan.prompt_ids, asdict(plan.params),
                                                              plan.use_adapter)
            else:
                result = await self.generator.generate.remote(plan.prompt_ids, asdict(plan.params),
                                                              plan.use_adapter)
        self.metrics.generation_latency.observe(result["seconds"])
        self.metrics.record_tokens(len(plan.prompt_ids), result["completion_tokens"])
        return result

    async def _deltas(self, plan: Plan) -> AsyncIterator[dict[str, Any]]:
        if plan.canned is not None:
            yield {"text": plan.canned, "completion_tokens": 0, "finish_reason": "stop", "seconds": 0.0}
            return
        if self.local_generation is not None:
            stream = self.local_generation.stream(plan.prompt_ids, asdict(plan.params), plan.use_adapter)
        else:
            stream = self.generator.options(stream=True).stream.remote(plan.prompt_ids, asdict(plan.params),
                                                                       plan.use_adapter)
        # A client that goes away cancels this (through Ray Serve) and the cancellation reaches the engine, which
        # stops generating: the gauge comes down only once it has.
        self.metrics.generating.inc()
        generated = 0
        try:
            async for item in stream:
                generated = item["completion_tokens"]
                if item["finish_reason"]:
                    self.metrics.generation_latency.observe(item["seconds"])
                yield item
        finally:  # finished or not: what was generated before a client left counts too
            self.metrics.generating.dec()
            self.metrics.record_tokens(len(plan.prompt_ids), generated)

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
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
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
        except asyncio.CancelledError:
            self._observe(route, 499, started)  # the client went away: nobody reads an answer
            raise
        except Exception:
            self._observe(route, 500, started)  # answered by the handler above; counted here
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

    @http.get("/v1/models/{model:path}")
    async def model(self, request: Request, model: str) -> Response:
        self._authorize(request)
        self._check_model(model)
        return JSONResponse(api.model_card(self.settings.served_model, self.settings.base_model))

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
            engine = await asyncio.wait_for(self._engine_name(), READY_TIMEOUT_SECONDS)
            version = await asyncio.wait_for(self._index_version(), READY_TIMEOUT_SECONDS)
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


def build_from_config(config: ServeConfig, runtime: str = "rayservice") -> serve.Application:
    """The application for `runtime` (rayservice: the deployments may spread over a Ray cluster; deployment: one
    pod). The topology follows spec.topology, where auto means colocated in one pod and split on a Ray cluster."""
    settings = endpoint_settings(config)
    wire = config.model_dump(mode="json", by_alias=True)
    logging_config = {"enable_access_log": config.spec.access_log}
    if resolve_topology(config.spec.topology, runtime) == "colocated":
        return Ingress.options(ray_actor_options=generator_actor_options(config),
                               logging_config=logging_config).bind(wire)
    generator = GeneratorDeployment.options(ray_actor_options=generator_actor_options(config),
                                            logging_config=logging_config).bind(wire)
    retriever = (RetrieverDeployment.options(logging_config=logging_config).bind(wire) if settings.has_index
                 else None)
    return Ingress.options(logging_config=logging_config).bind(wire, generator, retriever)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve application builder (KubeRay's serveConfigV2): args {"config": path of the ServeConfig JSON}."""
    return build_from_config(load_config(args["config"]), runtime="rayservice")
