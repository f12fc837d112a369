"""Prompts: the system prompt per mode, the user template, and retrieved context packed into the model's window.

Context is measured in the generation model's own tokens after the chat template is applied, so what is sent
always fits: prompt tokens + max_tokens <= the model's context length. Chunks go in best first; a chunk too big
for the room left is skipped and a smaller, lower-ranked one may still fit.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragtune.api.hybridendpoint import DEFAULT_HYBRID_SYSTEM_PROMPT, DEFAULT_RAG_SYSTEM_PROMPT

PLACEHOLDER = re.compile(r"\{(context|question)\}")
CHUNK_SEPARATOR = "\n\n"
ESTIMATE_MARGIN = 16  # tokens: an estimated frame this close to the limit is measured exactly
DENSITY_MARGIN = 1.1  # chunks whose characters at the densest token rate seen, +10 %, fit are tried all at once
DEFAULT_SYSTEM_PROMPTS = {"rag": DEFAULT_RAG_SYSTEM_PROMPT, "hybrid": DEFAULT_HYBRID_SYSTEM_PROMPT}


class PromptTooLongError(ValueError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int, detail: str = ""):
        self.prompt_tokens = prompt_tokens
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            f"completion). {detail or 'Please reduce the length of the messages or the completion.'}")


def system_prompt(mode: str, configured: str | None, grounded: bool) -> str | None:
    """The endpoint's own system prompt always applies; the defaults are instructions about retrieved context,
    so they are only used when context is actually given."""
    if configured:
        return configured
    return DEFAULT_SYSTEM_PROMPTS.get(mode) if grounded else None


def render_template(template: str, context: str, question: str) -> str:
    """Fills {context} and {question} in one pass, so braces inside either are never expanded again."""
    values = {"context": context, "question": question}
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def format_chunk(number: int, hit: dict[str, Any]) -> str:
    where = hit.get("document") or hit.get("id", "")
    if hit.get("section"):
        where += f" > {hit['section']}"
    return f"[{number}] ({where})\n{hit['text'].strip()}"


def format_context(hits: Sequence[dict[str, Any]]) -> str:
    return CHUNK_SEPARATOR.join(format_chunk(number, hit) for number, hit in enumerate(hits, 1))


def merge_system(endpoint_system: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """One system message at the start: the endpoint's first, then whatever the client sent (many chat
    templates accept only one system message, and only first)."""
    client_system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
    rest = [m for m in messages if m["role"] not in ("system", "developer")]
    system = "\n\n".join(part for part in [endpoint_system, *client_system] if part)
    return ([{"role": "system", "content": system}] if system else []) + rest


def with_question_turn(messages: list[dict[str, str]], user_turn: str) -> list[dict[str, str]]:
    """Replaces the content of the last user message (the question) by the rendered template."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [*messages[:last_user], {"role": "user", "content": user_turn}, *messages[last_user + 1:]]


def rust_tokenizer(tokenizer: Any) -> Any | None:
    """The `tokenizers` object behind a fast tokenizer when calling it directly gives the wrapper's ids: no
    truncation or padding left configured on it. Calling it skips the wrapper's per-call bookkeeping, which
    costs more than the tokenisation of a prompt (a request tokenises several texts)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    return backend


def encode_backend(backend: Any, texts: list[str], special_tokens: bool) -> list[Any]:
    """Encodings of `texts` by a `tokenizers` object, without character offsets where the library can skip them
    (`encode_batch_fast`: the same ids in ~0.7x the time)."""
    batch = backend.encode_batch_fast if hasattr(backend, "encode_batch_fast") else backend.encode_batch
    return batch(texts, add_special_tokens=special_tokens)


def encode(tokenizer: Any, text: str, special_tokens: bool = False) -> list[int]:
    backend = rust_tokenizer(tokenizer)
    if backend is not None:
        return encode_backend(backend, [text], special_tokens)[0].ids
    return list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])


def token_counts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    backend = rust_tokenizer(tokenizer)
    if backend is not None:
        return [len(e.ids) for e in encode_backend(backend, list(texts), False)]
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []


class TokenCounts:
    """Token counts of texts, remembered (least recently used first out): the same chunks come back for many
    questions, and counting a chunk costs about a microsecond a token. Keyed by the text itself, so a chunk
    whose text changed in a new index version is counted again.

    It also learns the tokenizer's densest rate, the most tokens per character among the texts it counted, from
    which `surely_fit` tells, without tokenising, that texts fit a number of tokens."""

    def __init__(self, tokenizer: Any, max_entries: int = 8192):
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.counts: OrderedDict[str, int] = OrderedDict()
        self.densest = 0.0

    def surely_fit(self, texts: Sequence[str], tokens: int) -> bool:
        """True when `texts` at the densest rate counted so far, with a margin, take at most `tokens`; False
        before anything was counted. An estimate: `Frame.pack` still encodes the prompt exactly."""
        return self.densest > 0 and sum(map(len, texts)) * self.densest * DENSITY_MARGIN <= tokens

    def __call__(self, texts: Sequence[str]) -> list[int]:
        missing = [text for text in dict.fromkeys(texts) if text not in self.counts]
        for text, count in zip(missing, token_counts(self.tokenizer, missing)):
            self.counts[text] = count
            if text:
                self.densest = max(self.densest, count / len(text))
        result = []
        for text in texts:
            self.counts.move_to_end(text)
            result.append(self.counts[text])
        while len(self.counts) > self.max_entries:
            self.counts.popitem(last=False)
        return result


class FrameSizes:
    """Token counts of grounded prompts with neither context nor question, remembered per conversation shape (the
    system prompt, the template and the turns around the question): a single-turn request's prompt without context
    is then measured by tokenising its question alone, not by rendering the chat template and tokenising the system
    prompt and the template again. That work ran beside the query's embedding and slowed it by as much as it cost.

    The sum is an estimate: tokens can merge where the question meets the template (on Cranfield's 225 questions
    and the default template: 0–2 tokens more than exact, never fewer). The final prompt is always encoded exactly,
    and an estimate near the limit is replaced by the exact count before anything is refused."""

    def __init__(self, tokenizer: Any, max_entries: int = 256):
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.sizes: OrderedDict[tuple, int] = OrderedDict()

    def estimate(self, system: str | None, template: str, messages: list[dict[str, str]], question: str) -> int:
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        key = (system, template, tuple((m["role"], None if i == last_user else m["content"])
                                       for i, m in enumerate(messages)))
        size = self.sizes.get(key)
        if size is None:
            empty = merge_system(system, with_question_turn(messages, render_template(template, "", "")))
            size = self.sizes[key] = len(encode_messages(self.tokenizer, empty))
            if len(self.sizes) > self.max_entries:
                self.sizes.popitem(last=False)
        else:
            self.sizes.move_to_end(key)
        # a template may ask for the question more than once (or not at all)
        return size + len(encode(self.tokenizer, question)) * PLACEHOLDER.findall(template).count("question")


def encode_messages(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return encode(tokenizer, text)
    # A base model without a chat template gets a plain transcript ending where the answer starts.
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
    return encode(tokenizer, text, special_tokens=True)


@dataclass
class Prompt:
    token_ids: list[int]
    messages: list[dict[str, str]]
    sources: list[dict[str, Any]] = field(default_factory=list)


def direct_prompt(tokenizer: Any, system: str | None, messages: list[dict[str, str]], max_tokens: int,
                  context_length: int) -> Prompt:
    final = merge_system(system, messages)
    ids = encode_messages(tokenizer, final)
    if len(ids) + max_tokens > context_length:
        raise PromptTooLongError(len(ids), max_tokens, context_length)
    return Prompt(ids, final)


@dataclass
class Frame:
    """The grounded prompt before the context is known: its size without any chunk (measured, or estimated by
    `FrameSizes`), and how to render it with chunks."""

    tokenizer: Any
    build: Callable[[list[dict[str, Any]]], list[dict[str, str]]]
    empty_tokens: int
    budget: int  # prompt tokens allowed: context length - max_tokens
    max_tokens: int
    context_length: int
    count: Callable[[Sequence[str]], list[int]]  # token counts of texts (TokenCounts, or token_counts)
    # whether texts surely fit a number of tokens, without counting them (TokenCounts.surely_fit), or None
    surely_fit: Callable[[Sequence[str], int], bool] | None = None

    def pack(self, hits: Sequence[dict[str, Any]]) -> Prompt:
        """The prompt with as many of `hits` (best first) as fit; at least one must fit.

        When `surely_fit` says every chunk fits (a window roomy for the retrieved context), the prompt with all of
        them is encoded at once and, if it fits indeed, used: nothing is counted. Otherwise each chunk's cost is
        counted once, on its own; rendering the whole prompt for every candidate would cost a chat-template render
        per chunk. The final render is exact: if merges across chunk boundaries make it a token or two longer than
        counted, the lowest-ranked chunk goes. (Tokenising the prompt with every chunk first without that estimate
        cost more than it saved: with a small context window it seldom fits, and the counts of chunks seen before
        are remembered.)"""
        room = self.budget - self.empty_tokens
        # A chunk's number in the prompt depends on how many went before it; the cost of the number's digits is
        # counted as if it kept its rank (a chunk skipped before it changes the number by one digit at most).
        texts = [CHUNK_SEPARATOR + format_chunk(rank, hit) for rank, hit in enumerate(hits, 1)]
        if hits and self.surely_fit is not None and self.surely_fit(texts, room):
            final = self.build(list(hits))
            ids = encode_messages(self.tokenizer, final)
            if len(ids) <= self.budget:
                return Prompt(ids, final, list(hits))
        costs = self.count(texts)
        chosen: list[dict[str, Any]] = []
        for hit, cost in zip(hits, costs):
            if cost <= room:
                chosen.append(hit)
                room -= cost
        while chosen:
            final = self.build(chosen)
            ids = encode_messages(self.tokenizer, final)
            if len(ids) <= self.budget:
                return Prompt(ids, final, chosen)
            chosen.pop()
        raise PromptTooLongError(self.empty_tokens, self.max_tokens, self.context_length,
                                 "No retrieved passage fits next to the messages: shorten them or lower max_tokens.")


def grounded_frame(tokenizer: Any, system: str | None, template: str, messages: list[dict[str, str]],
                   question: str, max_tokens: int, context_length: int,
                   count: Callable[[Sequence[str]], list[int]] | None = None,
                   sizes: FrameSizes | None = None) -> Frame:
    """The frame of a grounded prompt; PromptTooLongError when not even the prompt without context fits.
    `count`: how chunks are counted (default: tokenised every time; a TokenCounts also lets `pack` skip counting
    when everything surely fits); `sizes`: where the frame's own size is
    estimated from (default: rendered and tokenised exactly)."""

    def build(chosen: list[dict[str, Any]]) -> list[dict[str, str]]:
        turn = render_template(template, format_context(chosen), question)
        return merge_system(system, with_question_turn(messages, turn))

    budget = context_length - max_tokens
    empty_tokens = sizes.estimate(system, template, messages, question) if sizes is not None else None
    if empty_tokens is None or empty_tokens > budget - ESTIMATE_MARGIN:
        empty_tokens = len(encode_messages(tokenizer, build([])))
        if empty_tokens > budget:
            raise PromptTooLongError(empty_tokens, max_tokens, context_length)
    return Frame(tokenizer, build, empty_tokens, budget, max_tokens, context_length,
                 count or (lambda texts: token_counts(tokenizer, texts)),
                 count.surely_fit if isinstance(count, TokenCounts) else None)


def grounded_prompt(tokenizer: Any, system: str | None, template: str, messages: list[dict[str, str]],
                    question: str, hits: Sequence[dict[str, Any]], max_tokens: int, context_length: int) -> Prompt:
    """The prompt with as many of `hits` (best first) as fit next to the messages (`Frame.pack`)."""
    return grounded_frame(tokenizer, system, template, messages, question, max_tokens, context_length).pack(hits)
