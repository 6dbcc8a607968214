"""The real SmolLM2-135M-Instruct (from PyPI, see fixtures.build_real_model), fine-tuned with our own train:
every method's file equals llama.cpp's, verify calls no file of llama.cpp's broken, and catches what it exists for
(an adapter merged at twice its scaling, an export of the base without the adapter, swapped tensors, a missing
chat template, a doubled BOS) on real weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gguf
import pytest
from safetensors.torch import load_file, save_file

from unsloth_nb import dataset, fixtures, train, verify
from unsloth_nb.gguf import convert, header, llamacpp
from unsloth_nb.merge import MergeSettings, merge

pytestmark = pytest.mark.slow

LLAMA_QUANTIZE = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
PROMPTS = [dataset.DEMO_QUESTION, "What is the capital of France?"]


def reference_convert(model: Path, outtype: str, out: Path) -> Path:
    tree = llamacpp.source_tree()
    subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model), "--outtype", outtype,
                    "--outfile", str(out)], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(tree / "gguf-py")))
    return out


def llama_quantize(source: Path, method: str, out: Path) -> Path:
    subprocess.run([str(llamacpp.tool("llama-quantize")), str(source), str(out), method, "2"], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Path]:
    """The real base, an adapter trained on the demo data with our train (12 steps), its merge, and llama.cpp's
    own files of the merge: its converter's BF16, then every method from it with llama-quantize."""
    root = tmp_path_factory.mktemp("real")
    base = fixtures.build_real_model("smollm2")
    lora, settings = train.PRESETS["demo"]
    adapter = train.train(base, dataset.DEMO_DATA, root / "adapter", lora=lora,
                          settings=replace(settings, max_steps=12), progress=False).adapter_dir
    merged = merge(base, adapter, root / "merged", MergeSettings(progress=False)).out_dir
    (root / "llamacpp").mkdir()
    bf16 = reference_convert(merged, "bf16", root / "llamacpp" / "merged.BF16.gguf")
    files = {"BF16": bf16, **{m: llama_quantize(bf16, m, root / "llamacpp" / f"merged.{m}.gguf")
                              for m in LLAMA_QUANTIZE}}
    return {"root": root, "base": base, "adapter": adapter, "merged": merged, **files}


def test_every_method_equals_llamacpps_file(real) -> None:
    """16-bit and Q8_0 straight from the folder: the same bytes as llama.cpp's converter. K-quants: the same
    key/values and, tensor by tensor, the same type, shape and bytes as llama-quantize from llama.cpp's BF16
    (llama-quantize orders keys and tensors its own way)."""
    methods = ["bf16", "f16", "q8_0", *(m.lower() for m in LLAMA_QUANTIZE[1:])]
    ours = {r.method: r.path for r in convert.convert(real["merged"], methods, real["root"] / "ours", progress=False)}
    for outtype in ("bf16", "f16", "q8_0"):
        theirs = reference_convert(real["merged"], outtype, real["root"] / f"reference.{outtype}.gguf")
        assert ours[outtype].read_bytes() == theirs.read_bytes(), outtype
    for method in LLAMA_QUANTIZE[1:]:
        a, b = header.read(ours[method.lower()]), header.read(real[method])
        assert a.entries == b.entries, method
        ra, rb = gguf.GGUFReader(ours[method.lower()]), gguf.GGUFReader(real[method])
        theirs_by_name = {t.name: t for t in rb.tensors}
        assert sorted(theirs_by_name) == sorted(t.name for t in ra.tensors)
        for t in ra.tensors:
            other = theirs_by_name[t.name]
            assert (t.tensor_type, t.shape.tolist()) == (other.tensor_type, other.shape.tolist()), (method, t.name)
            assert t.data.tobytes() == other.data.tobytes(), (method, t.name)


@pytest.fixture(scope="module")
def correct_report(real) -> verify.VerifyReport:
    files = [real["merged"], real["BF16"], *(real[m] for m in LLAMA_QUANTIZE)]
    return verify.verify(real["base"], files, adapter=real["adapter"], prompts=PROMPTS)


def test_no_file_of_llamacpps_is_called_broken(correct_report) -> None:
    print(correct_report)
    assert [a.method for a in correct_report.artifacts] == ["merged", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m",
                                                            "q3_k_m", "q2_k"]
    assert correct_report.ok, str(correct_report)
    for a in correct_report.artifacts:
        assert a.weight_error <= 1 and a.adapter_kept is not None
    runtime = {a.method: a.runtime_kl for a in correct_report.artifacts if a.runtime_kl is not None}
    assert runtime["bf16"] < runtime["q2_k"]  # llama.cpp's 8-bit activations for quantized matrices cost more
    assert correct_report.artifacts[-1].kl > correct_report.artifacts[1].kl  # q2_k costs more than bf16


@pytest.fixture(scope="module")
def faults(real) -> dict[str, Path]:
    """One broken export per cause verify exists for, made from the real fine-tune."""
    root = real["root"] / "faults"
    root.mkdir()
    doubled = root / "adapter-x2"
    shutil.copytree(real["adapter"], doubled)
    config = json.loads((doubled / "adapter_config.json").read_text())
    config["lora_alpha"] *= 2
    (doubled / "adapter_config.json").write_text(json.dumps(config))
    out = {"scaling": merge(real["base"], doubled, root / "merged-x2", MergeSettings(progress=False)).out_dir}
    out["base"] = convert.convert(real["base"], ["q8_0"], root / "base", progress=False)[0].path
    swapped = root / "swapped"
    shutil.copytree(real["merged"], swapped)
    (swapped / ".unsloth_nb_manifest.json").unlink()
    tensors = load_file(swapped / "model.safetensors")
    a, b = "model.layers.3.mlp.down_proj.weight", "model.layers.4.mlp.down_proj.weight"
    tensors[a], tensors[b] = tensors[b], tensors[a]
    save_file(tensors, swapped / "model.safetensors", metadata={"format": "pt"})
    out["swapped"] = swapped
    untemplated = root / "no-template"
    shutil.copytree(real["merged"], untemplated)
    (untemplated / ".unsloth_nb_manifest.json").unlink()
    (untemplated / "chat_template.jinja").unlink()
    out["template"] = convert.convert(untemplated, ["q8_0"], root / "no-template-gguf", progress=False)[0].path
    doubled_bos = root / "bos"
    shutil.copytree(real["merged"], doubled_bos)
    (doubled_bos / ".unsloth_nb_manifest.json").unlink()
    template = doubled_bos / "chat_template.jinja"  # SmolLM2's BOS is <|im_start|>, which ChatML writes itself
    template.write_text("{{ bos_token }}" + template.read_text())
    bos = convert.convert(doubled_bos, ["q8_0"], root / "bos-gguf", progress=False)[0].path
    out["bos"] = bos
    return out


@pytest.fixture(scope="module")
def fault_report(real, faults) -> dict[str, verify.ArtifactReport]:
    report = verify.verify(real["base"], list(faults.values()), adapter=real["adapter"], prompts=PROMPTS)
    print(report)
    return dict(zip(faults, report.artifacts, strict=True))


def test_doubled_scaling_is_caught(fault_report) -> None:
    a = fault_report["scaling"]
    assert not a.ok and a.adapter_kept > 1.5
    assert any("wrong scaling" in p for p in a.problems)


def test_export_of_the_base_without_the_adapter_is_caught(fault_report) -> None:
    a = fault_report["base"]
    assert not a.ok and abs(a.adapter_kept) < 0.25
    assert any("without the adapter" in p for p in a.problems)


def test_swapped_tensors_are_caught(fault_report) -> None:
    a = fault_report["swapped"]
    assert not a.ok and a.weight_error > 10
    assert any("layers.4.mlp.down_proj" in p or "layers.3.mlp.down_proj" in p for p in a.problems)


def test_missing_chat_template_is_caught(fault_report) -> None:
    a = fault_report["template"]
    assert a.problems == [p for p in a.problems if "chat template" in p] and a.problems


def test_doubled_bos_is_caught(fault_report) -> None:
    a = fault_report["bos"]
    assert any("doubled BOS" in p for p in a.problems)
