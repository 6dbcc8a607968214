"""verify: a correct export passes, deliberately broken ones are flagged with a hint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from lora_helpers import make_adapter
from safetensors.torch import load_file, save_file

from unsloth_nb.gguf import convert
from unsloth_nb.merge import MergeSettings, merge
from unsloth_nb.verify import verify

PROMPTS = ["Name a colour.", "What is two plus two?"]


@pytest.fixture(scope="module")
def exported(llama2_dir, tmp_path_factory):
    """A random LoRA adapter on the llama2 fixture, its correct merge and the GGUFs of that merge."""
    work = tmp_path_factory.mktemp("verify")
    adapter = make_adapter(llama2_dir, work / "adapter")
    merged = merge(llama2_dir, adapter, work / "merged", MergeSettings(progress=False)).out_dir
    ggufs = {r.method: r.path for r in convert.convert(merged, ["bf16", "q8_0"], work / "gguf", progress=False)}
    return work, adapter, merged, ggufs


def test_correct_exports_pass(llama2_dir, exported) -> None:
    _, adapter, merged, ggufs = exported
    report = verify(llama2_dir, [merged, ggufs["bf16"], ggufs["q8_0"]], adapter=adapter, prompts=PROMPTS)
    print(report)
    assert report.ok, str(report)
    merged_report, bf16, q8 = report.artifacts
    assert [a.method for a in report.artifacts] == ["merged", "bf16", "q8_0"]  # read from general.file_type
    assert merged_report.top1 >= 0.99 and bf16.top1 >= 0.98
    assert q8.logit_error > bf16.logit_error  # q8_0 loses a little more than bf16
    assert all(a.answers and all(a.answers) for a in report.artifacts)  # greedy text from every artifact


def test_wrong_scaling_is_flagged(llama2_dir, exported) -> None:
    work, adapter, _, _ = exported
    doubled = work / "adapter-alpha-x2"
    shutil.copytree(adapter, doubled)
    config = json.loads((doubled / "adapter_config.json").read_text())
    config["lora_alpha"] *= 2
    (doubled / "adapter_config.json").write_text(json.dumps(config))
    wrong = merge(llama2_dir, doubled, work / "merged-x2", MergeSettings(progress=False)).out_dir
    report = verify(llama2_dir, [wrong], adapter=adapter, prompts=PROMPTS)
    print(report)
    assert not report.ok
    assert any("scaling" in p or "thresholds" in p for p in report.artifacts[0].problems)


def test_swapped_tensors_are_flagged(llama2_dir, exported) -> None:
    work, adapter, merged, _ = exported
    swapped = work / "merged-swapped"
    shutil.copytree(merged, swapped)
    tensors = load_file(swapped / "model.safetensors")
    a, b = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"
    tensors[a], tensors[b] = tensors[b], tensors[a]
    save_file(tensors, swapped / "model.safetensors", metadata={"format": "pt"})
    report = verify(llama2_dir, [swapped], adapter=adapter, prompts=PROMPTS)
    assert not report.artifacts[0].ok


def test_wrong_template_is_flagged(llama2_dir, exported) -> None:
    work, adapter, merged, _ = exported
    other = work / "merged-template"
    shutil.copytree(merged, other)
    (other / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    gguf_path = convert.convert(other, ["bf16"], work / "gguf-template", progress=False)[0].path
    report = verify(llama2_dir, [other, gguf_path], adapter=adapter, prompts=PROMPTS)
    for artifact in report.artifacts:
        assert not artifact.ok
        assert any("chat template" in p for p in artifact.problems)


def test_cli_exit_status(llama2_dir, exported) -> None:
    _, adapter, merged, ggufs = exported
    ok = subprocess.run([sys.executable, "-m", "unsloth_nb", "verify", str(llama2_dir), str(ggufs["q8_0"]),
                         "--adapter", str(adapter)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "Q8_0" in ok.stdout or "q8_0" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "unsloth_nb", "verify", str(llama2_dir), str(merged / "config.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
