"""GGUF export through llama.cpp's own converter, fetched by hack/llama-cpp.sh from the llama-cpp-python sources on
PyPI (which vendor llama.cpp). The model is a tiny Llama with a SentencePiece vocabulary: llama.cpp accepts BPE
tokenizers only when it knows them by the hash of a known model's vocabulary, which a tokenizer trained for the
tests never is, while SentencePiece vocabularies are read as they are."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ragtune_workloads.finetune import artifacts

REPO = Path(__file__).resolve().parents[2]
VOCAB = 400
HIDDEN = 64


@pytest.fixture(scope="module")
def llama_cpp_dir() -> Path:
    result = subprocess.run(["bash", str(REPO / "hack" / "llama-cpp.sh")], capture_output=True, text=True)
    if result.returncode != 0:
        reason = f"llama.cpp's converter could not be fetched: {result.stderr.strip()[-400:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return Path(result.stdout.strip())


@pytest.fixture(scope="module")
def gguf_reader(llama_cpp_dir):
    sys.path.insert(0, str(llama_cpp_dir / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.remove(str(llama_cpp_dir / "gguf-py"))
    return GGUFReader


@pytest.fixture(scope="module")
def spm_llama(tmp_path_factory) -> Path:
    import sentencepiece
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("spm-llama")
    lines = ["the boundary layer of a flat plate in supersonic flow", "how does a pipeline promote an adapter",
             "answer the question using only the context below", "instruction input output response"] * 50
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, vocab_size=VOCAB,
                                             model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                             unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(proto.getvalue())
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def text_field(reader, name: str) -> str:
    field = reader.fields[name]
    return bytes(field.parts[field.data[0]]).decode()


def test_f16_export_carries_the_models_weights_and_vocabulary(spm_llama, llama_cpp_dir, gguf_reader, tmp_path,
                                                             monkeypatch):
    from safetensors.numpy import load_file

    monkeypatch.setenv("LLAMA_CPP_DIR", str(llama_cpp_dir))
    path = artifacts.export_gguf(spm_llama, tmp_path, "f16")

    assert path == tmp_path / "model-f16.gguf" and sorted(p.name for p in tmp_path.iterdir()) == ["model-f16.gguf"]
    reader = gguf_reader(path)
    assert text_field(reader, "general.architecture") == "llama"
    assert text_field(reader, "tokenizer.ggml.model") == "llama"  # the SentencePiece vocabulary, as trained
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == VOCAB
    tensors = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= set(tensors)
    embedding = np.asarray(tensors["token_embd.weight"].data, dtype=np.float32).reshape(VOCAB, HIDDEN)
    original = load_file(str(spm_llama / "model.safetensors"))["model.embed_tokens.weight"]
    np.testing.assert_allclose(embedding, original, atol=1e-3)


def test_q8_0_export_quantises_the_weight_matrices(spm_llama, llama_cpp_dir, gguf_reader, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(llama_cpp_dir))
    path = artifacts.export_gguf(spm_llama, tmp_path, "q8_0")
    tensors = {t.name: t for t in gguf_reader(path).tensors}
    assert path.name == "model-q8_0.gguf"
    assert {tensors[name].tensor_type.name for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight")} == {"Q8_0"}
    assert tensors["output_norm.weight"].tensor_type.name == "F32"  # vectors stay as they are


def test_a_model_the_converter_refuses_fails_with_its_reason(llama_cpp_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(llama_cpp_dir))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"]}')
    with pytest.raises(artifacts.ExportError, match=r"GGUF export failed: convert_hf_to_gguf.py exited \d+: .+"):
        artifacts.export_gguf(tmp_path / "model", tmp_path, "f16")
