"""Turning examples into the text the model trains on: a prompt (no loss) and a completion (the loss).

A model with a chat template is trained in that template, so the adapter sees at training time exactly what a
chat-completions server will send it. A model without one gets the common `### Instruction / ### Input /
### Response` layout. Every format (instruction, prompt/completion, chat) goes through the same path: the prompt
of a prompt/completion row is the user's turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .data import Example, Message


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str
    # The reference answer without template markup, what generated text is scored against.
    reference: str


def chat_messages(example: Example) -> list[dict[str, str]]:
    """The conversation for a chat template; an instruction row's input joins the instruction in the user turn."""
    messages = [{"role": m.role, "content": m.content} for m in example.prompt]
    if example.context:
        messages[-1] = {**messages[-1], "content": f"{messages[-1]['content']}\n\n{example.context}"}
    return messages


def plain_prompt(example: Example) -> str:
    """The `### Instruction` layout; earlier turns of a chat become instruction/response pairs."""
    parts: list[str] = []
    turns: list[Message] = list(example.prompt)
    if turns and turns[0].role == "system":
        parts.append(f"{turns.pop(0).content}\n\n")
    for i, message in enumerate(turns):
        if message.role == "user":
            parts.append(f"### Instruction:\n{message.content}\n\n")
            if i == len(turns) - 1 and example.context:
                parts.append(f"### Input:\n{example.context}\n\n")
            if i == len(turns) - 1:
                parts.append("### Response:\n")
        else:
            parts.append(f"### Response:\n{message.content}\n\n")
    if not parts or not parts[-1].endswith("### Response:\n"):
        parts.append("### Response:\n")
    return "".join(parts)


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and bos in tokenizer("x").input_ids[:1]


def template_prompt_completion(tokenizer: Any, example: Example) -> tuple[str, str]:
    messages = chat_messages(example)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": example.completion}],
                                         tokenize=False)
    eos = tokenizer.eos_token or ""
    if full.startswith(prompt):
        completion = full[len(prompt):]
        # End on the end-of-turn token: trailing newlines after it would be learnt as part of the answer and
        # trl would add a second eos after them.
        if eos and eos in completion:
            completion = completion[: completion.rindex(eos) + len(eos)]
    else:  # templates that render the generation prompt differently from a finished turn
        completion = example.completion + eos
    # The template already wrote the bos token; the tokenizer would add a second one.
    if tokenizer.bos_token and prompt.startswith(tokenizer.bos_token) and _tokenizer_adds_bos(tokenizer):
        prompt = prompt[len(tokenizer.bos_token):]
    return prompt, completion


def format_example(tokenizer: Any, example: Example) -> PromptCompletion:
    if getattr(tokenizer, "chat_template", None):
        prompt, completion = template_prompt_completion(tokenizer, example)
    else:
        prompt, completion = plain_prompt(example), example.completion + (tokenizer.eos_token or "")
    return PromptCompletion(prompt, completion, example.completion)


def to_records(tokenizer: Any, examples: list[Example]) -> list[dict[str, str]]:
    """Rows for trl's prompt/completion dataset: string prompts, so the loss covers the completion only."""
    return [{"prompt": pc.prompt, "completion": pc.completion}
            for pc in (format_example(tokenizer, e) for e in examples)]
