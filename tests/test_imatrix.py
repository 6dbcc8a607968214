"""The importance matrix (``unsloth_nb.gguf.imatrix``) against llama.cpp's own tools.

Oracles: ``llama-imatrix`` (its GGUF and legacy .dat outputs, its tensor names, counts and statistics on the same
tokens) and ``llama-quantize --imatrix`` (which must accept our files). Models: the tiny Llama-3 fixture (BOS
tokenizer, random weights) for formats and rules, the real SmolLM2-135M for the numeric agreement and for
quantizing with an imatrix (``gguf --imatrix`` and ``requantize`` against ``llama-quantize --imatrix``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from lora_helpers import make_adapter

from unsloth_nb import fixtures
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import convert, imatrix, llamacpp, requantize

CTX = 64
"""Chunk size for the tiny model (llama-imatrix needs at least two chunks of text)."""


def calibration_text() -> str:
    """English prose (the held-out text verify uses, then llama.cpp's licence): tokenized identically by HF and
    llama.cpp for every fixture tokenizer (lines starting with digits are avoided: SmolLM2's HF pre-tokenizer splits
    a blank line before them differently)."""
    heldout = (Path(imatrix.__file__).parents[1] / "data" / "heldout.txt").read_text(encoding="utf-8")
    return heldout + "\n\n" + (llamacpp.source_tree() / "LICENSE").read_text(encoding="utf-8")


def run_tool(name: str, *args: str | Path) -> subprocess.CompletedProcess:
    done = subprocess.run([str(llamacpp.tool(name)), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{name} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def llama_imatrix(model: Path, text: Path, out: Path, ctx: int, *extra: str) -> imatrix.Imatrix:
    run_tool("llama-imatrix", "-m", model, "-f", text, "-o", out, "-c", ctx, "-t", 2, "--no-ppl", *extra)
    return imatrix.load(out)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("imatrix")


@pytest.fixture(scope="module")
def text_file(work: Path) -> Path:
    path = work / "calibration.txt"
    path.write_text(calibration_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_gguf(llama3_dir: Path, work: Path) -> Path:
    return convert.convert(llama3_dir, ["bf16"], work / "bf16", progress=False)[0].path


@pytest.fixture(scope="module")
def ours(llama3_dir: Path, text_file: Path, work: Path) -> Path:
    """Our imatrix of the tiny model, written through the command-line entry point (one line: path, size, chunks,
    seconds)."""
    parser = argparse.ArgumentParser()
    imatrix.add_arguments(parser)
    out = work / "ours" / "tiny.imatrix.gguf"
    args = parser.parse_args([str(llama3_dir), "--data", str(text_file), "--out", str(out), "--ctx", str(CTX)])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert imatrix.run_cli(args) == 0
    line = printed.getvalue()
    assert re.fullmatch(rf"{re.escape(str(out))}  [\d.]+ KB  \d+ chunks of {CTX} tokens  [\d.]+ s\n", line), line
    return out


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path, text_file: Path, work: Path) -> tuple[imatrix.Imatrix, Path, Path]:
    """llama-imatrix's GGUF and .dat outputs for the same text and context (read back, and their paths)."""
    gguf_out, dat_out = work / "ref" / "tiny.imatrix.gguf", work / "ref" / "tiny.imatrix.dat"
    gguf_out.parent.mkdir()
    ref = llama_imatrix(tiny_gguf, text_file, gguf_out, CTX)
    llama_imatrix(tiny_gguf, text_file, dat_out, CTX, "--output-format", "dat")
    return ref, gguf_out, dat_out


def agreement(ours: imatrix.Imatrix, ref: imatrix.Imatrix) -> tuple[float, float]:
    """(lowest Pearson correlation, largest relative difference of totals) of the per-column mean x^2 over all
    tensors."""
    lowest, largest = 1.0, 0.0
    for name in ref.entries:
        a, b = ours.weights(name), ref.weights(name)
        lowest = min(lowest, float(np.corrcoef(a, b)[0, 1]))
        largest = max(largest, float(abs(a.sum() - b.sum()) / b.sum()))
    return lowest, largest


# ------------------------------------------------------------------------------------------------- formats


def test_our_file_round_trips_and_llama_quantize_uses_it(ours: Path, tiny_gguf: Path, work: Path) -> None:
    """The CLI writes one line and a GGUF imatrix; it reads back the same; llama-quantize takes it for Q4_K_M, and
    its .dat form for IQ2_XXS, which refuses to run without an importance matrix for every weight."""
    loaded = imatrix.load(ours)
    assert loaded.chunk_size == CTX and loaded.chunk_count >= 2 and loaded.datasets[0].endswith("calibration.txt")
    assert len(loaded) == 4 * 7 and all(n.startswith("blk.") for n in loaded.entries)
    again = imatrix.load(loaded.save(work / "ours" / "again.imatrix.gguf"))
    assert ours.read_bytes() == (work / "ours" / "again.imatrix.gguf").read_bytes()
    for name, (sum2, counts) in loaded.entries.items():
        assert sum2.shape == (1, 256 if "ffn_down" not in name else 512) and sum2.dtype == np.float32
        assert counts.tolist() == [loaded.chunk_count * CTX]
        assert np.array_equal(again.entries[name][0], sum2)
    dat = loaded.save(work / "ours" / "tiny.imatrix.dat", format="dat")
    from_dat = imatrix.load(dat)
    for name in loaded.entries:
        np.testing.assert_allclose(from_dat.weights(name), loaded.weights(name), rtol=1e-6)
    for source, qtype in ((ours, "Q4_K_M"), (dat, "IQ2_XXS")):
        out = work / "ours" / f"tiny.{qtype}.{source.suffix[1:]}.gguf"
        done = run_tool("llama-quantize", "--imatrix", source, tiny_gguf, out, qtype, 2)
        assert f"loaded {len(loaded)} importance matrix entries" in done.stdout + done.stderr
        missing = re.findall(r"did not find weights for (\S+)", done.stdout + done.stderr)
        assert set(missing) <= {"output.weight", "token_embd.weight"}, missing  # llama-imatrix skips them too
        assert out.is_file()
    with pytest.raises(subprocess.CalledProcessError):  # the oracle does need one for IQ2_XXS
        subprocess.run([str(llamacpp.tool("llama-quantize")), str(tiny_gguf), str(work / "ours" / "no.gguf"),
                        "IQ2_XXS", "2"], capture_output=True, check=True, timeout=300)


def test_we_read_llama_imatrix_files_and_collect_the_same_tensors(ours: Path, reference: tuple) -> None:
    """Both of llama-imatrix's formats load, our saver rewrites them byte for byte, and our collection has exactly
    its tensor names, counts and chunk count (so the chunking and the 16-row rule match) and close statistics (the
    BOS put in front of every chunk included: the Llama-3 tokenizer adds one)."""
    ref, gguf_out, dat_out = reference
    from_dat = imatrix.load(dat_out)
    assert from_dat.chunk_size == 0 and from_dat.chunk_count == ref.chunk_count
    assert from_dat.datasets == ref.datasets
    assert sorted(from_dat.entries) == sorted(ref.entries)
    for name in ref.entries:
        np.testing.assert_allclose(from_dat.weights(name), ref.weights(name), rtol=1e-6)
    assert ref.save(gguf_out.with_name("resaved.gguf")).read_bytes() == gguf_out.read_bytes()
    assert from_dat.save(dat_out.with_name("resaved.dat"), format="dat").read_bytes() == dat_out.read_bytes()
    assert ref.save(dat_out.with_name("converted.dat"), format="dat").read_bytes() == dat_out.read_bytes()

    mine = imatrix.load(ours)
    assert sorted(mine.entries) == sorted(ref.entries)
    assert (mine.chunk_count, mine.chunk_size) == (ref.chunk_count, ref.chunk_size)
    for name, (_, counts) in ref.entries.items():
        assert mine.entries[name][1].tolist() == counts.tolist(), name
    lowest, largest = agreement(mine, ref)
    assert lowest > 0.999 and largest < 0.02, (lowest, largest)


def test_statistics_agree_with_llama_imatrix_on_a_real_model(text_file: Path, work: Path) -> None:
    """SmolLM2-135M: our float32 torch pass against llama-imatrix on its BF16 GGUF, on identical tokens. Per
    tensor the mean x^2 per column correlates above 0.999 and the totals differ by under 2%; counts are equal."""
    import llama_cpp

    folder = fixtures.build_real_model("smollm2")
    model = convert.convert(folder, ["bf16"], work / "smollm2", progress=False)[0].path
    vocab = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    try:
        theirs = vocab.tokenize(text_file.read_bytes(), add_bos=True, special=False)
    finally:
        vocab.close()
    assert imatrix.token_ids(folder, text_file).tolist() == theirs, "the oracle would see other tokens"

    ref = llama_imatrix(model, text_file, work / "smollm2" / "ref.imatrix.gguf", 128)
    mine = imatrix.collect(folder, text_file, ctx=128, progress=False)
    assert sorted(mine.entries) == sorted(ref.entries) and len(ref) == 30 * 7
    assert (mine.chunk_count, mine.chunk_size) == (ref.chunk_count, 128) == (len(theirs) // 128, 128)
    for name, (_, counts) in ref.entries.items():
        assert mine.entries[name][1].tolist() == counts.tolist(), name
    lowest, largest = agreement(mine, ref)
    print(f"\nSmolLM2 vs llama-imatrix: lowest correlation {lowest:.6f}, largest total difference {largest:.2%}")
    assert lowest > 0.999 and largest < 0.02


def test_expert_weights_follow_llama_quantize(work: Path) -> None:
    """Per expert: in_sum2 / count, 1.0 for an expert that saw no rows; the 2-D layout survives a round trip."""
    sum2 = np.array([[2.0, 4.0, 6.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    made = imatrix.Imatrix({"blk.0.ffn_up_exps.weight": (sum2, np.array([2.0, 0.0], np.float32)),
                            "blk.0.attn_q.weight": (sum2[:1], np.array([4.0], np.float32))}, ["rows"], 1, 2)
    assert made.weights("blk.0.ffn_up_exps.weight").tolist() == [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]
    assert made.weights("blk.0.attn_q.weight").tolist() == [0.5, 1.0, 1.5]
    assert made.weights("output.weight") is None
    back = imatrix.load(made.save(work / "experts.imatrix.gguf"))
    assert back.entries["blk.0.ffn_up_exps.weight"][0].shape == (2, 3)
    assert back.weights("blk.0.ffn_up_exps.weight").tolist() == [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]
    dat = imatrix.load(made.save(work / "experts.imatrix.dat", format="dat"))
    assert dat.weights("blk.0.ffn_up_exps.weight", row_len=3).tolist() == [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]


# ------------------------------------------------------------------------------------------------ quantizing

IMATRIX_METHODS = ("q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs", "q4_0", "q5_1")
"""Every quantizer that takes weights, and the methods whose type mix an imatrix changes (IQ4, Q4_0, Q5_x)."""


REAL_METHODS = ("q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")
"""The acceptance list of methods, on the real model."""


def same_as_llama_quantize(ours: Path, theirs: Path) -> float:
    """Assert both files hold the same tensors with the same types and ``quantize.imatrix.*`` values; return the
    share of identical blocks (all tensors together)."""
    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    ref = gguf.GGUFReader(theirs)
    assert {t.name: int(t.tensor_type) for t in ref.tensors} == {n: int(t.tensor_type) for n, t in mine.items()}
    same = total = 0
    for t in ref.tensors:
        size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.tensor_type)][1]
        a = np.asarray(mine[t.name].data).view(np.uint8).reshape(-1, size)
        b = np.asarray(t.data).view(np.uint8).reshape(-1, size)
        same += int((a == b).all(axis=1).sum())
        total += b.shape[0]
    keys = [k for k in ref.fields if k.startswith("quantize.imatrix.")]
    assert len(keys) >= 3
    mine_fields = gguf.GGUFReader(ours).fields
    for key in keys:
        assert mine_fields[key].contents() == ref.fields[key].contents(), key
        assert mine_fields[key].types == ref.fields[key].types, key
    return same / total


def quantize_both_ways(folder: Path, bf16: Path, imatrix_path: Path, converted: tuple[str, ...],
                       requantized: tuple[str, ...], out: Path) -> dict[str, float]:
    """"<route> <method>" -> identical share of ``gguf --imatrix`` from the HF folder (``converted`` methods) and of
    ``requantize`` from the BF16 GGUF (``requantized``), each against llama-quantize --imatrix on that BF16 GGUF."""
    ours = {}
    if converted:
        for r in convert.convert(folder, list(converted), out / "convert", imatrix=imatrix_path, progress=False):
            ours[f"convert {r.method}"] = r.path
    if requantized:
        for r in requantize.requantize(bf16, list(requantized), out / "requantize", imatrix=imatrix_path,
                                       progress=False):
            ours[f"requantize {r.method}"] = r.path
    shares = {}
    for method in dict.fromkeys(converted + requantized):
        theirs = out / "llama.cpp" / f"{method}.gguf"
        theirs.parent.mkdir(parents=True, exist_ok=True)
        done = run_tool("llama-quantize", "--imatrix", imatrix_path, bf16, theirs, method.upper(), 2)
        assert "did not find weights for blk." not in done.stdout + done.stderr
        for route in ("convert", "requantize"):
            if f"{route} {method}" in ours:
                shares[f"{route} {method}"] = same_as_llama_quantize(ours[f"{route} {method}"], theirs)
    return shares


def test_quantizing_with_our_imatrix_gives_llama_quantizes_files(llama3_dir: Path, tiny_gguf: Path, ours: Path,
                                                                 work: Path) -> None:
    """Tiny Llama-3, every weighted quantizer: same types, same quantize.imatrix.* keys, and at least 99.9% of
    the blocks byte-identical to llama-quantize --imatrix with the same file (through convert and requantize)."""
    shares = quantize_both_ways(llama3_dir, tiny_gguf, ours, IMATRIX_METHODS, IMATRIX_METHODS, work / "quantized-tiny")
    print("\ntiny llama3, identical blocks:", {k: f"{v:.4%}" for k, v in shares.items()})
    assert len(shares) == 2 * len(IMATRIX_METHODS) and min(shares.values()) >= 0.999, shares


def test_quantizing_smollm2_with_its_imatrix_gives_llama_quantizes_files(text_file: Path, work: Path) -> None:
    """SmolLM2-135M with an imatrix we collected from text: Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, IQ4_NL and IQ4_XS
    from the HF folder, and Q4_K_M re-quantized from its BF16 GGUF with the legacy .dat form (read as
    llama-quantize reads it), equal llama-quantize --imatrix's types, keys and at least 99.9% of its blocks."""
    folder = fixtures.build_real_model("smollm2")
    bf16 = convert.convert(folder, ["bf16"], work / "smollm2-q", progress=False)[0].path
    collected = imatrix.collect(folder, text_file, ctx=128, chunks=16, progress=False)
    for path in (collected.save(work / "smollm2-q" / "smollm2.imatrix.gguf"),
                 collected.save(work / "smollm2-q" / "smollm2.imatrix.dat", format="dat")):
        routes = (REAL_METHODS, ()) if path.suffix == ".gguf" else ((), ("q4_k_m",))
        shares = quantize_both_ways(folder, bf16, path, *routes, work / "smollm2-q" / path.suffix[1:])
        print(f"\nSmolLM2 ({path.name}), identical blocks:", {k: f"{v:.4%}" for k, v in shares.items()})
        assert len(shares) == len(routes[0] + routes[1]) and min(shares.values()) >= 0.999, shares


def test_fused_adapter_with_an_imatrix_equals_merge_then_convert(llama3_dir: Path, ours: Path, tmp_path: Path) -> None:
    """``gguf BASE --adapter A --imatrix F``: the same tensors (types and bytes) as merging first and converting the
    merged folder with the same imatrix."""
    from unsloth_nb.merge import merge

    adapter = make_adapter(llama3_dir, tmp_path / "adapter")
    merged = merge(llama3_dir, adapter, tmp_path / "merged").out_dir
    methods = ["q4_k_m", "iq4_xs"]
    fused = convert.convert(llama3_dir, methods, tmp_path / "fused", adapter=adapter, imatrix=ours, progress=False)
    plain = convert.convert(merged, methods, tmp_path / "plain", imatrix=ours, progress=False)
    for a, b in zip(fused, plain, strict=True):
        assert [(t.name, t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(a.path).tensors] == [
            (t.name, t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(b.path).tensors]
        assert "quantize.imatrix.file" in gguf.GGUFReader(a.path).fields


def test_an_imatrix_of_another_model_is_refused(llama3_dir: Path, ours: Path, tmp_path: Path) -> None:
    """An entry of another width (an imatrix of a wider model under the same names): a UserError naming it, as
    llama-quantize refuses it, and no file written."""
    other = imatrix.load(ours)
    sum2, counts = other.entries["blk.1.ffn_up.weight"]
    other.entries["blk.1.ffn_up.weight"] = (np.concatenate([sum2, sum2], axis=1), counts)
    wrong = other.save(tmp_path / "wider.imatrix.gguf")
    with pytest.raises(UserError, match=r"blk\.1\.ffn_up\.weight.*another model"):
        convert.convert(llama3_dir, ["q4_k_m"], tmp_path / "out", imatrix=wrong, progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- data


def test_rows_short_data_and_chunk_limit(llama3_dir: Path) -> None:
    """Chat rows go through the chat template; fewer tokens than ctx make one chunk of what there is; ``chunks``
    caps the chunks used."""
    rows = [{"messages": [{"role": "user", "content": "What is the capital of France?"},
                          {"role": "assistant", "content": "The capital of France is Paris."}]}] * 3
    short = imatrix.collect(llama3_dir, rows, ctx=4096, progress=False)
    assert short.chunk_count == 1 and 32 < short.chunk_size < 4096 and short.datasets == ["3 in-memory rows"]
    assert all(c.tolist() == [short.chunk_size] for _, c in short.entries.values())
    capped = imatrix.collect(llama3_dir, rows, ctx=16, chunks=2, progress=False)
    assert (capped.chunk_count, capped.chunk_size) == (2, 16)
    assert all(c.tolist() == [32] for _, c in capped.entries.values())


def test_adapter_changes_the_statistics_after_the_first_projection(llama3_dir: Path, text_file: Path,
                                                                   tmp_path: Path) -> None:
    """With a LoRA adapter on every projection, the inputs of layer 0's q/k/v (embeddings, normed) stay the base's
    and everything downstream changes."""
    adapter = make_adapter(llama3_dir, tmp_path / "adapter")
    base = imatrix.collect(llama3_dir, text_file, ctx=CTX, chunks=2, progress=False)
    tuned = imatrix.collect(llama3_dir, text_file, adapter=adapter, ctx=CTX, chunks=2, progress=False)
    assert sorted(base.entries) == sorted(tuned.entries)
    np.testing.assert_allclose(tuned.weights("blk.0.attn_q.weight"), base.weights("blk.0.attn_q.weight"), rtol=1e-5)
    for name in ("blk.0.attn_output.weight", "blk.0.ffn_up.weight", "blk.3.attn_q.weight", "blk.3.ffn_down.weight"):
        a, b = tuned.weights(name), base.weights(name)
        assert np.abs(a - b).max() > 1e-3 * np.abs(b).max(), name


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_data_is_a_user_error_naming_it(llama3_dir: Path, tmp_path: Path) -> None:
    """Missing, empty and too short data, and a context below llama.cpp's 16-row minimum, are refused before the
    model is loaded."""
    missing = tmp_path / "missing.txt"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        imatrix.collect(llama3_dir, missing, progress=False)
    with pytest.raises(UserError, match="missing.jsonl"):
        imatrix.collect(llama3_dir, tmp_path / "missing.jsonl", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(UserError, match=re.escape(str(empty))):
        imatrix.collect(llama3_dir, empty, progress=False)
    empty_rows = tmp_path / "empty.jsonl"
    empty_rows.write_text("")
    with pytest.raises(UserError, match=re.escape(str(empty_rows))):
        imatrix.collect(llama3_dir, empty_rows, progress=False)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Hello there.")
    with pytest.raises(UserError, match="tiny.txt gives only"):
        imatrix.collect(llama3_dir, tiny, progress=False)
    with pytest.raises(UserError, match="ctx"):
        imatrix.collect(llama3_dir, tiny, ctx=8, progress=False)


def test_damaged_imatrix_files_are_user_errors_naming_them(ours: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    """Truncated, garbage, a model GGUF, absurd counts and sizes, a missing file: never a traceback, and nothing
    the size of a damaged count is allocated."""
    good = ours.read_bytes()
    cases = {"truncated.gguf": good[: len(good) // 2], "header-only.gguf": good[:40],
             "garbage.dat": np.random.default_rng(0).bytes(4096), "text.dat": b"hello world, not an imatrix\n",
             "absurd-entries.dat": struct.pack("<i", 2**31 - 1) + b"\0" * 64,
             "absurd-values.dat": struct.pack("<ii", 1, 3) + b"abc" + struct.pack("<ii", 1, 2**30) + b"\0" * 16,
             "negative.dat": struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 1, 1) + struct.pack("<f", -1.0)}
    name = b"blk.0.attn_k.weight.in_sum2"
    at = good.index(name) + len(name)  # then n_dims (u32, 1 here) and the dimension (u64): claim 2^40 values
    assert struct.unpack_from("<I", good, at)[0] == 1
    cases["absurd-shape.gguf"] = good[:at + 4] + struct.pack("<Q", 2**40) + good[at + 4 + 8:]
    for file_name, content in cases.items():
        path = tmp_path / file_name
        path.write_bytes(content)
        with pytest.raises(UserError, match=re.escape(str(path))):
            imatrix.load(path)
    with pytest.raises(UserError, match=re.escape(str(tiny_gguf)) + ".* a model GGUF"):
        imatrix.load(tiny_gguf)
    with pytest.raises(UserError, match="does not exist"):
        imatrix.load(tmp_path / "nothing.gguf")


# ---------------------------------------------------------------------------------------------- notebook path


def test_calibrate_reuses_its_file_and_leaves_others_alone(llama3_dir: Path, tmp_path: Path) -> None:
    """The notebooks' step: a re-run with the same inputs returns the file untouched; other inputs rewrite our own
    file; a file we did not write is refused."""
    rows = [{"messages": [{"role": "user", "content": "What is the capital of France?"},
                          {"role": "assistant", "content": "The capital of France is Paris."}]}] * 4
    out = tmp_path / "imatrix.gguf"
    first = imatrix.calibrate(llama3_dir, rows, out, ctx=32, progress=False)
    stamp = first.stat().st_mtime_ns
    assert imatrix.calibrate(llama3_dir, rows, out, ctx=32, progress=False).stat().st_mtime_ns == stamp
    assert imatrix.calibrate(llama3_dir, rows, out, ctx=16, progress=False).stat().st_mtime_ns != stamp
    assert imatrix.load(out).chunk_size == 16
    foreign = tmp_path / "mine.gguf"
    foreign.write_bytes(b"my own file")
    with pytest.raises(UserError, match="did not write it"):
        imatrix.calibrate(llama3_dir, rows, foreign, ctx=32, progress=False)
    assert foreign.read_bytes() == b"my own file"


def test_gain_shows_the_imatrix_lowering_the_weighted_error(llama3_dir: Path, ours: Path) -> None:
    """Per low-bit method, the layer output error with the imatrix is below the error without; 16-bit and Q8_0
    are left out (they take no weights)."""
    gains = imatrix.gain(llama3_dir, ours, ["q4_k_m", "iq4_xs", "q2_k", "q8_0", "bf16"], device="cpu")
    assert [g.method for g in gains] == ["q4_k_m", "iq4_xs", "q2_k"]
    for g in gains:
        assert 0 < g.error_with < g.error, g
        assert 2 < g.bits_per_weight < 6, g


def test_plan_picker_and_model_card_know_the_imatrix(llama3_dir: Path, ours: Path, tmp_path: Path) -> None:
    """The plan counts the imatrix's memory and time; the picker ticks it for 4 bits and below only; the model
    card and Modelfile say how each file was calibrated."""
    from unsloth_nb import modelfile, plan, widgets

    made = plan.make_plan(llama3_dir, ["q4_k_m"], tmp_path / "gguf", imatrix_tokens=50_000)
    step = made.steps[0]
    assert step.name.startswith("imatrix (50,000 tokens") and step.ram > 0 and step.seconds > 0
    assert "takes" in str(made)
    assert widgets.QuantPicker(llama3_dir, tmp_path / "gguf", ["q4_k_m"], imatrix=ours).imatrix == ours
    assert widgets.QuantPicker(llama3_dir, tmp_path / "gguf", ["q8_0"], imatrix=ours).imatrix is None
    assert widgets.QuantPicker(llama3_dir, tmp_path / "gguf", ["q4_k_m"]).imatrix is None
    files = convert.convert(llama3_dir, ["q4_k_m", "q8_0"], tmp_path / "gguf", imatrix=ours, progress=False)
    modelfile.write_modelfile(files[0].path, llama3_dir)
    card = (tmp_path / "gguf" / "README.md").read_text()
    rows = {line.split("`")[1]: line for line in card.splitlines() if line.startswith("| `")}
    chunks = imatrix.load(ours).chunk_count
    assert rows[files[0].path.name].endswith(f"| importance matrix from calibration.txt ({chunks} chunks) |"), rows
    assert rows[files[1].path.name].endswith("| none (this type takes no importance matrix) |"), rows
    assert "# quantized with an importance matrix from calibration.txt" in (tmp_path / "gguf" / "Modelfile").read_text()
