"""LoRA adapter -> GGUF LoRA adapter: the bytes of llama.cpp's convert_lora_to_gguf.py, and llama.cpp applying
the file on top of the base GGUF the way peft applies the adapter."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from lora_helpers import make_adapter, other_base
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from unsloth_nb import fixtures
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import convert, llamacpp, lora

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")  # peft's advice on the adapters built here

OUTTYPES = ("f16", "bf16", "f32", "q8_0")
SCRIPT = "convert_lora_to_gguf.py"
IDS = [1, 450, 4996, 17354, 1701, 7, 99, 300]
"""Token ids every vocabulary here has (the smallest is SmolLM2's 49152)."""


@pytest.fixture(scope="session")
def reference_script() -> Path:
    """llama.cpp's convert_lora_to_gguf.py from the pinned llama-cpp-python sdist (it imports the tree's conversion/
    package)."""
    return llamacpp.source_tree() / SCRIPT


REFERENCE_DRIVER = """
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
"""
"""Runs the reference script once per outtype in one process, so that torch and transformers load once."""


def run_references(script: Path, adapter: Path, base: Path, outtypes: tuple[str, ...], out: Path) -> dict[str, Path]:
    """The reference's file for every outtype."""
    tree = llamacpp.source_tree()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "gguf-py"), str(tree)]))
    files = {t: out / f"reference.{t}.gguf" for t in outtypes}
    runs = [[str(script), str(adapter), "--base", str(base), "--outtype", t, "--outfile", str(files[t])]
            for t in outtypes]
    proc = subprocess.run([sys.executable, "-c", REFERENCE_DRIVER, json.dumps(runs)], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return files


def random_adapter(base: Path, out: Path, targets: list[str], r: int = 8, seed: int = 0, **lora_args) -> Path:
    """A peft adapter with random non-zero factors on ``targets`` (lora_helpers.make_adapter fixes the Llama
    projections; Phi-3's fused ones and embeddings need their own names)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = LoraConfig(r=r, lora_alpha=16, target_modules=targets, init_lora_weights=False, **lora_args)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for param in (p for p in peft_model.parameters() if p.requires_grad):
            param.copy_(torch.randn_like(param, dtype=torch.float32) * 0.05)
    peft_model.save_pretrained(out)
    return out


def assert_same_files(ours: dict[str, Path], theirs: dict[str, Path]) -> None:
    for outtype, path in theirs.items():
        a, b = ours[outtype].read_bytes(), path.read_bytes()
        if a != b:  # say where, before failing on the bytes
            mine, ref = gguf.GGUFReader(ours[outtype]), gguf.GGUFReader(path)
            assert list(mine.fields) == list(ref.fields), outtype
            assert [(t.name, t.tensor_type) for t in mine.tensors] == [(t.name, t.tensor_type) for t in ref.tensors]
        assert a == b, outtype


# ------------------------------------------------------------------------------- the fixture models


@pytest.fixture(scope="module", params=[*fixtures.KINDS, "smollm2"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, reference_script: Path):
    """(kind, base folder, adapter folder, {outtype: our file}, {outtype: reference file}) for each fixture
    model and the real SmolLM2. The base comes from adapter_config.json (peft records the local folder)."""
    kind = request.param
    base = fixtures.build_real_model("smollm2") if kind == "smollm2" else fixtures.build_model(kind)
    tmp = tmp_path_factory.mktemp(f"lora-{kind}")
    adapter = make_adapter(base, tmp / "adapter")
    ours = {r.method: r.path for r in lora.convert_adapter(adapter, list(OUTTYPES), tmp / "native", progress=False)}
    theirs = run_references(reference_script, adapter, base, OUTTYPES, tmp)
    return kind, base, adapter, ours, theirs


def test_byte_identical_to_llamacpp(case) -> None:
    """f16, bf16, f32 and q8_0: the same bytes as convert_lora_to_gguf.py, metadata included."""
    kind, _, adapter, ours, theirs = case
    assert_same_files(ours, theirs)
    reader = gguf.GGUFReader(ours["q8_0"])
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 16.0 and fields["general.name"] == "Adapter"
    assert "general.file_type" not in fields and not any(k.startswith("tokenizer.") for k in fields)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight.lora_b"] == gguf.GGMLQuantizationType.F16  # r = 8 columns: no Q8_0 block
    assert ours["f16"].name == "adapter.F16.gguf"


def test_llama_qk_permutation_applies_to_lora_b_rows(case) -> None:
    """For Llama, lora_b's rows are permuted per head as the base's q/k rows are; lora_a is unchanged."""
    from safetensors import safe_open

    kind, base, adapter, ours, _ = case
    tensors = {t.name: t for t in gguf.GGUFReader(ours["f32"]).tensors}
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    heads = json.loads((base / "config.json").read_text())["num_attention_heads"]
    want = (b.reshape(heads, 2, b.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(b.shape)
            if kind != "qwen2" else b)
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_a"].data, a.numpy())
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_b"].data, want.numpy())
    assert kind == "qwen2" or not torch.equal(want, b)


def _llama_logits(model: Path, adapter: Path | None) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(adapter) if adapter else None, n_ctx=64, n_threads=2,
                          verbose=False, logits_all=True, type_k=0, type_v=0)  # f32 KV cache
    try:
        llm.eval(IDS)
        return np.array(llm.scores[:len(IDS)])
    finally:
        llm.close()


def _peft_logits(base: Path, adapter: Path) -> tuple[np.ndarray, np.ndarray]:
    """(base model's, base + adapter's) float32 logits from transformers and peft."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        plain = model(ids).logits[0].numpy()
        tuned = PeftModel.from_pretrained(model, adapter)(ids).logits[0].numpy()
    return plain, tuned


@pytest.fixture(scope="module")
def base_gguf(case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base model's F32 GGUF (our converter's, identical to llama.cpp's)."""
    kind, base, *_ = case
    (result,) = convert.convert(base, ["f32"], tmp_path_factory.mktemp(f"base-{kind}"), progress=False)
    return result.path


def test_llamacpp_applies_the_adapter_like_peft(case, base_gguf: Path) -> None:
    """llama.cpp with our f32 adapter on the f32 base gives peft's logits (the adapter moves them by 10% to 100% of
    the largest logit; llama.cpp stays within 0.1% of peft), the q8_0 adapter within 2%; the base alone is far."""
    kind, base, adapter, ours, _ = case
    plain, tuned = _peft_logits(base, adapter)
    scale = float(np.abs(tuned).max())
    without = _llama_logits(base_gguf, None)
    assert float(np.abs(without - plain).max()) <= 1e-3 * scale, kind
    moved = float(np.abs(without - tuned).max())
    assert moved >= 0.05 * scale, kind
    exact = float(np.abs(_llama_logits(base_gguf, ours["f32"]) - tuned).max())
    assert exact <= 1e-3 * scale and exact <= moved / 50, (kind, exact, moved)
    q8 = float(np.abs(_llama_logits(base_gguf, ours["q8_0"]) - tuned).max())
    assert q8 <= 2e-2 * scale and q8 <= moved / 5, (kind, q8, moved)


# ---------------------------------------------------------------------------- more architectures


ARCH_TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
"""LoRA targets per architecture (default: the seven Llama-style projections)."""


def extra_base(kind: str, dest: Path) -> Path:
    """A tiny random model (2 layers, a fixture's real tokenizer) of an architecture the fixtures do not cover."""
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config, Qwen3Config

    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)
    tokenizer = "qwen2" if kind == "qwen3" else "llama2"
    if kind == "mistral":
        config = MistralConfig(vocab_size=32000, tie_word_embeddings=False, **common)
    elif kind == "qwen3":
        config = Qwen3Config(vocab_size=151936, tie_word_embeddings=True, **common)
    elif kind == "gemma2":
        config = Gemma2Config(vocab_size=32000, sliding_window=512, **common)
    elif kind == "gemma3":
        config = Gemma3TextConfig(vocab_size=32000, sliding_window=512, **common)
    elif kind == "phi3":
        common.pop("head_dim")
        config = Phi3Config(vocab_size=32064, **common)
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(dest)
    for f in fixtures.build_tokenizer(tokenizer).iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, dest / f.name)
    return dest


@pytest.mark.parametrize("kind", ["mistral", "qwen3", "gemma2", "gemma3", "phi3"])
def test_more_architectures_byte_identical(kind: str, tmp_path: Path, reference_script: Path) -> None:
    """Mistral, Qwen3, Gemma 2, Gemma 3 (rank 32: lora_b in Q8_0 too) and Phi-3 (fused qkv and gate_up): every
    outtype equal to the reference's."""
    base = extra_base(kind, tmp_path / kind)
    targets = ARCH_TARGETS.get(kind, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    adapter = random_adapter(base, tmp_path / "adapter", targets, r=32 if kind == "gemma3" else 8)
    ours = {r.method: r.path for r in lora.convert_adapter(adapter, list(OUTTYPES), tmp_path / "native",
                                                           progress=False)}
    assert_same_files(ours, run_references(reference_script, adapter, base, OUTTYPES, tmp_path))
    reader = gguf.GGUFReader(ours["q8_0"])
    types = {t.name: t.tensor_type for t in reader.tensors}
    name = "blk.1.attn_qkv.weight" if kind == "phi3" else "blk.1.attn_v.weight"
    assert types[f"{name}.lora_a"] == gguf.GGMLQuantizationType.Q8_0
    expected_b = gguf.GGMLQuantizationType.Q8_0 if kind == "gemma3" else gguf.GGMLQuantizationType.F16
    assert types[f"{name}.lora_b"] == expected_b
    assert reader.fields["general.architecture"].contents() == lora.adapter_tensors(adapter).arch.name


# ----------------------------------------------------------------------- embeddings, lm_head, scaling


def test_embedding_and_lm_head_lora(llama3_dir: Path, tmp_path: Path, reference_script: Path) -> None:
    """LoRA on the embeddings (lora_a stored transposed, vocab x r) and on an untied lm_head (output.weight):
    the reference's bytes, and llama.cpp applies both as peft does."""
    adapter = random_adapter(llama3_dir, tmp_path / "adapter", ["q_proj", "embed_tokens", "lm_head"])
    ours = {r.method: r.path for r in lora.convert_adapter(adapter, ["f32", "q8_0"], tmp_path / "native",
                                                           progress=False)}
    assert_same_files(ours, run_references(reference_script, adapter, llama3_dir, ("f32", "q8_0"), tmp_path))
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(ours["f32"]).tensors}
    assert shapes["token_embd.weight.lora_a"] == (8, 128256) and shapes["token_embd.weight.lora_b"] == (8, 256)
    assert shapes["output.weight.lora_b"] == (8, 128256)
    (base,) = convert.convert(llama3_dir, ["f32"], tmp_path / "base", progress=False)
    plain, tuned = _peft_logits(llama3_dir, adapter)
    moved = float(np.abs(plain - tuned).max())
    got = float(np.abs(_llama_logits(base.path, ours["f32"]) - tuned).max())
    assert got <= 1e-3 * float(np.abs(tuned).max()) and got <= moved / 50, (got, moved)


def test_rslora_and_alpha_pattern_scale_like_peft(llama2_dir: Path, tmp_path: Path, reference_script: Path) -> None:
    """llama.cpp scales by alpha / r. For rsLoRA (alpha / sqrt(r)) the effective alpha is written instead, and a
    module with its own alpha_pattern gets its lora_b rescaled: llama.cpp then matches peft, which the reference's
    file (plain lora_alpha) does not."""
    adapter = make_adapter(llama2_dir, tmp_path / "adapter", use_rslora=True,
                           alpha_pattern={"layers.1.self_attn.q_proj": 3})
    (ours,) = lora.convert_adapter(adapter, ["f32"], tmp_path / "native", progress=False)
    fields = gguf.GGUFReader(ours.path).fields
    assert fields["adapter.lora.alpha"].contents() == pytest.approx(16 * math.sqrt(8), rel=1e-7)
    theirs = run_references(reference_script, adapter, llama2_dir, ("f32",), tmp_path)["f32"]
    (base,) = convert.convert(llama2_dir, ["f32"], tmp_path / "base", progress=False)
    plain, tuned = _peft_logits(llama2_dir, adapter)
    scale = float(np.abs(tuned).max())
    got = float(np.abs(_llama_logits(base.path, ours.path) - tuned).max())
    reference = float(np.abs(_llama_logits(base.path, theirs) - tuned).max())
    assert got <= 1e-3 * scale and reference >= 20 * got, (got, reference)
    plan = lora.adapter_tensors(adapter)
    factors = {t.name: t.factor for t in plan.tensors if t.role == "b"}
    assert factors["blk.1.attn_q.weight.lora_b"] == pytest.approx(3 / 16) and factors["blk.0.attn_q.weight.lora_b"] == 1


def test_plain_lora_scale_and_rank_pattern_keep_the_reference_bytes(llama3_dir: Path, tmp_path: Path,
                                                                   reference_script: Path) -> None:
    """A rank_pattern changes r per module, which llama.cpp reads from the tensors: nothing is rescaled."""
    adapter = make_adapter(llama3_dir, tmp_path / "adapter", rank_pattern={"layers.2.mlp.down_proj": 4})
    (ours,) = lora.convert_adapter(adapter, ["bf16"], tmp_path / "native", progress=False)
    assert_same_files({"bf16": ours.path}, run_references(reference_script, adapter, llama3_dir, ("bf16",), tmp_path))
    assert all(t.factor == 1.0 for t in lora.adapter_tensors(adapter).tensors)


# ---------------------------------------------------------------------------------------- refusals


def _with_config(adapter: Path, dest: Path, **changes: object) -> Path:
    """A copy of an adapter folder with adapter_config.json keys changed (None removes one)."""
    shutil.copytree(adapter, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dest / "adapter_config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def llama3_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(fixtures.build_model("llama3"), tmp_path_factory.mktemp("plain") / "adapter")


def test_not_an_adapter(llama3_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model folder.*not a LoRA adapter"):
        lora.convert_adapter(llama3_dir, ["f16"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        lora.convert_adapter(tmp_path / "empty", ["f16"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_must_be_local_or_given(llama3_adapter: Path, llama3_dir: Path, tmp_path: Path) -> None:
    """A Hub id that is not in the local cache, or no base at all: a UserError naming --base; with base= it works."""
    remote = _with_config(llama3_adapter, tmp_path / "remote", base_model_name_or_path="someone/not-downloaded-model")
    with pytest.raises(UserError, match="not-downloaded-model.*--base"):
        lora.convert_adapter(remote, ["f16"], tmp_path / "out")
    unnamed = _with_config(llama3_adapter, tmp_path / "unnamed", base_model_name_or_path=None)
    with pytest.raises(UserError, match="does not name its base model.*--base"):
        lora.convert_adapter(unnamed, ["f16"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (result,) = lora.convert_adapter(remote, ["f16"], tmp_path / "out", base=llama3_dir, progress=False)
    assert result.path.name == "remote.F16.gguf"


def test_adapter_for_another_base(llama3_adapter: Path, qwen2_dir: Path, tmp_path: Path) -> None:
    """Another width fails the shape check; another family of the same shapes (the fixtures share theirs) fails on
    the architecture peft recorded."""
    with pytest.raises(UserError, match="Shape mismatch|trained on another model"):
        lora.convert_adapter(llama3_adapter, ["f16"], tmp_path / "out", base=other_base(tmp_path, 128))
    with pytest.raises(UserError, match="trained on a LlamaForCausalLM.*qwen2 model"):
        lora.convert_adapter(llama3_adapter, ["f16"], tmp_path / "out", base=qwen2_dir)
    assert not (tmp_path / "out").exists()


def test_what_a_lora_gguf_cannot_carry(qwen2_dir: Path, llama3_dir: Path, tmp_path: Path) -> None:
    """Whole-tensor copies (modules_to_save), an lm_head LoRA on tied embeddings (llama.cpp has no output
    tensor), an embedding LoRA on tied embeddings (llama.cpp would apply it to the output too and abort), DoRA,
    LoRA biases and quantized methods are UserErrors whose fix is the fused conversion."""
    cases = {
        "copies": make_adapter(llama3_dir, tmp_path / "copies", modules_to_save=["lm_head"]),
        "no output tensor": random_adapter(qwen2_dir, tmp_path / "head", ["q_proj", "lm_head"]),
        "output projection is the same": random_adapter(qwen2_dir, tmp_path / "embed", ["q_proj", "embed_tokens"]),
        "DoRA": make_adapter(qwen2_dir, tmp_path / "dora", use_dora=True),
        "LoRA biases": make_adapter(qwen2_dir, tmp_path / "bias", lora_bias=True),
    }
    for words, adapter in cases.items():
        with pytest.raises(UserError, match=words):
            lora.convert_adapter(adapter, ["f16"], tmp_path / "out")
    with pytest.raises(UserError, match="f32, f16, bf16 or q8_0.*not q4_k_m"):
        lora.convert_adapter(cases["copies"], ["q4_k_m"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_outputs_are_atomic_reused_and_never_overwrite_unasked(llama3_adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter.F16.gguf").write_text("the user's own file")
    with pytest.raises(UserError, match="already exists"):
        lora.convert_adapter(llama3_adapter, ["f16", "q8_0"], out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.F16.gguf"]
    assert (out / "adapter.F16.gguf").read_text() == "the user's own file"
    first = lora.convert_adapter(llama3_adapter, ["f16", "q8_0"], out, overwrite=True, progress=False)
    assert [r.reused for r in first] == [False, False]
    again = lora.convert_adapter(llama3_adapter, ["F16", "q8_0", "f16"], out, progress=False)
    assert [(r.method, r.reused) for r in again] == [("f16", True), ("q8_0", True)]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_activated_lora_invocation_tokens(llama3_adapter: Path, llama3_dir: Path, tmp_path: Path,
                                          reference_script: Path) -> None:
    """An aLoRA's alora_invocation_tokens become adapter.alora.invocation_tokens (uint32), as the reference writes."""
    adapter = _with_config(llama3_adapter, tmp_path / "alora", alora_invocation_tokens=[128006, 78191, 128007])
    (ours,) = lora.convert_adapter(adapter, "f16", tmp_path / "native", progress=False)
    assert_same_files({"f16": ours.path}, run_references(reference_script, adapter, llama3_dir, ("f16",), tmp_path))
    field = gguf.GGUFReader(ours.path).fields["adapter.alora.invocation_tokens"]
    assert field.contents() == [128006, 78191, 128007] and field.types[-1] == gguf.GGUFValueType.UINT32


def test_a_nan_factor_is_refused_and_leaves_nothing(llama3_adapter: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    adapter = shutil.copytree(llama3_adapter, tmp_path / "nan")
    weights = load_file(adapter / "adapter_model.safetensors")
    name = sorted(weights)[-1]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="NaN"):
        lora.convert_adapter(adapter, ["f16", "q8_0"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
