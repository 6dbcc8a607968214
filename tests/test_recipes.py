"""Recipes: method names, and per-tensor types checked against llama.cpp's own quantizer.

The parity tests write small Llama-architecture GGUFs in BF16 (shapes chosen so that every rule
matters: 16 layers for use_more_bits and n/16, GQA 4 and GQA 2, tied and untied embeddings, rows
that are not multiples of 256 or of 32), run llama.cpp's ``llama_model_quantize`` for every
method, and compare each tensor's type with ``tensor_type``. For the quantized types the bytes
are compared with ``quants.quantize`` too, and the identical-block share is printed per type.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from unsloth_nb.errors import UserError
from unsloth_nb.gguf import llamacpp, quants, recipes

# --- method table -------------------------------------------------------------------------------


def test_methods_in_display_order() -> None:
    assert list(recipes.METHODS) == ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "iq4_xs", "iq4_nl", "q4_k_s",
                                     "q4_k_m", "q5_0", "q5_1", "q5_k_s", "q5_k_m", "q6_k", "q8_0", "bf16", "f16",
                                     "f32"]
    for method in recipes.METHODS.values():
        assert method.description and method.label == method.name.upper()


def test_file_types_are_llama_cpp_ftypes() -> None:
    for method in recipes.METHODS.values():
        const = "LLAMA_FTYPE_ALL_F32" if method.name == "f32" else f"LLAMA_FTYPE_MOSTLY_{method.label}"
        assert getattr(llama_cpp, const) == method.file_type, method.name


def test_resolve_aliases_and_case() -> None:
    assert recipes.resolve("Q4_K") is recipes.METHODS["q4_k_m"]
    assert recipes.resolve("q5_k") is recipes.METHODS["q5_k_m"]
    assert recipes.resolve(" Q8_0 ") is recipes.METHODS["q8_0"]
    assert recipes.resolve("q4-k-m") is recipes.METHODS["q4_k_m"]


def test_resolve_unknown_suggests() -> None:
    with pytest.raises(UserError, match="q4_k_m"):
        recipes.resolve("q4km")
    with pytest.raises(UserError, match="valid methods"):
        recipes.resolve("int4")


def test_norms_and_vectors_stay_f32() -> None:
    model = recipes.ModelShape(n_layer=4, n_head=4, n_head_kv=4, has_output=True)
    for method in recipes.METHODS.values():
        assert recipes.tensor_type(method, "blk.0.attn_norm.weight", (256,), model) == T.F32
        assert recipes.tensor_type(method, "blk.0.attn_q.bias", (256,), model) == T.F32
        assert recipes.tensor_type(method, "rope_freqs.weight", (32,), model) == T.F32


# --- parity with llama.cpp ----------------------------------------------------------------------

SYNTHETIC = {
    # Untied, GQA 4, K-quant-friendly rows, 16 layers (n/8 = 2, n/16 = 1).
    "gqa4": dict(n_layer=16, hidden=256, n_head=4, n_head_kv=1, ff=256, vocab=256, tied=False),
    # Tied embeddings, GQA 2, rows of 288 (multiple of 32, not 256) and ffn_down rows of 80 (not of 32).
    "odd": dict(n_layer=9, hidden=288, n_head=2, n_head_kv=1, ff=80, vocab=320, tied=True),
}


def _synthetic_tensors(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """GGUF-named float32 tensors (torch order) of a Llama model with the given sizes."""
    rng = np.random.default_rng(seed)
    h, ff = cfg["hidden"], cfg["ff"]
    kv = h // cfg["n_head"] * cfg["n_head_kv"]

    def mat(rows: int, cols: int) -> np.ndarray:
        scale = rng.uniform(0.01, 0.05)
        m = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(scale)
        m[rng.random(m.shape) < 2e-3] *= 20  # outliers, as real weights have
        return m

    tensors = {"token_embd.weight": mat(cfg["vocab"], h), "output_norm.weight": np.ones(h, np.float32)}
    if not cfg["tied"]:
        tensors["output.weight"] = mat(cfg["vocab"], h)
    for i in range(cfg["n_layer"]):
        tensors.update({
            f"blk.{i}.attn_norm.weight": np.ones(h, np.float32),
            f"blk.{i}.attn_q.weight": mat(h, h),
            f"blk.{i}.attn_k.weight": mat(kv, h),
            f"blk.{i}.attn_v.weight": mat(kv, h),
            f"blk.{i}.attn_output.weight": mat(h, h),
            f"blk.{i}.ffn_norm.weight": np.ones(h, np.float32),
            f"blk.{i}.ffn_gate.weight": mat(ff, h),
            f"blk.{i}.ffn_up.weight": mat(ff, h),
            f"blk.{i}.ffn_down.weight": mat(h, ff),
        })
    return tensors


def _write_bf16_gguf(path: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> None:
    """A minimal Llama GGUF in BF16 (1-D tensors F32), enough for llama_model_quantize."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg["n_layer"])
    writer.add_context_length(256)
    writer.add_embedding_length(cfg["hidden"])
    writer.add_feed_forward_length(cfg["ff"])
    writer.add_head_count(cfg["n_head"])
    writer.add_head_count_kv(cfg["n_head_kv"])
    writer.add_rope_dimension_count(cfg["hidden"] // cfg["n_head"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(cfg["vocab"])
    writer.add_file_type(recipes.METHODS["bf16"].file_type)
    for name, arr in tensors.items():
        if arr.ndim == 1:
            writer.add_tensor(name, arr)
        else:
            writer.add_tensor(name, gguf.quants.quantize(arr, T.BF16), raw_dtype=T.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_quantize(src: Path, dst: Path, method: recipes.Method) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = method.file_type
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert rc == 0, f"llama_model_quantize failed for {method.name}"


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bf16 values (uint16, or gguf-py's uint8 byte layout) -> float32."""
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _compare_types(path: Path, method: recipes.Method, model: recipes.ModelShape) -> list:
    """Tensors of a llama.cpp-quantized file, asserting each type equals tensor_type's choice."""
    tensors = gguf.GGUFReader(str(path)).tensors
    for t in tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        expected = recipes.tensor_type(method, t.name, shape, model)
        assert T(t.tensor_type) == expected, (method.name, t.name, shape, T(t.tensor_type).name, expected.name)
    return tensors


@pytest.fixture(scope="module")
def synthetic_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict, dict]]:
    """name -> (bf16 gguf path, config, float32 tensors as stored in bf16)."""
    out = {}
    for seed, (name, cfg) in enumerate(SYNTHETIC.items()):
        tensors = _synthetic_tensors(cfg, seed)
        path = tmp_path_factory.mktemp("recipes") / f"{name}.BF16.gguf"
        _write_bf16_gguf(path, cfg, tensors)
        rounded = {k: _bf16_to_f32(gguf.quants.quantize(v, T.BF16)) if v.ndim > 1 else v for k, v in tensors.items()}
        out[name] = (path, cfg, rounded)
    return out


BYTE_CHECKED = ("q2_k", "q3_k_m", "q3_k_l", "q4_k_m", "q5_k_m", "q6_k", "q4_0", "q5_0", "q5_1", "q8_0")


def _byte_checked_tensor(name: str) -> bool:
    """Bytes are compared for the first four blocks and the embeddings (types are checked for all)."""
    return not name.startswith("blk.") or int(name.split(".")[1]) < 4


def _ours_batched(floats: dict[str, np.ndarray], keys: set[tuple[str, T]]) -> dict[tuple[str, T], np.ndarray]:
    """quants.quantize for each (tensor, type), with tensors of equal row length batched into one call."""
    groups: dict[tuple[T, int], list[str]] = defaultdict(list)
    for name, qtype in sorted(keys):
        groups[(qtype, floats[name].shape[-1])].append(name)
    out = {}
    for (qtype, _), names in groups.items():
        packed = quants.quantize(np.concatenate([floats[n] for n in names]), qtype, "cpu")
        start = 0
        for n in names:
            rows = floats[n].shape[0]
            out[(n, qtype)] = packed[start:start + rows]
            start += rows
    return out


def test_llama_quantize_parity(synthetic_files: dict, tmp_path: Path) -> None:
    """Every method on both synthetic models: same type per tensor; same bytes for BYTE_CHECKED methods."""
    same_blocks: dict[T, list[int]] = defaultdict(lambda: [0, 0])
    checked = quants.K_QUANTS + (T.Q4_0, T.Q5_0, T.Q5_1, T.Q8_0)
    for name, (src, cfg, floats) in synthetic_files.items():
        model = recipes.ModelShape(cfg["n_layer"], cfg["n_head"], cfg["n_head_kv"], has_output=not cfg["tied"])
        theirs: dict[tuple[str, T], np.ndarray] = {}
        for method in recipes.METHODS.values():
            dst = tmp_path / f"{name}.{method.label}.gguf"
            _llama_quantize(src, dst, method)
            tensors = _compare_types(dst, method, model)
            if method.name in BYTE_CHECKED:
                for t in tensors:
                    if T(t.tensor_type) in checked and _byte_checked_tensor(t.name):
                        theirs[(t.name, T(t.tensor_type))] = np.array(t.data)
            del tensors
            dst.unlink()
        ours = _ours_batched(floats, set(theirs))
        for (tname, qtype), data in theirs.items():
            block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
            equal = (ours[(tname, qtype)].reshape(-1, block_bytes) == data.reshape(-1, block_bytes)).all(axis=1)
            same_blocks[qtype][0] += int(equal.sum())
            same_blocks[qtype][1] += equal.size
    print()
    for qtype, (same, total) in sorted(same_blocks.items()):
        print(f"llama_model_quantize parity {qtype.name}: {100 * same / total:.3f}% of {total} blocks identical")
    assert set(same_blocks) >= set(checked)
    for qtype, (same, total) in same_blocks.items():
        assert same / total >= 0.999, qtype.name


def _reference_bf16(model_dir: Path, out: Path) -> None:
    """llama.cpp's own converter, HF folder -> BF16 GGUF."""
    tree = llamacpp.source_tree()
    env = {"PYTHONPATH": str(tree / "gguf-py"), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "bf16",
           "--outfile", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def _model_shape(reader: gguf.GGUFReader) -> recipes.ModelShape:
    """The ModelShape of a GGUF file, from its metadata and tensor names."""
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def field(key: str) -> int:
        return int(reader.fields[f"{arch}.{key}"].parts[-1][0])

    names = {t.name for t in reader.tensors}
    return recipes.ModelShape(field("block_count"), field("attention.head_count"),
                              field("attention.head_count_kv"), has_output="output.weight" in names)


def test_fixture_model_types(qwen2_dir: Path, tmp_path: Path) -> None:
    """The reference converter's BF16 file of a real-tokenizer fixture (Qwen2, tied embeddings),
    quantized by llama.cpp: same types. (The synthetic models above cover the other rules.)"""
    model_dir, methods = qwen2_dir, ("q4_k_m", "q2_k")
    src = tmp_path / "model.BF16.gguf"
    _reference_bf16(model_dir, src)
    model = _model_shape(gguf.GGUFReader(str(src)))
    for name in methods:
        method = recipes.METHODS[name]
        dst = tmp_path / f"model.{method.label}.gguf"
        _llama_quantize(src, dst, method)
        _compare_types(dst, method, model)
        dst.unlink()


def test_bf16_source_rounding_helper() -> None:
    """The test's bf16 decode is exact (guards the parity test's inputs)."""
    x = torch.randn(64).bfloat16()
    raw = x.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(_bf16_to_f32(raw), x.float().numpy())


# --- requantize: an existing BF16 GGUF -> any method --------------------------------------------


@pytest.mark.parametrize("method", ["q4_k_m", "q3_k_s", "q2_k", "q5_0"])
def test_requantize_matches_llama_quantize(synthetic_files: dict, tmp_path: Path, method: str) -> None:
    """``requantize`` and ``llama_model_quantize`` on the same BF16 file: the same type for every tensor and,
    per type, at least 99.9% identical blocks."""
    from unsloth_nb.gguf.requantize import requantize

    m = recipes.METHODS[method]
    same: dict[T, list[int]] = defaultdict(lambda: [0, 0])
    for name, (src, _, _) in synthetic_files.items():
        theirs_path = tmp_path / f"{name}.theirs.gguf"
        _llama_quantize(src, theirs_path, m)
        (ours,) = requantize(src, [method], tmp_path / name, progress=False)
        assert ours.path.name == f"{name}.{m.label}.gguf"
        theirs = {t.name: t for t in gguf.GGUFReader(theirs_path).tensors}
        mine = gguf.GGUFReader(ours.path)
        assert {t.name for t in mine.tensors} == set(theirs)
        for t in mine.tensors:
            ref = theirs[t.name]
            assert T(t.tensor_type) == T(ref.tensor_type), t.name
            if T(t.tensor_type) in (T.F32, T.F16):
                assert np.array_equal(np.asarray(t.data), np.asarray(ref.data)), t.name
                continue
            block = gguf.GGML_QUANT_SIZES[T(t.tensor_type)][1]
            equal = (np.asarray(t.data).reshape(-1, block) == np.asarray(ref.data).reshape(-1, block)).all(axis=1)
            same[T(t.tensor_type)][0] += int(equal.sum())
            same[T(t.tensor_type)][1] += equal.size
    for qtype, (n_same, total) in sorted(same.items()):
        print(f"requantize {method} vs llama_model_quantize {qtype.name}: {100 * n_same / total:.3f}% identical")
        assert n_same / total >= 0.999, qtype.name


def test_requantize_of_our_bf16_equals_the_direct_export(llama3_dir: Path, tmp_path: Path) -> None:
    """From convert's BF16 file, requantize writes the very file converting the HF folder writes."""
    from unsloth_nb.gguf import convert
    from unsloth_nb.gguf.requantize import requantize

    methods = ["q4_k_m", "q8_0", "f16"]
    direct = convert.convert(llama3_dir, ["bf16", *methods], tmp_path / "direct", progress=False)
    again = requantize(direct[0].path, methods, tmp_path / "re", progress=False)
    for a, b in zip(again, direct[1:], strict=True):
        assert a.path.name == b.path.name and a.path.read_bytes() == b.path.read_bytes()
    assert all(r.reused for r in requantize(direct[0].path, methods, tmp_path / "re", progress=False))
    from unsloth_nb.__main__ import main

    assert main(["gguf", str(direct[0].path), "--quant", "q4_k_m", "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / direct[1].path.name).read_bytes() == direct[1].path.read_bytes()


def _head_by_gguf_py(path: Path, method: recipes.Method, types: list[T]) -> bytes:
    """What requantize wrote before it read headers itself: gguf-py's reader, then its writer (the oracle)."""
    from gguf_oracle import gguf_py_head

    from unsloth_nb.gguf import layout

    reader = gguf.GGUFReader(path)
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    writer = gguf.GGUFWriter(None, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue
        value = int(method.file_type) if name == gguf.Keys.General.FILE_TYPE else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for t, qtype in zip(reader.tensors, types, strict=True):
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), layout.nbytes(shape, qtype), raw_dtype=qtype)
    return gguf_py_head(writer)


def test_requantize_header_is_what_gguf_py_writes(llama2_dir: Path, llama3_dir: Path, tmp_path: Path) -> None:
    """requantize reads the source header itself (gguf-py's reader takes seconds on a 128k vocabulary) and copies
    the key/values as stored: the same header bytes as gguf-py reading and re-writing them, on our BF16 files
    and on llama.cpp's converter's. A file cut short inside its data is refused."""
    from unsloth_nb.gguf import convert
    from unsloth_nb.gguf import requantize as rq

    sources = [convert.convert(d, ["bf16"], tmp_path / d.name, progress=False)[0].path
               for d in (llama2_dir, llama3_dir)]
    sources += [r.path for r in convert.convert_with_llamacpp(llama2_dir, ["bf16", "f16"], tmp_path / "reference")]
    for path in sources:
        source = rq._read(path)
        for name in ("q4_k_m", "q8_0", "f16"):
            m = recipes.METHODS[name]
            types = [recipes.tensor_type(m, t.name, t.shape, rq._model_shape(source)) for t in source.tensors]
            assert rq._head(source, m, types)[0] == _head_by_gguf_py(path, m, types), (path.name, name)
    cut = tmp_path / "cut.BF16.gguf"
    cut.write_bytes(sources[0].read_bytes()[:-4096])
    with pytest.raises(UserError, match="not a readable GGUF"):
        rq.requantize(cut, ["q4_k_m"], tmp_path / "out", progress=False)


def test_requantize_refuses_a_quantized_source(llama2_dir: Path, tmp_path: Path) -> None:
    from unsloth_nb.gguf import convert
    from unsloth_nb.gguf.requantize import requantize

    (q8,) = convert.convert(llama2_dir, ["q8_0"], tmp_path, progress=False)
    with pytest.raises(UserError, match="already holds quantized tensors"):
        requantize(q8.path, ["q4_k_m"], tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="does not exist"):
        requantize(tmp_path / "absent.gguf", ["q4_k_m"], tmp_path / "out", progress=False)
    (tmp_path / "broken.gguf").write_bytes(q8.path.read_bytes()[:5000])
    with pytest.raises(UserError, match="not a readable GGUF"):
        requantize(tmp_path / "broken.gguf", ["q4_k_m"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.gguf"))
