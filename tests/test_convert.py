"""The native GGUF writer against llama.cpp's own converter, transformers' GGUF loader and llama.cpp itself."""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from unsloth_nb import fixtures, manifest
from unsloth_nb.__main__ import main
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import bpe_pre, convert, layout, llamacpp, vocab

REFERENCE_TYPES = ("f16", "bf16", "q8_0")
"""Output types llama.cpp's converter writes itself (K-quants need llama-quantize)."""

NAMING_KEYS = {"general.name", "general.basename", "general.finetune", "general.version", "general.size_label"}
"""Keys the reference derives from the model folder's name; the only keys allowed to differ."""


def run_reference(model_dir: Path, outtype: str, outfile: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the pinned llama-cpp-python sdist, with its own gguf-py."""
    tree = llamacpp.source_tree()
    env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"))
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
           "--outfile", str(outfile)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return outfile


def metadata(reader: gguf.GGUFReader) -> dict[str, tuple]:
    """Every key/value of a file with its GGUF value types."""
    return {k: (tuple(f.types), f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module", params=fixtures.KINDS)
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(model folder, {type: native file}, {type: reference file}) for each fixture model."""
    model_dir = fixtures.build_model(request.param)
    out = tmp_path_factory.mktemp(f"convert-{request.param}")
    results = convert.convert(model_dir, list(REFERENCE_TYPES), out / "native", progress=False)
    native = {r.method: r.path for r in results}
    reference = {t: run_reference(model_dir, t, out / f"reference.{t}.gguf") for t in REFERENCE_TYPES}
    return model_dir, native, reference


@pytest.mark.parametrize("outtype", REFERENCE_TYPES)
def test_same_tensors_and_metadata_as_llamacpp(converted, outtype: str) -> None:
    _, native, reference = converted
    ours, theirs = gguf.GGUFReader(native[outtype]), gguf.GGUFReader(reference[outtype])
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.tensor_type, a.shape.tolist()) == (b.tensor_type, b.shape.tolist()), a.name
        assert a.data.tobytes() == b.data.tobytes(), f"{a.name}: bytes differ"
    ka, kb = metadata(ours), metadata(theirs)
    assert set(ka) - NAMING_KEYS == set(kb) - NAMING_KEYS
    differing = [k for k in ka if k not in NAMING_KEYS and ka[k] != kb[k]]
    assert differing == []


@pytest.mark.parametrize("outtype", REFERENCE_TYPES)
def test_whole_file_is_byte_identical_to_llamacpp(converted, outtype: str) -> None:
    """Same folder in, so even the naming keys, key order and padding agree."""
    _, native, reference = converted
    assert native[outtype].read_bytes() == reference[outtype].read_bytes()


def test_tokenizer_keys_match_family(converted) -> None:
    """The three tokenizer kinds are really exercised: SentencePiece and two byte-level BPEs with a known pre."""
    model_dir, native, _ = converted
    kv = metadata(gguf.GGUFReader(native["bf16"]))
    model = kv["tokenizer.ggml.model"][1]
    if (model_dir / "tokenizer.model").is_file():
        assert model == "llama" and "tokenizer.ggml.scores" in kv
    else:
        assert model == "gpt2" and "tokenizer.ggml.merges" in kv
        assert kv["tokenizer.ggml.pre"][1] in bpe_pre.PRE_BY_HASH.values()


def test_llama3_writes_rope_freqs_and_permutes_qk(llama3_dir: Path, tmp_path: Path) -> None:
    """rope_freqs holds the llama3 factors and attn_q rows are HF's rows interleaved per head."""
    from safetensors import safe_open

    path = convert.convert(llama3_dir, ["f32"], tmp_path, progress=False)[0].path
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    config = json.loads((llama3_dir / "config.json").read_text())
    head_dim = config["head_dim"]
    assert tensors["rope_freqs.weight"].data.shape == (head_dim // 2,)
    assert tensors["rope_freqs.weight"].data.max() == config["rope_scaling"]["factor"]
    with safe_open(llama3_dir / "model.safetensors", framework="pt") as f:
        hf_q = f.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
    ours = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data))
    head = hf_q[:head_dim]
    assert torch.equal(ours[0], head[0]) and torch.equal(ours[1], head[head_dim // 2])
    assert torch.equal(ours[2], head[1])


@pytest.mark.parametrize("method", ["f32", "bf16", "q8_0", "q4_k_m"])
def test_layout_predicts_exact_file(llama2_dir: Path, tmp_path: Path, method: str) -> None:
    planned = convert.file_layout(llama2_dir, method)
    written = convert.convert(llama2_dir, [method], tmp_path, progress=False)[0]
    assert written.path.name == planned.file_name
    assert written.size == planned.size == written.path.stat().st_size
    reader = gguf.GGUFReader(written.path)
    assert [(t.name, t.tensor_type, int(t.data_offset)) for t in reader.tensors] == [
        (t.name, t.qtype, t.offset) for t in planned.tensors]


def test_layout_of_tied_model_has_no_output_tensor(qwen2_dir: Path) -> None:
    planned = convert.file_layout(qwen2_dir, "q8_0")
    names = [t.name for t in planned.tensors]
    assert "token_embd.weight" in names and "output.weight" not in names
    assert "blk.0.attn_q.bias" in names


def _hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def test_transformers_gguf_loader_gives_hf_logits(llama2_dir: Path, tmp_path: Path) -> None:
    """The mapping vLLM's GGUF loader uses: bf16 equal to the HF model (same float32 maths), f16 within 1e-4
    absolute (bf16 weights are exact in f16 except below f16's normal range), q8_0 within 5% of the largest
    logit. On llama2: transformers converts a 128k-token BPE vocabulary for minutes."""
    from transformers import AutoModelForCausalLM

    results = convert.convert(llama2_dir, list(REFERENCE_TYPES), tmp_path, progress=False)
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278]])
    expected = _hf_logits(llama2_dir, ids)
    tolerance = {"bf16": 0.0, "f16": 1e-4, "q8_0": 0.05 * float(expected.abs().max())}
    for r in results:
        model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=r.path.name, dtype=torch.float32)
        with torch.no_grad():
            got = model(ids).logits
        assert float((got - expected).abs().max()) <= tolerance[r.method], r.method


def test_llamacpp_loads_and_generates(converted) -> None:
    import llama_cpp

    _, native, _ = converted
    for path in native.values():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False)
        out = llm.create_completion("Hello", max_tokens=4, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1
        del llm


def test_cli_prints_one_line_per_file(llama2_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["gguf", str(llama2_dir), "--quant", "q8_0,BF16", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, label in zip(lines, ("Q8_0", "BF16"), strict=True):
        path = Path(line.split()[0])
        assert path == tmp_path / f"{llama2_dir.name}.{label}.gguf" and path.is_file()
        assert re.search(r"\d+(\.\d)? [KMG]?B\s+\d+\.\d s$", line)
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != manifest.MANIFEST)
    assert written == sorted(Path(line.split()[0]).name for line in lines)


def test_llamacpp_backend_writes_the_same_file(llama2_dir: Path, tmp_path: Path) -> None:
    ours = convert.convert(llama2_dir, ["q8_0"], tmp_path / "native", progress=False)[0]
    theirs = convert.convert_with_llamacpp(llama2_dir, ["q8_0"], tmp_path / "llamacpp")[0]
    assert theirs.path.name == ours.path.name
    assert theirs.path.read_bytes() == ours.path.read_bytes()
    assert theirs.tensors == ours.tensors == len(gguf.GGUFReader(ours.path).tensors)


def test_bpe_hash_table_is_the_references(tmp_path: Path) -> None:
    """The data table holds exactly the reference converter's hash -> name facts (later entries win)."""
    source = (llamacpp.source_tree() / "conversion" / "base.py").read_text()
    body = source[source.index("def get_vocab_base_pre"):source.index("Marker: End get_vocab_base_pre")]
    pairs = re.findall(r'if chkhsh == "([0-9a-f]{64})":\s*\n(?:\s*#[^\n]*\n)*\s*res = "([^"]+)"', body)
    assert len(pairs) == body.count("if chkhsh ==")
    assert bpe_pre.PRE_BY_HASH == dict(pairs)
    assert bpe_pre.CHECK_TEXT == ast.literal_eval(re.search(r"chktxt = ('.*')\n", body).group(1))


def test_unknown_bpe_pretokenizer_is_default_with_warning(caplog) -> None:
    """A BPE tokenizer llama.cpp has never seen (here: Qwen2's with one extra token) gets "default", loudly."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixtures.build_tokenizer("qwen2"))
    assert vocab.pre_tokenizer_name(tokenizer.encode(bpe_pre.CHECK_TEXT)) == "qwen2"
    assert tokenizer.add_tokens(["我想在apple工作"]) == 1
    with caplog.at_level(logging.WARNING, logger="unsloth_nb.gguf.vocab"):
        assert vocab.pre_tokenizer_name(tokenizer.encode(bpe_pre.CHECK_TEXT)) == "default"
    assert "not one llama.cpp knows" in caplog.text


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_fast_bpe_reads_what_autotokenizer_reads(kind: str, tmp_path: Path) -> None:
    """The tokenizers-library shortcut gives AutoTokenizer's vocabulary, added-token flags, pre-tokenizer and
    decoded added tokens, and steps aside (None) for a tokenizer whose check-text hash llama.cpp does not know."""
    from transformers import AutoTokenizer

    folder = fixtures.build_tokenizer(kind)
    fast, slow = vocab._FastBpe.load(folder), vocab._HfBpe(folder)
    assert fast is not None
    assert fast.vocab == slow.vocab and fast.added == slow.added
    assert fast.pre == vocab.pre_tokenizer_name(slow.ids(bpe_pre.CHECK_TEXT)) == fixtures.FAMILIES[kind].vocab
    texts = [fast.tokenizer.id_to_token(i) for i in fast.added] + ["Hello world", " 3.3 ...!"]
    assert [fast.round_trip(t) for t in texts] == [slow.round_trip(t) for t in texts]

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["我想在apple工作"])
    tokenizer.save_pretrained(tmp_path)
    assert vocab._FastBpe.load(tmp_path) is None


@pytest.mark.parametrize("kind", fixtures.KINDS)
def test_special_vocab_reads_what_gguf_py_reads(kind: str) -> None:
    """Special tokens, add_* flags, chat template and merges are gguf-py's SpecialVocab's answers, although
    it now sees tokenizer.json without its large "model" section and the merges come from our own parse."""
    folder = fixtures.build_tokenizer(kind)
    ours = vocab._special_vocab(folder, load_merges=True).special
    theirs = gguf.SpecialVocab(folder, load_merges=True)
    assert ours.special_token_ids == theirs.special_token_ids and ours.chat_template == theirs.chat_template
    assert ours.merges == theirs.merges
    assert {k: v for k, v in ours.add_special_token.items() if k not in ("bos", "eos")} == {
        k: v for k, v in theirs.add_special_token.items() if k not in ("bos", "eos")}


def test_merges_with_spaces_are_written_as_gguf_py_writes_them(tmp_path: Path) -> None:
    """The [a, b] pair format (spaces allowed inside a part) becomes gguf-py's "a b" with U+0120 for spaces."""
    pairs = [["a", "b"], [" x", "y "], ["\u0120q", "r s t"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "merges": pairs}}))
    assert vocab._merges(vocab.read_json(tmp_path / "tokenizer.json")) == gguf.SpecialVocab(
        tmp_path, load_merges=True).merges


@pytest.mark.parametrize("seed", range(4))
def test_writer_packs_arrays_as_gguf_py_does(seed: int) -> None:
    """Writer's one-pass packing of long arrays gives gguf-py's bytes, and leaves to gguf-py (and its errors)
    what numpy would convert differently: mixed types, out-of-range integers, ints for bools or floats."""
    rng = np.random.default_rng(seed)
    V = gguf.GGUFValueType
    words = ["", " ", "\u0120x", "日本語", "<|eot_id|>", "a b", "\x00"] + [chr(int(c)) * int(n) for c, n in
                                                                    rng.integers([32, 1], [0x2FFF, 9], (300, 2))]
    floats = [float(f) for f in rng.standard_normal(500) * 10.0 ** rng.integers(-45, 38, 500)]
    floats += [float("inf"), float("nan"), -0.0, 1e-45, 3.4028235e38, 3.40282356e38]
    cases = [(words, None), ([w.encode() for w in words], None), (words, V.STRING),
             ([int(i) for i in rng.integers(-2**31, 2**31, 400)], None),
             ([int(i) for i in rng.integers(0, 2**32, 400)], V.UINT32),
             ([int(i) for i in rng.integers(0, 6, 400)], V.INT32),
             (floats, None), (floats + [1e300], V.FLOAT64),
             ([bool(b) for b in rng.integers(0, 2, 300)], None), ([int(b) for b in rng.integers(0, 3, 300)], V.BOOL)]
    theirs = gguf.GGUFWriter(None, "llama")
    for values, sub in cases:
        assert layout.pack_value(values, V.ARRAY, sub) == theirs._pack_val(values, V.ARRAY, True, sub)
    for values, sub in [([2**40] * 300, V.INT32), ([-1] * 300, V.UINT8), ([1.0] * 300, V.INT32),
                        (floats + [3.5e38], None), ([1.5] * 200 + [2] * 100, None)]:
        with pytest.raises(Exception) as expected:
            theirs._pack_val(values, V.ARRAY, True, sub)
        with pytest.raises(expected.type):
            layout.pack_value(values, V.ARRAY, sub)


def test_validation_reads_back_header_size_and_tensor_infos(llama2_dir: Path, tmp_path: Path) -> None:
    """The read-back check fails on a changed header byte, a wrong size or a tensor info that disagrees
    with the layout, and passes on the file as written."""
    import dataclasses

    path = convert.convert(llama2_dir, ["q8_0"], tmp_path, progress=False)[0].path
    model = convert._Model(llama2_dir, None, "cpu")
    plan = convert._prepare(model, [convert.resolve_method("q8_0")])[0]
    (head,) = layout.serialize(plan.writer)
    planned = convert.file_layout(llama2_dir, "q8_0")
    layout.validate(path, planned, 0, head)
    bad = bytearray(head)
    bad[len(head) // 2] ^= 1
    with pytest.raises(RuntimeError, match="header is not the one serialized"):
        layout.validate(path, planned, 0, bytes(bad))
    moved = (dataclasses.replace(planned.tensors[0], offset=planned.tensors[0].offset + 32),) + planned.tensors[1:]
    with pytest.raises(RuntimeError, match=f"tensor {planned.tensors[0].name}"):
        layout.validate(path, dataclasses.replace(planned, tensors=moved), 0, head)
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(RuntimeError, match="size"):
        layout.validate(path, planned, 0, head)


@pytest.mark.parametrize("kind", fixtures.KINDS)
def test_header_serialisation_is_gguf_pys(kind: str) -> None:
    """Our serialisation of a writer's key/values and tensor infos is byte for byte what gguf-py's own writer
    writes for it (its public file API as the oracle), for every fixture's full metadata."""
    from gguf_oracle import gguf_py_head

    model = convert._Model(fixtures.build_model(kind), None, "cpu")
    plan = convert._prepare(model, [convert.resolve_method("q4_k_m")])[0]
    (head,) = layout.serialize(plan.writer)
    assert head == gguf_py_head(plan.writer)


def test_vocabulary_is_built_once_per_tokenizer(llama3_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The tokenizer keys are built once per tokenizer in a process: a second export, the picker's exact sizes
    and a copy of the folder (what a merge writes) reuse them; a changed tokenizer file builds them again. The
    headers are the same bytes either way, and two threads asking at once build them once."""
    import threading

    model = tmp_path / "model"
    shutil.copytree(llama3_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }} (a template only this test uses)"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    builds = []
    real = vocab._write_tokenizer

    def counted(*args, **kwargs):
        builds.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(vocab, "_write_tokenizer", counted)
    first = convert.convert(model, ["q8_0"], tmp_path / "a", progress=False)[0].path
    layout_size = convert.file_layout(model, "q8_0").metadata_size
    copy = tmp_path / "copy" / "model"
    shutil.copytree(model, copy)
    again = convert.convert(copy, ["q8_0"], tmp_path / "b", progress=False)[0].path
    assert builds == [model]
    assert first.read_bytes() == again.read_bytes()
    assert layout_size == convert.file_layout(copy, "q8_0").metadata_size

    config["chat_template"] += "!"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    changed = convert.convert(copy, ["q8_0"], tmp_path / "c", progress=False)[0].path
    assert builds == [model, copy]
    assert gguf.GGUFReader(changed).fields["tokenizer.chat_template"].contents().endswith("!")

    config["chat_template"] += "?"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    hparams = json.loads((copy / "config.json").read_text())
    threads = [threading.Thread(target=vocab.tokenizer_keys, args=(copy, hparams, ("gpt2",), False))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == [model, copy, copy]


def test_serialized_tuples_are_reused_only_for_the_same_tuple() -> None:
    """A long tuple is packed once and its bytes reused while the same object comes back; an equal list and
    another tuple are packed on their own, and all of them as gguf-py packs them."""
    from gguf_oracle import gguf_py_head

    tokens = tuple(f"token{i}" for i in range(1000))
    heads = []
    for value in (tokens, tokens, list(tokens), tuple(t + "x" for t in tokens)):
        writer = gguf.GGUFWriter(None, "llama")
        writer.add_token_list(value)
        heads.append(layout.serialize(writer)[0])
        assert heads[-1] == gguf_py_head(writer)
    assert heads[0] == heads[1] == heads[2] != heads[3]


def test_chunks_run_ahead_within_their_byte_budget(llama3_dir: Path) -> None:
    """With a lookahead budget (a GPU's, set here on the CPU) more chunks are queued at once, never more encoded
    bytes than the budget beyond IN_FLIGHT chunks, and the writer gets exactly the chunks it gets without one."""
    model = convert._Model(llama3_dir, None, "cpu")
    plans = convert._prepare(model, [convert.resolve_method(m) for m in ("q8_0", "q4_k_m")])

    def drain(ahead: int) -> tuple[list, int, int]:
        chunks = convert._Chunks(model, plans, "cpu", ahead=ahead)
        try:
            queued, held = len(chunks.pending), chunks.pending_bytes
            got = [(i, n, [a.tobytes() for a in parts]) for i, n, parts in chunks]
            assert chunks.pending_bytes == 0
            return got, queued, held
        finally:
            chunks.close()

    plain, queued_plain, _ = drain(0)
    budget = 64 << 20
    ahead, queued_ahead, held = drain(budget)
    assert queued_plain == layout.IN_FLIGHT
    assert queued_ahead > queued_plain and held <= budget
    assert ahead == plain
    total = sum(len(b) for _, _, parts in plain for b in parts)
    assert total == sum(layout.nbytes(t.shape, p.types[i]) for p in plans for i, t in enumerate(model.tensors))


def _copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _cli_error(args: list[str], capsys) -> str:
    assert main(args) == 1
    return capsys.readouterr().err


def test_error_missing_folder(tmp_path: Path, capsys) -> None:
    err = _cli_error(["gguf", str(tmp_path / "nope"), "--quant", "q8_0", "--out", str(tmp_path / "o")], capsys)
    assert "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_error_no_config(llama2_dir: Path, tmp_path: Path, capsys) -> None:
    model = _copy_model(llama2_dir, tmp_path / "m")
    (model / "config.json").unlink()
    err = _cli_error(["gguf", str(model), "--quant", "q8_0", "--out", str(tmp_path / "o")], capsys)
    assert "no config.json" in err


def test_error_unsupported_architecture(llama2_dir: Path, tmp_path: Path, capsys) -> None:
    model = _copy_model(llama2_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["FalconForCausalLM"], model_type="falcon")
    (model / "config.json").write_text(json.dumps(config))
    err = _cli_error(["gguf", str(model), "--quant", "q8_0", "--out", str(tmp_path / "o")], capsys)
    assert "FalconForCausalLM" in err and "--backend llama.cpp" in err
    supported = ("Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, LLaMAForCausalLM, "
                 "LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM")
    assert f"It writes: {supported}." in err


def test_error_corrupt_safetensors(llama2_dir: Path, tmp_path: Path, capsys) -> None:
    model = _copy_model(llama2_dir, tmp_path / "m")
    weights = model / "model.safetensors"
    before = sorted(p.name for p in model.iterdir())
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    out = tmp_path / "o"
    err = _cli_error(["gguf", str(model), "--quant", "q8_0,bf16", "--out", str(out)], capsys)
    assert "model.safetensors" in err and "corrupt" in err
    assert not out.exists() or list(out.iterdir()) == []
    assert sorted(p.name for p in model.iterdir()) == before


def test_error_unknown_method_suggests(llama2_dir: Path, tmp_path: Path, capsys) -> None:
    err = _cli_error(["gguf", str(llama2_dir), "--quant", "q4_k_n", "--out", str(tmp_path / "o")], capsys)
    assert "q4_k_n" in err and "q4_k_m" in err


def test_error_output_not_writable(llama2_dir: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("user data")
    err = _cli_error(["gguf", str(llama2_dir), "--quant", "q8_0", "--out", str(blocker / "sub")], capsys)
    assert "output folder" in err
    assert blocker.read_text() == "user data"


def test_failed_write_leaves_no_partial_file(llama2_dir: Path, tmp_path: Path) -> None:
    """A NaN found while writing (the quantizer refuses it) stops the run and removes the temporary files."""
    from safetensors.torch import load_file, save_file

    model = _copy_model(llama2_dir, tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    last = sorted(weights)[-1]
    weights[last] = weights[last].clone()
    weights[last].view(-1)[0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(UserError, match="NaN"):
        convert.convert(model, ["q8_0", "bf16"], out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _build_extra_model(kind: str, dest: Path) -> Path:
    """A tiny random model of an architecture the fixtures do not cover, with a fixture's real tokenizer.

    Gemma 2/3 and Phi-3 get random norm weights (so Gemma's +1 and its rounding show). Gemma has head_dim =
    query_pre_attn_scalar = 256 as the real 2B-12B models (no GGUF key holds the scalar: llama.cpp and
    transformers' GGUF loader assume this); with 2 layers Gemma 3's layers are all sliding-window ones, as
    llama.cpp's fixed pattern of 6 has it. Phi-3 has longrope factors and Phi-3's added tokens. "gemma3_f16"
    is Gemma 3 stored in float16 (the norm +1 then rounds in f16, as the reference does).
    """
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        Gemma3TextConfig,
        MistralConfig,
        Phi3Config,
        Qwen3Config,
    )

    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)
    tokenizer, dtype = "llama2", torch.bfloat16
    if kind == "mistral":
        config = MistralConfig(vocab_size=32000, tie_word_embeddings=False, **common)
    elif kind == "qwen3":
        tokenizer, config = "qwen2", Qwen3Config(vocab_size=151936, tie_word_embeddings=True, **common)
    elif kind == "gemma2":
        common["head_dim"] = 256
        config = Gemma2Config(vocab_size=32000, sliding_window=512, **common)
    elif kind.startswith("gemma3"):
        rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
        common["head_dim"] = 256
        config = Gemma3TextConfig(vocab_size=32000, sliding_window=512, rope_parameters=rope, **common)
        dtype = torch.float16 if kind == "gemma3_f16" else dtype
    elif kind == "phi3":
        common.pop("head_dim")
        common["max_position_embeddings"] = 8192
        rope = {"rope_type": "longrope", "long_factor": [1.0 + i / 4 for i in range(32)],
                "short_factor": [1.0 + i / 8 for i in range(32)]}
        config = Phi3Config(vocab_size=32064, original_max_position_embeddings=2048, rope_scaling=rope, **common)
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if kind not in ("mistral", "qwen3"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0, 0.5)
    model.save_pretrained(dest)
    for f in fixtures.build_tokenizer(tokenizer).iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, dest / f.name)
    if kind == "phi3":
        _add_tokens(dest, {"<|endoftext|>": True, "<|assistant|>": True, "<|placeholder1|>": False, "<|end|>": True},
                    first=32000)
    return dest


def _add_tokens(dest: Path, tokens: dict[str, bool], first: int) -> None:
    """Added tokens (text -> special) as Phi-3 ships them: in tokenizer.json, tokenizer_config.json's
    added_tokens_decoder and added_tokens.json. llama.cpp needs <|endoftext|> in a model named phi3."""
    tokenizer = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((dest / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tokenizer["added_tokens"]}
    for i, (text, special) in enumerate(tokens.items(), first):
        entry = dict(content=text, single_word=False, lstrip=False, rstrip=special, normalized=False,
                     special=special)
        tokenizer["added_tokens"].append({"id": i, **entry})
        decoder[str(i)] = entry
    config["added_tokens_decoder"] = decoder
    (dest / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (dest / "added_tokens.json").write_text(json.dumps({t: i for i, t in enumerate(tokens, first)}))


@pytest.mark.parametrize("kind", ["mistral", "qwen3"])
def test_more_architectures_match_llamacpp(kind: str, tmp_path: Path) -> None:
    """Mistral (Llama rules, SentencePiece) and Qwen3 (q/k norms, tied): files identical to the reference's."""
    model_dir = _build_extra_model(kind, tmp_path / kind)
    for r in convert.convert(model_dir, ["bf16", "q8_0"], tmp_path / "native", progress=False):
        reference = run_reference(model_dir, r.method, tmp_path / f"reference.{r.method}.gguf")
        assert r.path.read_bytes() == reference.read_bytes(), r.method
    names = [t.name for t in gguf.GGUFReader(r.path).tensors]
    assert kind != "qwen3" or "blk.0.attn_q_norm.weight" in names


def test_split_output_matches_llamacpp_shards(llama2_dir: Path, tmp_path: Path) -> None:
    """--split-max-size: same shard names, split keys and bytes as the reference converter's own split."""
    split = 8_000_000
    planned = convert.file_layout(llama2_dir, "q8_0", split_max_size=split)
    result = convert.convert(llama2_dir, ["q8_0"], tmp_path / "native", split_max_size=split, progress=False)[0]
    assert len(result.shards) == len(planned.shards) > 1
    assert [(p.name, p.stat().st_size) for p in result.shards] == list(planned.shards)
    tree = llamacpp.source_tree()
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(llama2_dir), "--outtype", "q8_0",
           "--outfile", str(ref_dir / f"{llama2_dir.name}.Q8_0.gguf"),
           "--split-max-size", str(split)]
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(tree / "gguf-py")), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in ref_dir.iterdir()) == [p.name for p in result.shards]
    for shard in result.shards:
        assert shard.read_bytes() == (ref_dir / shard.name).read_bytes(), shard.name


def test_fused_adapter_equals_merge_then_convert(llama2_dir: Path, tmp_path: Path) -> None:
    """--adapter: converting base + LoRA directly gives the tensors and metadata of merging first."""
    from lora_helpers import make_adapter

    from unsloth_nb.merge import merge

    adapter = make_adapter(llama2_dir, tmp_path / "adapter")
    merged = tmp_path / "merged"
    merge(llama2_dir, adapter, merged)
    fused = convert.convert(llama2_dir, ["bf16", "q8_0"], tmp_path / "fused", adapter=adapter, progress=False)
    plain = convert.convert(merged, ["bf16", "q8_0"], tmp_path / "plain", progress=False)
    base = gguf.GGUFReader(convert.convert(llama2_dir, ["bf16"], tmp_path / "base", progress=False)[0].path)
    for a, b in zip(fused, plain, strict=True):
        ours, theirs = gguf.GGUFReader(a.path), gguf.GGUFReader(b.path)
        assert [(t.name, t.tensor_type, t.data.tobytes()) for t in ours.tensors] == [
            (t.name, t.tensor_type, t.data.tobytes()) for t in theirs.tensors]
        ka, kb = metadata(ours), metadata(theirs)
        assert {k: v for k, v in ka.items() if k not in NAMING_KEYS} == {
            k: v for k, v in kb.items() if k not in NAMING_KEYS}
    changed = {t.name: t.data.tobytes() for t in gguf.GGUFReader(fused[0].path).tensors}
    assert changed["blk.0.attn_q.weight"] != {t.name: t.data.tobytes() for t in base.tensors}["blk.0.attn_q.weight"]


def test_refused_before_writing_when_the_disk_is_too_small(llama2_dir: Path, tmpfs) -> None:
    """A real 20 MB filesystem cannot hold a ~70 MB BF16 file: refused up front, the folder stays empty."""
    disk = tmpfs(20 * 2**20)
    (disk / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="short"):
        convert.convert(llama2_dir, ["bf16"], disk, progress=False)
    assert sorted(p.name for p in disk.iterdir()) == ["mine.txt"]


def test_refused_before_writing_when_ram_cannot_hold_the_pass(llama2_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The planner's RAM check runs before any byte is written (a Colab with 300 MB available, faked)."""
    from unsloth_nb import runtime
    from unsloth_nb.runtime import Runtime

    monkeypatch.setattr(runtime, "detect", lambda: Runtime("colab", 2**30, 300 * 2**20, 2))
    with pytest.raises(UserError, match="RAM at its peak") as info:
        convert.convert(llama2_dir, ["q8_0"], tmp_path / "out", progress=False)
    assert "Fix:" in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder the call would have made


NEW_ARCHITECTURES = ("gemma2", "gemma3", "phi3")
FLOAT_AND_Q8 = ("f32", *REFERENCE_TYPES)
IDS = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278]


@pytest.fixture(scope="module", params=NEW_ARCHITECTURES)
def new_arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(kind, model folder, {method: native file}, {type: reference file}) for Gemma 2, Gemma 3 and Phi-3."""
    tmp = tmp_path_factory.mktemp(request.param)
    model_dir = _build_extra_model(request.param, tmp / request.param)
    results = convert.convert(model_dir, [*FLOAT_AND_Q8, "q4_k_m"], tmp / "native", progress=False)
    native = {r.method: r.path for r in results}
    reference = {t: run_reference(model_dir, t, tmp / f"reference.{t}.gguf") for t in FLOAT_AND_Q8}
    return request.param, model_dir, native, reference


def test_new_architectures_are_byte_identical_to_llamacpp(new_arch) -> None:
    """Gemma 2 (norm +1, soft-capping, lm_head dropped), Gemma 3 (q/k norms, linear rope, swa base) and Phi-3
    (fused qkv and gate_up, longrope factors, its own vocabulary reader): f32, f16, bf16, q8_0 files equal."""
    kind, _, native, reference = new_arch
    for outtype in FLOAT_AND_Q8:
        assert native[outtype].read_bytes() == reference[outtype].read_bytes(), outtype
    reader = gguf.GGUFReader(native["bf16"])
    names = {t.name for t in reader.tensors}
    expected = {"gemma2": {"blk.0.post_ffw_norm.weight"}, "gemma3": {"blk.0.attn_q_norm.weight"},
                "phi3": {"blk.0.attn_qkv.weight", "rope_factors_long.weight", "rope_factors_short.weight"}}
    assert expected[kind] <= names
    assert ("output.weight" in names) == (kind == "phi3")


def test_gemma_norm_shift_rounds_in_float16_like_the_reference(tmp_path: Path) -> None:
    """For an f16 checkpoint the reference adds 1 in f16 (bf16 and f32 are added in float32): same bytes."""
    from safetensors import safe_open

    model_dir = _build_extra_model("gemma3_f16", tmp_path / "gemma3_f16")
    (ours,) = convert.convert(model_dir, ["f32"], tmp_path / "native", progress=False)
    assert ours.path.read_bytes() == run_reference(model_dir, "f32", tmp_path / "reference.gguf").read_bytes()
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        hf = f.get_tensor("model.layers.0.input_layernorm.weight")
    written = {t.name: t for t in gguf.GGUFReader(ours.path).tensors}["blk.0.attn_norm.weight"].data
    assert hf.dtype == torch.float16 and np.array_equal(written, (hf + 1).float().numpy())
    assert not np.array_equal(written, (hf.float() + 1).numpy())


def test_new_architectures_run_in_llamacpp(new_arch) -> None:
    """Every file generates; the f32 file's logits are the HF model's within 0.1% of the largest logit
    (f32 KV cache; what is left is ggml's f16 GELU table for Gemma). For Phi-3 this checks the longrope
    factors: without them the logits move about 15 times further."""
    import llama_cpp

    kind, model_dir, native, _ = new_arch
    expected = _hf_logits(model_dir, torch.tensor([IDS]))[0].numpy()
    for method, path in native.items():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True,
                              type_k=0, type_v=0)
        out = llm.create_completion("Hello", max_tokens=4, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1, method
        if method == "f32":
            llm.reset()
            llm.eval(IDS)
            got = np.array(llm.scores[:len(IDS)])
            assert float(np.abs(got - expected).max()) <= 1e-3 * float(np.abs(expected).max()), kind
        del llm


def test_new_architectures_in_transformers_gguf_loader(new_arch) -> None:
    """transformers' GGUF loader on the bf16 file: the same logits as the HF model, exactly. The loader keeps
    no rope scaling: Gemma 3's linear factor is dropped (harmless here: only full-attention layers use it),
    and so are Phi-3's longrope factors, so for Phi-3 the HF side runs with the rope settings the loader
    reads back (llama.cpp's logits above check the factors); everything else is compared."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, model_dir, native, _ = new_arch
    path = native["bf16"]
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(model_dir)
    if kind == "phi3":
        rope = loaded.config.rope_parameters
        assert rope["rope_type"] == "default" and rope["rope_theta"] == config.rope_parameters["rope_theta"]
        config.rope_parameters = rope
    hf = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hf(ids).logits), kind


def test_new_architectures_q4_k_m_types_match_llama_quantize(new_arch, tmp_path: Path) -> None:
    """llama_model_quantize on the reference's BF16 file picks, per tensor, the types our Q4_K_M file has."""
    from test_recipes import _compare_types, _llama_quantize, _model_shape

    _, _, native, reference = new_arch
    method = convert.resolve_method("q4_k_m")
    theirs = tmp_path / "theirs.Q4_K_M.gguf"
    _llama_quantize(reference["bf16"], theirs, method)
    tensors = _compare_types(theirs, method, _model_shape(gguf.GGUFReader(str(reference["bf16"]))))
    ours = gguf.GGUFReader(native["q4_k_m"]).tensors  # llama.cpp writes them in its own order
    assert {t.name: int(t.tensor_type) for t in ours} == {t.name: int(t.tensor_type) for t in tensors}


def test_gemma3_multimodal_checkpoint_gives_its_text_model(tmp_path: Path) -> None:
    """Gemma3ForConditionalGeneration: the vision tower and projector are left out (3 vision layers do not
    upset the layer count), as the reference does; bf16 and q8_0 files equal its files and run in llama.cpp."""
    import llama_cpp
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=256, sliding_window=512)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=32, patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=31999,
                          boi_token_index=31998, eoi_token_index=31997)
    torch.manual_seed(0)
    model_dir = tmp_path / "gemma3_vlm"
    Gemma3ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(model_dir)
    for f in fixtures.build_tokenizer("llama2").iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, model_dir / f.name)
    for r in convert.convert(model_dir, ["bf16", "q8_0"], tmp_path / "native", progress=False):
        assert r.path.read_bytes() == run_reference(model_dir, r.method, tmp_path / f"ref.{r.method}.gguf").read_bytes()
        reader = gguf.GGUFReader(r.path)
        assert reader.fields["general.architecture"].contents() == "gemma3"
        assert len(reader.tensors) == 1 + 2 * 13 + 1  # token_embd, 13 per block, output_norm
        llm = llama_cpp.Llama(model_path=str(r.path), n_ctx=64, n_threads=2, verbose=False)
        assert llm.create_completion("Hello", max_tokens=4, temperature=0.0)["usage"]["completion_tokens"] >= 1
        del llm


def _special(token: str, token_id: int) -> dict:
    return {token: {"id": token, "ids": [token_id], "tokens": [token]}}


POST_PROCESSORS = {
    "byte-level only": ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
                        {"add_bos_token": True}),
    "template names the BOS": ({"type": "TemplateProcessing",
                                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                           {"Sequence": {"id": "A", "type_id": 0}}],
                                "pair": [], "special_tokens": _special("<s>", 1)}, {}),
    "template names the CLS": ({"type": "TemplateProcessing",
                                "single": [{"SpecialToken": {"id": "</s>", "type_id": 0}},
                                           {"Sequence": {"id": "A", "type_id": 0}}],
                                "pair": [], "special_tokens": _special("</s>", 2)},
                               {"bos_token": "<s>"}),
    "sequence with a trailing EOS": ({"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                                  {"SpecialToken": {"id": "</s>", "type_id": 0}}],
         "pair": [], "special_tokens": _special("</s>", 2)}]}, {"add_eos_token": False}),
}


@pytest.mark.parametrize("case", list(POST_PROCESSORS))
def test_tokenizer_keys_from_the_post_processor_match_llamacpp(case: str, llama2_dir: Path, tmp_path: Path) -> None:
    """A tokenizer whose add_bos/add_eos and special tokens come only from tokenizer.json's post-processor (no
    add_*_token in tokenizer_config.json, or one the post-processor overrides): the same tokenizer keys as
    llama.cpp's converter writes. On the SentencePiece fixture: a BPE tokenizer's pre-tokenizer hash changes with
    the special tokens a template adds, and the reference then refuses the tokenizer."""
    post, config_keys = POST_PROCESSORS[case]
    model = _copy_model(llama2_dir, tmp_path / "m")
    tokenizer = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["post_processor"] = post
    (model / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    config = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("add_bos_token", "add_eos_token", "bos_token", "cls_token"):
        config.pop(key, None)
    config.update(config_keys)
    (model / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = convert.convert(model, ["bf16"], tmp_path / "ours", progress=False)[0].path
    theirs = run_reference(model, "bf16", tmp_path / "reference.gguf")
    ka, kb = metadata(gguf.GGUFReader(ours)), metadata(gguf.GGUFReader(theirs))
    keys = sorted(k for k in set(ka) | set(kb) if k.startswith("tokenizer.") and "tokens" not in k
                  and "merges" not in k and "token_type" not in k)
    assert {k: ka.get(k) for k in keys} == {k: kb.get(k) for k in keys}
    assert any(k.startswith("tokenizer.ggml.add_") for k in keys)


def test_llama_with_a_49152_token_vocabulary_never_adds_bos(tmp_path: Path) -> None:
    """llama.cpp's converter writes add_bos_token = false for Llama models with exactly 49152 tokens (SmolLM,
    Granite), whatever the tokenizer says: the real SmolLM2 file is byte-identical to the reference's."""
    model = fixtures.build_real_model("smollm2")
    ours = convert.convert(model, ["bf16"], tmp_path / "ours", progress=False)[0].path
    theirs = run_reference(model, "bf16", tmp_path / "reference.gguf")
    assert metadata(gguf.GGUFReader(ours))["tokenizer.ggml.add_bos_token"][1] is False
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_cuda_export_is_byte_identical_to_the_cpu_export(tmp_path: Path, kind: str) -> None:
    """On a GPU, chunks go through page-locked buffers to the device and are permuted there, by several
    workers at once: every method's file is still the CPU's, byte for byte (q/k rows, norms, 16-bit copies)."""
    model_dir = fixtures.build_model(kind)
    methods = ["q4_k_m", "q8_0", "bf16"]
    gpu = convert.convert(model_dir, methods, tmp_path / "gpu", device="cuda", progress=False)
    cpu = convert.convert(model_dir, methods, tmp_path / "cpu", device="cpu", progress=False)
    for ours, theirs in zip(gpu, cpu, strict=True):
        assert ours.path.read_bytes() == theirs.path.read_bytes(), ours.path.name
