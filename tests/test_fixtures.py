"""The offline fixture models: real tokenizers, the shapes and configs the real families have."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from unsloth_nb import fixtures

# Inputs of llama.cpp's tokenizer test vectors on which the HF tokenizer is known to differ from llama.cpp.
# The test asserts this exact set, so a fix or a new regression both show up.
KNOWN_HF_MISMATCHES: dict[str, set[str]] = {
    # Vietnamese with combining marks: llama.cpp's BPE merges the NFC form differently from HF tokenizers.
    "llama3": {"Cửa Việt"},
    # HF's fast Llama tokenizer (Metaspace, prepend_scheme "first") drops or merges the leading spaces that
    # SentencePiece keeps as separate "▁" pieces; tokenizer.model itself (checked below) matches all of them.
    "llama2": {" ", "  ", "   ", " Hello world", " Hello World", " Hello World!", " Hello, world!",
               " this is 🦙.cpp", " Hello", "  Hello", "   Hello", "    Hello", "    Hello\n    Hello", " (",
               " discards"},
    "qwen2": set(),
}


@pytest.mark.parametrize("kind", fixtures.KINDS)
def test_hf_tokenizer_reproduces_llama_cpp_vectors(kind: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixtures.build_tokenizer(kind))
    vectors = fixtures.tokenizer_test_vectors(kind)
    assert len(vectors) >= 40
    mismatches = {text for text, ids in vectors if tokenizer.encode(text, add_special_tokens=False) != ids}
    agreed = len(vectors) - len(mismatches)
    print(f"{kind}: {agreed}/{len(vectors)} llama.cpp tokenizer vectors identical")
    assert mismatches == KNOWN_HF_MISMATCHES[kind]


def test_sentencepiece_model_reproduces_every_vector() -> None:
    import sentencepiece

    model_file = fixtures.build_tokenizer("llama2") / "tokenizer.model"
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vectors = fixtures.tokenizer_test_vectors("llama2")
    assert [processor.encode(text) for text, _ in vectors] == [ids for _, ids in vectors]


@pytest.mark.parametrize("kind", fixtures.KINDS)
def test_fixture_folder_is_a_loadable_hf_model(kind: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = fixtures.build_model(kind)
    config = json.loads((folder / "config.json").read_text())
    assert 2 <= config["num_hidden_layers"] <= 4
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert (folder / "generation_config.json").is_file()
    assert (folder / "chat_template.jinja").read_text().strip()
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert all(f.get_slice(n).get_dtype() == "BF16" for n in names)
    assert ("lm_head.weight" in names) == (not config["tie_word_embeddings"])

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config["vocab_size"])
    assert torch.isfinite(logits).all()


def test_family_specifics(llama3_dir, llama2_dir, qwen2_dir) -> None:
    llama3 = json.loads((llama3_dir / "config.json").read_text())
    assert llama3["rope_scaling"]["rope_type"] == "llama3" and not llama3["tie_word_embeddings"]
    assert (llama2_dir / "tokenizer.model").is_file()
    qwen2 = json.loads((qwen2_dir / "config.json").read_text())
    assert qwen2["tie_word_embeddings"]
    with safe_open(qwen2_dir / "model.safetensors", "pt") as f:
        assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias"} <= set(f.keys())


def test_build_is_cached_and_deterministic(tmp_path, monkeypatch) -> None:
    first = fixtures.build_model("llama2")
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert fixtures.build_model("llama2") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    # A fresh cache with the same seed gives identical weights: fixtures are reproducible across machines.
    archive = fixtures.llamacpp.sdist_archive()
    monkeypatch.setenv("UNSLOTH_NB_CACHE", str(tmp_path))
    (tmp_path / "sdist").mkdir()
    (tmp_path / "sdist" / archive.name).symlink_to(archive)
    second = fixtures.build_model("llama2")
    assert second.parent.parent == tmp_path
    assert (second / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="llama3"):
        fixtures.build_model("gpt5")
