"""Shared pytest fixtures: tiny offline models with real tokenizers (built once, cached)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unsloth_nb import fixtures


@pytest.fixture(scope="session")
def llama3_dir() -> Path:
    """Llama architecture, Llama-3 BPE tokenizer, untied embeddings, llama3 rope scaling."""
    return fixtures.build_model("llama3")


@pytest.fixture(scope="session")
def llama2_dir() -> Path:
    """Llama architecture, SentencePiece tokenizer with tokenizer.model."""
    return fixtures.build_model("llama2")


@pytest.fixture(scope="session")
def qwen2_dir() -> Path:
    """Qwen2 architecture with q/k/v biases and tied embeddings."""
    return fixtures.build_model("qwen2")


@pytest.fixture(scope="session", params=fixtures.KINDS)
def any_model_dir(request: pytest.FixtureRequest) -> Path:
    """Each fixture model in turn."""
    return fixtures.build_model(request.param)


@pytest.fixture(scope="session", autouse=True)
def no_orphan_servers():
    """At the end of the session no server started by any test may still run."""
    yield
    from unsloth_nb import serve

    leaked = serve.running_servers()
    serve.stop_all()
    assert not leaked, f"servers left running: {leaked}"
