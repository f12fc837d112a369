"""A tiny Llama and its tokenizer, built locally so tests and benchmarks never need a model hub.

The model is random-initialised; what matters is that it has the real architecture (attention, MLP, every linear
layer LoRA targets), a real BPE tokenizer and a chat template, so fine-tuning, merging and serving code paths are
the same ones a 7B model takes. Shapes follow what vLLM's CPU attention accepts (head_dim 32).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Bump when anything below changes what gets written: cached copies are keyed by it.
TINY_LLAMA_VERSION = "tiny-llama-v1"

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
END_OF_TURN = "<|end|>"

# One turn per message; the end-of-turn token doubles as eos so generation stops at the end of an answer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the a model answer question cluster kubernetes pod node volume adapter rank alpha learning rate "
    "training evaluation checkpoint resume metric loss token prompt response instruction input output "
    "paris france capital city river mountain ocean blue green red number one two three four five six "
    "seven eight nine ten add subtract multiply result is what how why where when who please explain "
    "short long fast slow data row file json line error skip fail merge export digest status ready"
).split()


_SYLLABLES = "ka ri to mu se na lo pe vi du ga ho ze fi ra bo ne ti wu ce la mo si ju de po ky xa qu ve".split()


def _invented_word(i: int) -> str:
    # Invented words give the BPE trainer enough distinct pairs to reach a realistic vocabulary size.
    n = len(_SYLLABLES)
    return _SYLLABLES[i % n] + _SYLLABLES[(i // n) % n] + _SYLLABLES[(i * 7 // n // n) % n]


def training_corpus(lines: int = 4000) -> list[str]:
    """Deterministic text covering the words, digits and markup the tests and benchmarks use."""
    corpus = []
    for i in range(lines):
        words = [_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(6 + i % 9)]
        words += [_invented_word(i * 5 + j) for j in range(4)]
        corpus.append(f"{' '.join(words)} {i % 100} + {(i * 3) % 100} = {(i + i * 3) % 200}.")
    corpus.append("### Instruction:\n### Input:\n### Response:\n")
    return corpus


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    return tokenizer


def build_tiny_llama(path: str | os.PathLike, *, vocab_size: int = 2048, chat_template: bool = True,
                     seed: int = 0) -> Path:
    """Writes a random-initialised LlamaForCausalLM (hidden 128, 4 heads, 2 layers) and its tokenizer to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size),
        bos_token="<s>", eos_token=END_OF_TURN, pad_token="<pad>",
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    return path


def cache_root() -> Path:
    return Path(os.environ.get("RAGTUNE_CACHE", Path.home() / ".cache" / "ragtune"))


def tiny_llama_path(*, chat_template: bool = True) -> Path:
    """The cached tiny model, built on first use. Safe when several processes ask at once: each builds into its
    own temporary directory and the first rename wins."""
    key = TINY_LLAMA_VERSION + ("" if chat_template else "-no-template")
    target = cache_root() / "models" / key
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        build_tiny_llama(staging, chat_template=chat_template)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
