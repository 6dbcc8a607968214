"""Streaming merge against peft's merge_and_unload, on the fixture models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from lora_helpers import ALL_PROJECTIONS, make_adapter, other_base
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from unsloth_nb.errors import UserError
from unsloth_nb.merge import MergeSettings, merge
from unsloth_nb.runtime import parse_size


def peft_merged(base: Path, adapter: Path, out: Path | None = None):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("modules_to_save") and (adapter / "tokenizer.json").exists():
        model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter)), mean_resizing=False)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return merged


def merged_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max())


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_merge_equals_peft_merge_and_unload(kind, tmp_path, request) -> None:
    base = request.getfixturevalue(f"{kind}_dir")
    adapter = make_adapter(base, tmp_path / "adapter")
    result = merge(base, adapter, tmp_path / "merged", MergeSettings(progress=False))
    ours = merged_tensors(result.out_dir)
    reference = peft_merged(base, adapter).state_dict()
    changed = 0
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        # fp32 adapter factors: one rounding to bf16 on both sides, so the bytes agree exactly.
        assert torch.equal(tensor, reference[name]), name
        changed += name.endswith(".weight") and any(p in name for p in ALL_PROJECTIONS)
    assert changed == 7 * json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert set(ours) == {n for n in reference if n != "lm_head.weight" or "lm_head.weight" in ours}


def test_bf16_adapter_within_one_ulp_and_logits_match(llama3_dir, tmp_path) -> None:
    adapter = make_adapter(llama3_dir, tmp_path / "adapter", dtype=torch.bfloat16)
    merged_dir = merge(llama3_dir, adapter, tmp_path / "merged", MergeSettings(progress=False)).out_dir
    reference = peft_merged(llama3_dir, adapter)
    ours = merged_tensors(merged_dir)
    state = reference.state_dict()
    # peft rounds the bf16 delta to bf16 before adding it (two roundings); we round once, from float32.
    worst = max(bf16_ulps(ours[n], state[n]) for n in ours)
    assert worst <= 1
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(merged_dir)("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ours_logits = model(ids).logits
        ref_logits = reference.float()(ids).logits
    assert (ours_logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()
    assert torch.equal(ours_logits[0, -1].topk(5).indices, ref_logits[0, -1].topk(5).indices)


def test_rslora_and_rank_alpha_patterns(llama2_dir, tmp_path) -> None:
    adapter = make_adapter(llama2_dir, tmp_path / "rs", use_rslora=True)
    ours = merged_tensors(merge(llama2_dir, adapter, tmp_path / "m1", MergeSettings(progress=False)).out_dir)
    reference = peft_merged(llama2_dir, adapter).state_dict()
    assert all(torch.equal(ours[n], reference[n]) for n in ours)

    adapter = make_adapter(llama2_dir, tmp_path / "pat", rank_pattern={"v_proj": 4},
                           alpha_pattern={"layers.1.self_attn.q_proj": 3})
    ours = merged_tensors(merge(llama2_dir, adapter, tmp_path / "m2", MergeSettings(progress=False)).out_dir)
    reference = peft_merged(llama2_dir, adapter).state_dict()
    assert all(torch.equal(ours[n], reference[n]) for n in ours)


def test_modules_to_save_on_tied_embeddings(qwen2_dir, tmp_path) -> None:
    adapter = make_adapter(qwen2_dir, tmp_path / "adapter", modules_to_save=["lm_head"])
    merged_dir = merge(qwen2_dir, adapter, tmp_path / "merged", MergeSettings(progress=False)).out_dir
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the trained lm_head is no longer the embedding
    ours = merged_tensors(merged_dir)
    reference = peft_merged(qwen2_dir, adapter)
    assert torch.equal(ours["lm_head.weight"], reference.lm_head.weight)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_added_tokens_resize_embeddings(llama3_dir, tmp_path) -> None:
    adapter = make_adapter(llama3_dir, tmp_path / "adapter", add_tokens=True,
                           modules_to_save=["embed_tokens", "lm_head"])
    merged_dir = merge(llama3_dir, adapter, tmp_path / "merged", MergeSettings(progress=False)).out_dir
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) == 128259
    ours = merged_tensors(merged_dir)
    reference = peft_merged(llama3_dir, adapter).state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert ours[name].shape[0] == 128259
        assert torch.equal(ours[name], reference[name])


def test_sharded_output_has_an_index_and_loads(llama2_dir, tmp_path) -> None:
    adapter = make_adapter(llama2_dir, tmp_path / "adapter")
    merged_dir = merge(llama2_dir, adapter, tmp_path / "merged",
                       MergeSettings(max_shard_size=parse_size("10MB"), progress=False)).out_dir
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in merged_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16)
    reference = peft_merged(llama2_dir, adapter)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                   strict=True))
    assert (merged_dir / "tokenizer.model").is_file() and (merged_dir / "chat_template.jinja").is_file()


def test_adapter_template_wins_and_quantization_config_is_dropped(llama2_dir, tmp_path) -> None:
    base = tmp_path / "base"
    shutil.copytree(llama2_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    adapter = make_adapter(llama2_dir, tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(llama2_dir)
    tokenizer.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    tokenizer.save_pretrained(adapter)
    merged_dir = merge(base, adapter, tmp_path / "merged", MergeSettings(progress=False)).out_dir
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    assert AutoTokenizer.from_pretrained(merged_dir).chat_template == tokenizer.chat_template


def test_bad_inputs_are_refused_without_touching_anything(llama2_dir, tmp_path) -> None:
    adapter = make_adapter(llama2_dir, tmp_path / "adapter")
    with pytest.raises(UserError, match=r"Shape mismatch for model\.layers\.0\..*trained on another model"):
        merge(other_base(tmp_path, 128), adapter, tmp_path / "o1", MergeSettings(progress=False))
    with pytest.raises(UserError, match="adapter_config.json"):
        merge(llama2_dir, tmp_path, tmp_path / "o2", MergeSettings(progress=False))
    with pytest.raises(UserError, match="overlaps the input folder"):
        merge(llama2_dir, adapter, adapter / "merged", MergeSettings(progress=False))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="files unsloth_nb did not write"):
        merge(llama2_dir, adapter, taken, MergeSettings(progress=False))
    assert (taken / "mine.txt").read_text() == "keep me"
    sharded = tmp_path / "sharded"
    merge(llama2_dir, adapter, sharded, MergeSettings(max_shard_size=parse_size("10MB"), progress=False))
    sorted(sharded.glob("model-*-of-*.safetensors"))[1].unlink()
    with pytest.raises(UserError, match="missing shard"):
        merge(sharded, adapter, tmp_path / "o3", MergeSettings(progress=False))
    for name in ("o1", "o2", "o3"):
        assert not (tmp_path / name).exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_merge_refused_by_the_planner_on_a_small_disk(llama2_dir, tmp_path, tmpfs) -> None:
    """A real 20 MB filesystem cannot hold the 37 MB merged model: refused before anything is written."""
    adapter = make_adapter(llama2_dir, tmp_path / "adapter")
    disk = tmpfs(20 * 2**20)
    with pytest.raises(UserError, match="short"):
        merge(llama2_dir, adapter, disk / "merged", MergeSettings(progress=False))
    assert list(disk.iterdir()) == []


def test_hub_id_resolves_to_the_local_cache(llama2_dir, tmp_path, monkeypatch) -> None:
    """A Hub id ("org/name") is read from the Hugging Face cache, never downloaded."""
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / "abc123"
    shutil.copytree(llama2_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    adapter = make_adapter(llama2_dir, tmp_path / "adapter")
    by_id = merge("tiny-org/tiny-llama", adapter, tmp_path / "by_id", MergeSettings(progress=False))
    by_folder = merge(llama2_dir, adapter, tmp_path / "by_folder", MergeSettings(progress=False))
    assert by_id.shards[0].read_bytes() == by_folder.shards[0].read_bytes()
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        merge("tiny-org/absent", adapter, tmp_path / "o", MergeSettings(progress=False))
