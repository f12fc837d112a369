"""When to retrieve, and which retrieved chunks may be used.

The rule for `retrieval: auto` (the default):
  * small talk is answered without retrieval: a message of at most SMALL_TALK_MAX_WORDS words that are all
    greetings, thanks, farewells or acknowledgements ("hi", "thanks a lot", "good morning!", "ok bye");
  * everything else is treated as a question and retrieves, like `always`.
After retrieval (auto or always), chunks scoring below the endpoint's score threshold are dropped. When none is
left, the endpoint answers that it does not know without calling the model: a question the documents do not
cover is exactly where a model would invent an answer. `never` skips retrieval and lets the model answer alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

RetrievalChoice = Literal["auto", "always", "never"]

SMALL_TALK_MAX_WORDS = 6
SMALL_TALK_WORDS = frozenset("""
hi hello hey hiya howdy yo greetings morning afternoon evening night good day there all everyone
thanks thank thx ty you very much so a lot cheers appreciated great nice cool awesome perfect
bye goodbye cya see later soon take care farewell
ok okay k sure fine alright yes no yep nope got it understood
how are doing whats up sup
""".split())
WORD = re.compile(r"[a-z']+")

DONT_KNOW_ANSWER = ("I don't know: none of the indexed documents matches this question closely enough to "
                    "answer it.")


def words(text: str) -> list[str]:
    return [w.replace("'", "") for w in WORD.findall(text.lower())]


def is_small_talk(text: str) -> bool:
    tokens = words(text)
    if not tokens or len(tokens) > SMALL_TALK_MAX_WORDS or any(ch.isdigit() for ch in text):
        return False
    return all(token in SMALL_TALK_WORDS for token in tokens)


@dataclass(frozen=True)
class Route:
    retrieve: bool
    reason: str  # shown to clients in the response's `retrieval.reason`


def decide(choice: RetrievalChoice, question: str, has_index: bool) -> Route:
    if not has_index or choice == "never":
        return Route(False, "no-index" if not has_index else "never")
    if choice == "always":
        return Route(True, "always")
    if is_small_talk(question):
        return Route(False, "small-talk")
    return Route(True, "question")


def similarity(score: float, metric: str) -> float:
    """Milvus reports COSINE/IP as similarity but L2 as a squared distance; embeddings are normalised, so
    cos = 1 - d²/2 puts all three on the scale the endpoint's scoreThreshold uses."""
    return 1.0 - score / 2.0 if metric == "L2" else score


def above_threshold(hits: list[dict], threshold: float | None) -> list[dict]:
    """Hits (already carrying `score` as a similarity), best first, without those below the threshold."""
    ranked = sorted(hits, key=lambda hit: hit["score"], reverse=True)
    if threshold is None:
        return ranked
    return [hit for hit in ranked if hit["score"] >= threshold]
