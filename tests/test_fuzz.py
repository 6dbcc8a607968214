"""Fuzzing the readers of users' files with hypothesis: every mutated safetensors header, GGUF header and
key/value section, tokenizer.json and config.json is read successfully or refused with a UserError; none
crashes, hangs or allocates what a header merely claims (the reads are bounded by the file's size)."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unsloth_nb import checkpoint, serve
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import header

EXAMPLES = 700
"""Inputs per reader (four readers: about 2,800 in all, about a minute on two cores)."""
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _safetensors_seed() -> bytes:
    header_ = {"__metadata__": {"format": "pt"},
               "a.weight": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 64]},
               "b.bias": {"dtype": "F32", "shape": [8], "data_offsets": [64, 96]}}
    text = json.dumps(header_).encode()
    return struct.pack("<Q", len(text)) + text + bytes(96)


def _gguf_seed() -> bytes:
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_block_count(2)
        writer.add_string("general.name", "seed")
        writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
        writer.add_tensor_info("t.weight", (4, 32), gguf.np.dtype("float32"), 4 * 32 * 4)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        head = path.read_bytes()
    return head + bytes(-len(head) % 32) + bytes(4 * 32 * 4)


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """The seed with bytes flipped, overwritten by large integers, cut short or extended."""
    flips = st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), max_size=8)
    words = st.lists(st.tuples(st.integers(0, max(0, len(seed) - 8)),
                               st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1])), max_size=3)

    @st.composite
    def build(draw) -> bytes:
        data = bytearray(seed)
        for at, value in draw(flips):
            data[at] = value
        for at, value in draw(words):
            data[at:at + 8] = struct.pack("<Q", value)
        cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
        if cut is not None:
            data = data[:cut]
        return bytes(data) + draw(st.binary(max_size=16))
    return build()


def _json_values() -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False),
                        st.text(max_size=12))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)


def _mutated_json(seed: dict) -> st.SearchStrategy[str]:
    """The seed with keys removed or given values of any JSON type, or its text cut or garbled."""
    @st.composite
    def build(draw) -> str:
        data = json.loads(json.dumps(seed))
        for key in draw(st.lists(st.sampled_from(sorted(data)), max_size=3)):
            if draw(st.booleans()):
                data.pop(key, None)
            else:
                data[key] = draw(_json_values())
        text = json.dumps(data)
        if draw(st.booleans()):
            cut = draw(st.integers(0, len(text)))
            text = text[:cut] + draw(st.text(max_size=4))
        return text
    return build()


def _attempt(read, path: Path, ledger) -> None:
    ledger["fuzzed inputs"] += 1
    try:
        read(path)
    except UserError as exc:
        assert str(exc) and "\n\n" not in str(exc)


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    return tmp_path


@FUZZ
@given(data=_mutations(_safetensors_seed()))
def test_safetensors_headers(data: bytes, scratch: Path, ledger) -> None:
    path = scratch / "model.safetensors"
    path.write_bytes(data)
    _attempt(lambda p: checkpoint.read_header(p, require_data=True), path, ledger)


@FUZZ
@given(data=_mutations(_gguf_seed()))
def test_gguf_headers_and_key_values(data: bytes, scratch: Path, ledger) -> None:
    path = scratch / "model.gguf"
    path.write_bytes(data)
    _attempt(header.require, path, ledger)
    _attempt(serve.gguf_scalars, path, ledger)


TOKENIZER = {"version": "1.0", "added_tokens": [{"id": 0, "content": "<s>", "special": True}],
             "normalizer": None, "pre_tokenizer": {"type": "ByteLevel"},
             "post_processor": {"type": "ByteLevel"}, "decoder": {"type": "ByteLevel"},
             "model": {"type": "BPE", "vocab": {"<s>": 0, "a": 1}, "merges": []}}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32, "intermediate_size": 128,
          "rope_theta": 10000.0, "torch_dtype": "bfloat16"}


@FUZZ
@given(text=_mutated_json(TOKENIZER), template=st.one_of(st.none(), st.text(max_size=40)))
def test_tokenizer_files(text: str, template: str | None, scratch: Path, ledger) -> None:
    (scratch / "tokenizer.json").write_text(text, encoding="utf-8")
    config = {"bos_token": "<s>"} if template is None else {"chat_template": template}
    (scratch / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    _attempt(checkpoint.check_tokenizer, scratch, ledger)


@FUZZ
@given(text=_mutated_json(CONFIG))
def test_config_json(text: str, scratch: Path, ledger) -> None:
    (scratch / "config.json").write_text(text, encoding="utf-8")
    _attempt(checkpoint.read_config, scratch, ledger)
