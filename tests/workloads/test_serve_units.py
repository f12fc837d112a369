"""The serving workload's pure parts: routing rule, prompt packing, caches, auth, request validation, engine
choice. No Ray, no network; the tokenizer is the tiny model's real one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ragtune.api.hybridendpoint import DEFAULT_HYBRID_SYSTEM_PROMPT, DEFAULT_RAG_SYSTEM_PROMPT, DEFAULT_TEMPLATE  # noqa: E402
from ragtune_workloads.serve import auth, cache, engines, openai_api, prompts, routing  # noqa: E402
from ragtune_workloads.serve.answer import completion_budget  # noqa: E402
from ragtune_workloads.serve.config import ConfigError, endpoint_settings, parse_config  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from serve_fixtures import tiny_model_path

    return AutoTokenizer.from_pretrained(tiny_model_path())


def hit(n: int, score: float, words: int = 40) -> dict:
    return {"id": f"c{n}", "document": f"doc{n}.txt", "section": "Results", "chunk": n, "score": score,
            "text": " ".join(["boundary layer pressure"] * words)}


# ---- routing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["hi", "Hello there!", "thanks a lot", "good morning", "ok bye", "Thank you!"])
def test_small_talk_is_answered_without_retrieval_in_auto(text):
    assert routing.decide("auto", text, has_index=True) == routing.Route(False, "small-talk")


@pytest.mark.parametrize("text", ["turbulence", "what is the lift of a flat plate?", "hi, what causes flutter?",
                                  "thanks, and how does heat transfer change at mach 3?", "hello 42"])
def test_questions_and_keywords_retrieve_in_auto(text):
    assert routing.decide("auto", text, has_index=True).retrieve


def test_always_and_never_override_the_rule_and_no_index_never_retrieves():
    assert routing.decide("always", "hi", has_index=True).retrieve
    assert not routing.decide("never", "what is the lift of a wing?", has_index=True).retrieve
    assert routing.decide("auto", "what is the lift of a wing?", has_index=False) == routing.Route(False, "no-index")


def test_threshold_drops_weak_chunks_and_ranks_best_first():
    hits = [hit(1, 0.2), hit(2, 0.8), hit(3, 0.5)]
    assert [h["id"] for h in routing.above_threshold(hits, 0.4)] == ["c2", "c3"]
    assert routing.above_threshold(hits, 0.9) == []
    assert [h["id"] for h in routing.above_threshold(hits, None)] == ["c2", "c3", "c1"]


def test_l2_distances_become_similarities_on_the_threshold_scale():
    assert routing.similarity(0.0, "L2") == 1.0  # identical normalised vectors
    assert routing.similarity(2.0, "L2") == 0.0  # orthogonal ones
    assert routing.similarity(0.7, "COSINE") == 0.7


# ---- prompts -----------------------------------------------------------------------------------------------


def test_default_system_prompt_by_mode_only_with_context_and_configured_one_always():
    assert prompts.system_prompt("rag", None, grounded=True) == DEFAULT_RAG_SYSTEM_PROMPT
    assert prompts.system_prompt("hybrid", None, grounded=True) == DEFAULT_HYBRID_SYSTEM_PROMPT
    assert prompts.system_prompt("finetuned", None, grounded=False) is None
    assert prompts.system_prompt("rag", None, grounded=False) is None
    assert prompts.system_prompt("rag", "Be brief.", grounded=False) == "Be brief."


def test_template_fills_placeholders_once_even_when_the_question_contains_braces():
    rendered = prompts.render_template(DEFAULT_TEMPLATE, "CTX", "what is {context}?")
    assert rendered == "Context:\nCTX\n\nQuestion: what is {context}?"
    assert prompts.render_template("Q={question} / C={context}", "c", "q") == "Q=q / C=c"


def test_client_system_message_is_kept_after_the_endpoint_one():
    merged = prompts.merge_system("Endpoint rules.", [{"role": "system", "content": "Answer in French."},
                                                      {"role": "user", "content": "hi"}])
    assert merged == [{"role": "system", "content": "Endpoint rules.\n\nAnswer in French."},
                      {"role": "user", "content": "hi"}]


def test_context_is_packed_best_first_within_the_context_length(tokenizer):
    hits = [hit(1, 0.9, words=12), hit(2, 0.8, words=400), hit(3, 0.7, words=12), hit(4, 0.6, words=12)]
    messages = [{"role": "user", "content": "what is the pressure?"}]
    prompt = prompts.grounded_prompt(tokenizer, DEFAULT_RAG_SYSTEM_PROMPT, DEFAULT_TEMPLATE, messages,
                                     "what is the pressure?", hits, max_tokens=64, context_length=1024)
    assert len(prompt.token_ids) + 64 <= 1024
    # the second chunk is too long for what is left; lower-ranked ones that fit still go in, in rank order
    assert [h["id"] for h in prompt.sources] == ["c1", "c3", "c4"]
    text = prompt.messages[-1]["content"]
    assert text.index("(doc1.txt > Results)") < text.index("(doc3.txt > Results)")
    assert prompt.messages[0] == {"role": "system", "content": DEFAULT_RAG_SYSTEM_PROMPT}
    # when everything fits, everything goes in, and the ids are those of the prompt rendered
    short = [hit(n, 1 - n / 10, words=12) for n in range(1, 5)]
    prompt = prompts.grounded_prompt(tokenizer, DEFAULT_RAG_SYSTEM_PROMPT, DEFAULT_TEMPLATE, messages,
                                     "what is the pressure?", short, max_tokens=64, context_length=1024)
    assert [h["id"] for h in prompt.sources] == ["c1", "c2", "c3", "c4"]
    assert prompt.token_ids == prompts.encode_messages(tokenizer, prompt.messages)


class TokenizerCalls:
    """The tokenizer, with the number of texts in each call to its backend (`backend=False`: no fast backend)."""

    def __init__(self, tokenizer, backend: bool = True):
        self.inner = tokenizer
        self.backend_tokenizer = self if backend else None
        self.truncation = self.padding = None
        self.calls: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def encode_batch_fast(self, texts, add_special_tokens):
        self.calls.append(len(texts))
        return self.inner.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("context_length", [300, 420, 560, 700, 900])
def test_the_tokenizers_fast_path_and_its_wrapper_pack_alike(tokenizer, context_length):
    hits = [hit(1, 0.9, words=30), hit(2, 0.8, words=60), hit(3, 0.7, words=10), hit(4, 0.6, words=25),
            hit(5, 0.5, words=5)]
    messages = [{"role": "user", "content": "what is the pressure?"}]

    def pack(calls):
        return prompts.grounded_frame(calls, DEFAULT_RAG_SYSTEM_PROMPT, DEFAULT_TEMPLATE, messages,
                                      "what is the pressure?", 32, context_length).pack(hits)

    fast, wrapper = TokenizerCalls(tokenizer), TokenizerCalls(tokenizer, backend=False)
    by_fast, by_wrapper = pack(fast), pack(wrapper)
    assert len(hits) in fast.calls  # the chunks were counted together
    assert [h["id"] for h in by_fast.sources] == [h["id"] for h in by_wrapper.sources]
    assert by_fast.token_ids == by_wrapper.token_ids and len(by_fast.token_ids) + 32 <= context_length
    assert 0 < len(by_fast.sources) < len(hits)


def test_chunks_that_surely_fit_are_not_counted_and_a_wrong_guess_packs_as_counting_does(tokenizer):
    hits = [hit(n, 1 - n / 10, words=15) for n in range(1, 5)]  # ~210 tokens each
    messages = [{"role": "user", "content": "what is the pressure?"}]

    def frame(calls, context_length, count):
        return prompts.grounded_frame(calls, DEFAULT_RAG_SYSTEM_PROMPT, DEFAULT_TEMPLATE, messages,
                                      "what is the pressure?", 32, context_length, count)

    calls = TokenizerCalls(tokenizer)
    counts = prompts.TokenCounts(calls)
    first = frame(calls, 2048, counts).pack(hits)  # nothing counted yet: no rate to estimate from
    assert len(hits) in calls.calls and counts.densest > 0
    calls.calls.clear()
    others = [hit(n, 1 - n / 10, words=15) for n in range(5, 9)]
    roomy = frame(calls, 2048, counts).pack(others)
    assert len(others) not in calls.calls  # encoded once, as a whole prompt, and never counted chunk by chunk
    assert [h["id"] for h in roomy.sources] == ["c5", "c6", "c7", "c8"]
    assert roomy.token_ids == prompts.encode_messages(tokenizer, roomy.messages)
    assert [h["id"] for h in first.sources] == ["c1", "c2", "c3", "c4"]
    # a window too small for the rate: counted as before
    more = [hit(n, 1 - n / 100, words=15) for n in range(9, 13)]
    tight = frame(calls, 400, counts).pack(more)
    assert len(more) in calls.calls and 0 < len(tight.sources) < len(more)
    # an estimate that is wrong (says everything fits in a window that holds two): the exact encoding refuses it
    # and the chunks are packed as counting packs them
    for context_length in (420, 560, 700):
        wrong = frame(tokenizer, context_length, counts)
        wrong.surely_fit = lambda texts, room: True
        counted = frame(tokenizer, context_length, prompts.TokenCounts(tokenizer)).pack(hits)
        guessed = wrong.pack(hits)
        assert [h["id"] for h in guessed.sources] == [h["id"] for h in counted.sources]
        assert guessed.token_ids == counted.token_ids and len(guessed.token_ids) + 32 <= context_length


def test_chunk_token_counts_are_remembered_and_the_oldest_forgotten_first(tokenizer):
    class Counting:  # the tokenizer, with a count of the texts its backend tokenised
        def __init__(self):
            self.backend_tokenizer = self
            self.truncation = self.padding = None
            self.tokenised = 0

        def encode_batch(self, texts, add_special_tokens):
            self.tokenised += len(texts)
            return tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)

    counting = Counting()
    counts = prompts.TokenCounts(counting, max_entries=2)
    texts = ["boundary layer", "shock wave at the leading edge", "boundary layer"]
    assert counts(texts) == prompts.token_counts(tokenizer, texts) and counting.tokenised == 2
    assert counts(texts[:2]) == prompts.token_counts(tokenizer, texts[:2]) and counting.tokenised == 2
    counts(["heat transfer"])  # the least recently used text goes
    assert list(counts.counts) == ["shock wave at the leading edge", "heat transfer"]


def test_frame_sizes_are_estimated_per_conversation_shape_and_measured_exactly_near_the_limit(tokenizer):
    from ragtune_workloads.index import cranfield

    from serve_fixtures import CRANFIELD, cranfield_available

    questions = ["what is the pressure?", "  how does heat transfer change at mach 3 ?\n", "Δp = ½ρv², café"]
    if cranfield_available():
        questions += cranfield.load_queries(CRANFIELD)[:40]
    sizes = prompts.FrameSizes(tokenizer, max_entries=2)
    for question in questions:
        messages = [{"role": "user", "content": question}]
        exact = prompts.grounded_frame(tokenizer, DEFAULT_RAG_SYSTEM_PROMPT, DEFAULT_TEMPLATE, messages, question,
                                       64, 1024).empty_tokens
        estimated = prompts.grounded_frame(tokenizer, DEFAULT_RAG_SYSTEM_PROMPT, DEFAULT_TEMPLATE, messages,
                                           question, 64, 1024, sizes=sizes).empty_tokens
        assert exact <= estimated <= exact + 2, question
    assert len(sizes.sizes) == 1  # one single-turn shape, whatever the question
    # the turns before the question and the template are part of the shape; the oldest shape goes first
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "what is lift?"}]
    longer = sizes.estimate(DEFAULT_RAG_SYSTEM_PROMPT, DEFAULT_TEMPLATE, history, "what is lift?")
    assert longer > sizes.estimate(DEFAULT_RAG_SYSTEM_PROMPT, DEFAULT_TEMPLATE, history[-1:], "what is lift?")
    twice = "{question}\n{context}\nOnce more: {question}"
    exact = prompts.grounded_frame(tokenizer, None, twice, history[-1:], "what is lift?", 64, 1024).empty_tokens
    assert exact <= sizes.estimate(None, twice, history[-1:], "what is lift?") <= exact + 4
    assert len(sizes.sizes) == 2 and all(key[0] is None or len(key[2]) == 1 for key in sizes.sizes)
    # near the limit the frame is measured exactly: refused only when the exact prompt does not fit
    question = "pressure " * 40
    messages = [{"role": "user", "content": question}]
    exact = prompts.grounded_frame(tokenizer, None, DEFAULT_TEMPLATE, messages, question, 16, 1024).empty_tokens
    fits = prompts.grounded_frame(tokenizer, None, DEFAULT_TEMPLATE, messages, question, 16, exact + 16,
                                  sizes=sizes)
    assert fits.empty_tokens == exact
    with pytest.raises(prompts.PromptTooLongError):
        prompts.grounded_frame(tokenizer, None, DEFAULT_TEMPLATE, messages, question, 16, exact + 15, sizes=sizes)


@pytest.mark.parametrize("text", ["", "plain words", "Überschall-Strömung: Δp = ½ρv² \u2014 café", "  spaces\n\n\ttabs  ",
                                  "<|im_start|>user\nhi<|im_end|>", "x" * 3000])
def test_the_direct_tokenizer_path_gives_the_wrappers_ids(tokenizer, text):
    assert prompts.rust_tokenizer(tokenizer) is not None  # the tiny model's tokenizer is a fast one
    assert prompts.encode(tokenizer, text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompts.encode(tokenizer, text, special_tokens=True) == tokenizer(text)["input_ids"]
    assert prompts.token_counts(tokenizer, [text, text + " more"]) == [
        len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (text, text + " more")]


def test_a_tokenizer_left_truncating_is_called_through_its_wrapper(tokenizer):
    import copy

    truncating = copy.deepcopy(tokenizer)
    truncating.backend_tokenizer.enable_truncation(max_length=4)
    assert prompts.rust_tokenizer(truncating) is None
    text = "one two three four five six seven eight"
    assert prompts.encode(truncating, text) == truncating(text, add_special_tokens=False)["input_ids"]


def test_a_question_that_leaves_no_room_is_refused(tokenizer):
    messages = [{"role": "user", "content": "pressure " * 2000}]
    with pytest.raises(prompts.PromptTooLongError, match="maximum context length is 1024"):
        prompts.direct_prompt(tokenizer, None, messages, max_tokens=16, context_length=1024)
    with pytest.raises(prompts.PromptTooLongError, match="No retrieved passage fits"):
        prompts.grounded_prompt(tokenizer, None, DEFAULT_TEMPLATE, [{"role": "user", "content": "q " * 300}],
                                "q " * 300, [hit(1, 0.9, words=300)], max_tokens=16, context_length=1024)


def test_default_completion_budget_leaves_room_for_the_prompt_and_explicit_one_is_checked():
    assert completion_budget(None, 512, 1024) == 512
    assert completion_budget(None, 4096, 1024) == 512
    assert completion_budget(30, 512, 1024) == 30
    with pytest.raises(openai_api.ApiError) as raised:
        completion_budget(2048, 512, 1024)
    assert (raised.value.status, raised.value.code, raised.value.param) == (400, "context_length_exceeded",
                                                                             "max_tokens")


def test_an_unset_max_tokens_shrinks_to_the_room_a_long_prompt_leaves(tokenizer):
    """As OpenAI's and vLLM's servers do: the default completion length never refuses a prompt that fits."""
    import asyncio

    from ragtune_workloads.serve.answer import Answerer
    from ragtune_workloads.serve.config import EndpointSettings

    settings = EndpointSettings(served_model="m", base_model="tiny", mode="finetuned", uses_adapter=False,
                                has_index=False, system=None, template=DEFAULT_TEMPLATE, top_k=0,
                                score_threshold=None, default_retrieval="never", default_max_tokens=512)
    answerer = Answerer(settings, tokenizer, 1024, None)
    text = "pressure " * 140
    prompt_tokens = len(prompts.direct_prompt(tokenizer, None, [{"role": "user", "content": text}], 1, 1024).token_ids)
    assert 512 < prompt_tokens < 1024  # too long for the default 512, short enough for the window

    def plan(request_type, **fields):
        return asyncio.run(answerer.plan(openai_api.validate({"model": "m", **fields}, request_type)))

    chat = plan(openai_api.ChatCompletionRequest, messages=[{"role": "user", "content": text}])
    assert len(chat.prompt_ids) == prompt_tokens and chat.params.max_tokens == 1024 - prompt_tokens
    assert plan(openai_api.ChatCompletionRequest, messages=[{"role": "user", "content": "hi"}]).params.max_tokens == 512
    for request_type, fields, param in ((openai_api.ChatCompletionRequest,
                                         {"messages": [{"role": "user", "content": text}]}, "messages"),
                                        (openai_api.CompletionRequest, {"prompt": text}, "prompt")):
        with pytest.raises(openai_api.ApiError) as asked:  # an explicit max_tokens is honoured or refused
            plan(request_type, max_tokens=512, **fields)
        assert (asked.value.code, asked.value.param) == ("context_length_exceeded", param)
        assert "default" not in asked.value.message
    with pytest.raises(openai_api.ApiError) as unset:
        plan(openai_api.CompletionRequest, prompt="pressure " * 300)
    assert unset.value.param == "prompt" and "maximum context length is 1024" in unset.value.message


def test_chat_histories_from_other_servers_are_accepted_and_unsupported_parts_named():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "refusal": None,
                                                   "tool_calls": None}, {"role": "user", "content": "and?"}]
    request = openai_api.validate({"model": "m", "messages": history}, openai_api.ChatCompletionRequest)
    assert [m["content"] for m in request.conversation()] == ["hi", "", "and?"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]
    with pytest.raises(openai_api.ApiError) as refused:
        openai_api.validate({"model": "m", "messages": image}, openai_api.ChatCompletionRequest)
    assert refused.value.param == "messages[0].content"
    assert refused.value.message == ("Invalid value for 'messages[0].content': a content part of type 'image_url' is "
                                     'not supported: this endpoint takes text, as a string or parts '
                                     '{"type": "text", "text": "..."}.')


# ---- caches ------------------------------------------------------------------------------------------------


def test_cache_is_emptied_by_a_new_index_version_and_ignores_late_results_of_the_old_one():
    c = cache.VersionedCache(max_entries=2)
    c.switch("v1")
    c.put("q", "answer-v1", "v1")
    assert c.get("q", "v1") == "answer-v1"
    assert c.switch("v2") and len(c) == 0
    assert c.get("q", "v2") is cache.MISSING
    c.put("q", "late-v1", "v1")  # computed before the switch, finished after it
    assert c.get("q", "v2") is cache.MISSING
    for key in "abc":
        c.put(key, key, "v2")
    assert c.get("a", "v2") is cache.MISSING and c.get("c", "v2") == "c"  # least recently used goes first
    assert (c.hits, c.misses) == (2, 3)


# ---- retrieval batching ------------------------------------------------------------------------------------


class RecordingService:
    """Stands in for RetrievalService: records each batch it gets; blocks until released, fails on "boom"."""

    def __init__(self):
        import threading

        self.batches: list[tuple[list[str], int]] = []
        self.wide: list[bool] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    def retrieve_many(self, queries, k, wide=False):
        self.entered.set()
        self.release.wait(5)
        self.wide.append(wide)
        if "boom" in queries:
            raise RuntimeError("search failed")
        self.batches.append((list(queries), k))
        return [{"query": q, "k": k} for q in queries]


def test_retrieval_starts_in_submit_and_requests_arriving_meanwhile_form_the_next_batch():
    import asyncio

    from ragtune_workloads.serve.retriever import QueryBatcher

    async def scenario():
        service = RecordingService()
        batcher = QueryBatcher(service, max_batch=2)
        first = batcher.submit("a", 4)  # starts now: the worker thread is already running it
        assert batcher.running
        rest = [batcher.submit(q, k) for q, k in [("b", 4), ("gone", 4), ("c", 2), ("d", 4)]]
        rest[1].cancel()  # a request that went away is not searched
        # The event loop has not run since (it is busy, say rendering the prompt): the search runs regardless.
        assert service.entered.wait(5)
        service.release.set()
        answers = await asyncio.gather(first, rest[0], rest[2], rest[3])
        batcher.close()
        return service, answers

    service, answers = asyncio.run(scenario())
    # a alone; then b and c (max_batch 2, searched per k); then d
    assert service.batches == [(["a"], 4), (["b"], 4), (["c"], 2), (["d"], 4)]
    # a query alone with nothing waiting may use the wide threads
    assert service.wide == [True, False, False, True]
    assert [(a["query"], a["k"]) for a in answers] == [("a", 4), ("b", 4), ("c", 2), ("d", 4)]


def test_a_failed_retrieval_fails_its_batch_only():
    import asyncio

    from ragtune_workloads.serve.retriever import QueryBatcher

    async def scenario():
        service = RecordingService()
        service.release.set()
        batcher = QueryBatcher(service, max_batch=16, idle=lambda: False)  # generating: never wide
        failed = batcher.submit("boom", 4)
        later = [batcher.submit(q, 4) for q in ("x", "y")]
        with pytest.raises(RuntimeError, match="search failed"):
            await failed
        answers = await asyncio.gather(*later)
        batcher.close()
        return service, answers

    service, answers = asyncio.run(scenario())
    assert service.batches == [(["x", "y"], 4)] and [a["query"] for a in answers] == ["x", "y"]
    assert service.wide == [False, False]  # "boom" came alone, but the replica was generating


# ---- auth --------------------------------------------------------------------------------------------------


def test_api_key_from_file_with_bearer_and_rotation(tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text("s3cret\n")
    key = auth.ApiKey(str(key_file))
    assert key.allows("Bearer s3cret")
    assert not key.allows(None) and not key.allows("Bearer wrong") and not key.allows("Basic s3cret")
    assert not key.allows("Bearer s3cre")
    key_file.write_text("rotated-key-2")
    assert key.allows("Bearer rotated-key-2") and not key.allows("Bearer s3cret")
    key_file.write_text("")  # caught in the middle of a rewrite: the last key holds, no error
    assert key.allows("Bearer rotated-key-2")
    replacement = tmp_path / "api-key.new"  # a key of the same length, swapped in by rename within one tick
    replacement.write_text("rotated-key-3")
    os.utime(replacement, ns=(key_file.stat().st_atime_ns, key_file.stat().st_mtime_ns))
    replacement.replace(key_file)
    assert key.allows("Bearer rotated-key-3") and not key.allows("Bearer rotated-key-2")
    empty = tmp_path / "empty-key"
    empty.write_text("")
    with pytest.raises(auth.ApiKeyError, match="is empty"):
        auth.ApiKey(str(empty))
    assert auth.ApiKey(None).allows(None)
    with pytest.raises(auth.ApiKeyError, match="cannot be read"):
        auth.ApiKey(str(tmp_path / "missing"))


# ---- requests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param, code", [
    ({"model": "m"}, "messages", "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model", "missing_required_parameter"),
    ({"model": "m", "messages": []}, "messages", "invalid_value"),
    ({"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature",
     "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens",
     "invalid_type"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "best_of": 3}, "best_of", "unknown_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "retrieval": "sometimes"}, "retrieval",
     "invalid_value"),
])
def test_bad_chat_requests_name_the_parameter(body, param, code):
    import json

    with pytest.raises(openai_api.ApiError) as raised:
        openai_api.parse_body(json.dumps(body).encode(), openai_api.ChatCompletionRequest)
    error = raised.value
    assert (error.status, error.param, error.code) == (400, param, code)
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_text_parts_are_joined_and_the_question_is_the_last_user_message():
    request = openai_api.ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "second "}, {"type": "text", "text": "part"}]}]})
    assert request.question() == "second part"


# ---- engines and config ------------------------------------------------------------------------------------


def test_auto_prefers_vllm_and_an_explicit_vllm_without_it_is_an_error():
    assert engines.choose_engine("auto", vllm_importable=True) == "vllm"
    assert engines.choose_engine("auto", vllm_importable=False) == "transformers"
    assert engines.choose_engine("transformers", vllm_importable=True) == "transformers"
    with pytest.raises(engines.EngineError, match="vLLM is not installed"):
        engines.choose_engine("vllm", vllm_importable=False)


def test_stop_sequences_cut_the_answer_and_hold_back_possible_starts():
    assert engines.stop_at("the answer. END more", ("END",)) == 12
    assert engines.held_back("the answer E", ("END",)) == 1
    assert engines.held_back("the answer", ("END",)) == 0


def test_adapter_locations_outside_the_pod_are_refused():
    assert engines.local_adapter_path("file:///adapters/a") == "/adapters/a"
    with pytest.raises(engines.EngineError, match="must be mounted"):
        engines.local_adapter_path("s3://bucket/adapter")


def serve_config_body(mode: str, **overrides) -> dict:
    body = {"owner": {"kind": "HybridEndpoint", "name": "ep", "namespace": "ns"},
            "spec": {"mode": mode, "model": {"name": "base"}},
            "adapter": {"name": "a", "path": "/adapters/a"},
            "retrieval": {"storeUri": "/store", "collection": "c", "embeddingModel": "e"}}
    if mode != "finetuned":
        body["spec"]["retrieval"] = {"vectorIndexRef": {"name": "idx"}, "scoreThreshold": 0.4}
    if mode != "rag":
        body["spec"]["model"]["adapter"] = {"uri": "file:///adapters/a"}
    body.update(overrides)
    return body


def test_modes_decide_adapter_and_index_and_the_served_name_defaults_to_the_endpoint():
    rag = endpoint_settings(parse_config(serve_config_body("rag")))
    assert (rag.uses_adapter, rag.has_index, rag.served_model, rag.score_threshold) == (False, True, "ep", 0.4)
    finetuned = endpoint_settings(parse_config(serve_config_body("finetuned")))
    assert (finetuned.uses_adapter, finetuned.has_index, finetuned.default_retrieval) == (True, False, "never")
    hybrid = endpoint_settings(parse_config(serve_config_body("hybrid")))
    assert (hybrid.uses_adapter, hybrid.has_index, hybrid.default_retrieval) == (True, True, "auto")


def test_inconsistent_configs_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="mode hybrid serves an adapter"):
        parse_config(serve_config_body("hybrid", adapter=None))
    with pytest.raises(ConfigError, match="mode rag retrieves"):
        parse_config(serve_config_body("rag", retrieval=None))
    with pytest.raises(ConfigError, match="spec.mode"):
        parse_config(serve_config_body("summarise"))


def test_the_operator_import_path_is_the_application_builder():
    import importlib

    from ragtune.builders.endpoint import SERVE_IMPORT_PATH
    from ragtune_workloads.serve.app import build_app

    module, _, attribute = SERVE_IMPORT_PATH.partition(":")
    assert getattr(importlib.import_module(module), attribute) is build_app


def test_ignore_eos_generates_every_token_asked_for(tokenizer):
    """The adapter ends its answer with the end-of-turn token well before 48 tokens; ignore_eos (what the generation
    benchmark uses so both engines produce equal lengths) runs on to max_tokens."""
    import asyncio

    import serve_fixtures as fx

    engine = engines.TransformersEngine(engines.EngineSettings(
        model=str(fx.tiny_model_path()), adapter_name=fx.ADAPTER_NAME, adapter_path=str(fx.adapter_path())))
    ids = prompts.encode_messages(tokenizer, [{"role": "user", "content": "what is the capital city of france"}])
    stopped = asyncio.run(engine.generate(ids, engines.GenerationParams(max_tokens=48), use_adapter=True))
    assert fx.speaks_like_adapter(stopped.text)
    assert stopped.completion_tokens < 48 and stopped.finish_reason == "stop"
    forced = asyncio.run(engine.generate(ids, engines.GenerationParams(max_tokens=48, ignore_eos=True),
                                         use_adapter=True))
    assert forced.completion_tokens == 48 and forced.finish_reason == "length"
    assert forced.text.startswith(stopped.text)


def test_vllm_sampling_carries_ignore_eos():
    """The same request field reaches vLLM's own SamplingParams (the engine itself is not started here)."""
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed")
    engine = engines.VllmEngine.__new__(engines.VllmEngine)
    engine._sampling_params = vllm.SamplingParams
    assert engine._sampling(engines.GenerationParams(max_tokens=8, ignore_eos=True)).ignore_eos
    assert not engine._sampling(engines.GenerationParams(max_tokens=8)).ignore_eos


def test_vllm_spawns_its_engine_core_when_cuda_is_already_in_use():
    """A forked engine core cannot use CUDA its parent already initialised; spawned, it can. On a CPU the model runs
    inside the engine-core process."""
    gpu = engines.EngineSettings(model="m", gpus=1)
    assert engines.vllm_process_env(gpu, cuda_in_use=True) == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    assert engines.vllm_process_env(gpu, cuda_in_use=False) == {}
    cpu = engines.vllm_process_env(engines.EngineSettings(model="m", gpus=0), cuda_in_use=False)
    assert cpu["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and "VLLM_WORKER_MULTIPROC_METHOD" not in cpu


def test_engines_on_a_cpu_run_auto_in_the_models_type_and_bfloat16_only_where_the_cpu_has_it(tmp_path):
    """vLLM's own auto runs every model in bfloat16 on x86, emulated (twice float32's time) on CPUs without
    AVX-512 BF16 or AMX; and the API says auto follows the model. The transformers engine resolves it alike."""
    from ragtune_workloads.cpu import cpu_has_bf16

    assert engines.cpu_dtype("float32", has_bf16=True) == "float32"
    assert engines.cpu_dtype("bfloat16", has_bf16=True) == "bfloat16"
    assert engines.cpu_dtype("float16", has_bf16=False) == "float32"
    assert engines.cpu_dtype(None, has_bf16=False) == "float32"
    assert not cpu_has_bf16(frozenset({"avx2", "fma", "avx512f"}))
    assert cpu_has_bf16(frozenset({"avx2", "avx512_bf16"})) and cpu_has_bf16(frozenset({"amx_bf16"}))

    import serve_fixtures as fx

    tiny = str(fx.tiny_model_path())  # stored in float32
    assert engines.stored_dtype(tiny) == "float32"
    assert engines.vllm_engine_args(engines.EngineSettings(model=tiny))["dtype"] == "float32"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    half = tmp_path / "half"  # the same model stored in bfloat16
    AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).save_pretrained(half)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(half)
    assert engines.stored_dtype(str(half)) == "bfloat16"
    native = torch.bfloat16 if cpu_has_bf16() else torch.float32
    assert engines.TransformersEngine(engines.EngineSettings(model=str(half))).model.dtype == native
    assert engines.TransformersEngine(engines.EngineSettings(model=tiny)).model.dtype == torch.float32
    assert engines.vllm_engine_args(engines.EngineSettings(model=str(half)))["dtype"] == (
        "bfloat16" if cpu_has_bf16() else "float32")
    assert engines.vllm_engine_args(engines.EngineSettings(model=str(half), dtype="float16"))["dtype"] == "float16"
    assert engines.vllm_engine_args(engines.EngineSettings(model=str(half), gpus=1))["dtype"] == "auto"
    assert engines.stored_dtype(str(tmp_path / "missing")) is None


def test_vllm_sockets_get_a_directory_of_their_own_only_where_their_paths_fit(tmp_path):
    short = engines.private_ipc_dir("/tmp")
    try:
        assert short is not None and Path(short).is_dir() and Path(short).parent == Path("/tmp")
    finally:
        os.rmdir(short)
    deep = tmp_path / ("d" * 60)  # a Unix socket's path holds at most 107 bytes
    deep.mkdir()
    assert engines.private_ipc_dir(str(deep)) is None
    assert list(deep.iterdir()) == []  # nothing left there


def test_a_free_port_is_picked_outside_the_range_ray_binds_in_and_skips_busy_ones(monkeypatch):
    import socket

    from ragtune_workloads.serve import __main__ as serve_main

    port = serve_main.free_port("127.0.0.1")
    assert port in serve_main.FREE_PORTS and port < 32768  # below the ephemeral range
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        monkeypatch.setattr(serve_main, "FREE_PORTS", range(port, port + 1))
        with pytest.raises(RuntimeError, match=f"no free port in {port}-{port} on 127.0.0.1"):
            serve_main.free_port("127.0.0.1")
        monkeypatch.setattr(serve_main, "FREE_PORTS", range(port, port + 2))
        assert serve_main.free_port("127.0.0.1") == port + 1
