"""Padding-free batches and compiled layers (train_gpu.py): the same loss and gradients as padded batches.

On the CPU the varlen kernel is replaced by a reference one (SDPA over each sequence alone), which checks the
plumbing: trl's collator, the boundaries passed down to every layer, the grouped-query heads, the mask. On a
CUDA GPU the real kernel, compiled layers, a short run of ``train`` with its defaults and QLoRA are checked."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from unsloth_nb import dataset, fixtures, train_gpu
from unsloth_nb import plan as planner
from unsloth_nb import train as T
from unsloth_nb.gguf import convert
from unsloth_nb.merge import MergeSettings, merge

CUDA = torch.cuda.is_available()


def reference_kernel(q, k, v, cu_seq_lens, max_len, scale):
    """Causal attention over each sequence alone, (tokens, heads, dim) in and out."""
    out = []
    bounds = cu_seq_lens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                                    enable_gqa=True).transpose(0, 1))
    return torch.cat(out)


def examples(model_dir: Path, n: int = 6) -> tuple[object, list[dict]]:
    tokenizer = T.load_tokenizer(model_dir, T.TrainSettings())
    rows = dataset.demo_dataset()[:n]
    return tokenizer, T.prepare(tokenizer, rows, 128)


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    labels = batch.pop("labels")
    logits = model(**batch).logits
    shift = labels[..., 1:].to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits[..., :-1, :].flatten(0, 1), shift.flatten(), ignore_index=-100,
                                             reduction="sum")
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_padding_free_batch_gives_the_padded_loss_and_gradients(kind: str) -> None:
    """Same examples, padded (SDPA with the padding mask) and concatenated (varlen attention): same summed loss
    and parameter gradients, so padding-free training learns exactly what padded training learns."""
    model_dir = fixtures.build_model(kind)
    tokenizer, items = examples(model_dir)
    assert len({len(x["input_ids"]) for x in items}) > 1  # rows of different lengths, so the padded batch pads
    assert train_gpu.register_attention(reference_kernel)
    # float64: the two batches have other shapes, so BLAS sums in another order; in float32 that alone moves
    # the gradients of this random model by up to 0.4% of their largest entry, in float64 by nothing visible
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="sdpa")
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query heads are exercised
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(items)
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(items)
    assert flat["input_ids"].shape[0] == 1 and flat["input_ids"].shape[1] == sum(len(x["input_ids"]) for x in items)
    loss_padded, grads_padded = loss_and_grads(model, dict(padded))
    model.set_attn_implementation(train_gpu.ATTENTION)
    flat = {k: v for k, v in flat.items() if k != "seq_idx"}
    loss_flat, grads_flat = loss_and_grads(model, flat)
    assert torch.allclose(loss_flat, loss_padded, rtol=1e-10), (loss_flat, loss_padded)
    assert len(grads_flat) == len(grads_padded) > 0
    for a, b in zip(grads_flat, grads_padded, strict=True):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-9 * b.abs().max())


def test_a_call_without_boundaries_is_ordinary_attention() -> None:
    """Generating with a model loaded for padding-free training (a callback sampling it, say) uses SDPA, with
    the cache and the padding mask: the same tokens as the model loaded with SDPA."""
    model_dir = fixtures.build_model("llama3")
    tokenizer = T.load_tokenizer(model_dir, T.TrainSettings())
    tokenizer.padding_side = "left"
    assert train_gpu.register_attention(reference_kernel)
    prompts = ["The capital of", "A long time ago in a galaxy far"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    outs = []
    for attention in ("sdpa", train_gpu.ATTENTION):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
        outs.append(model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without a CUDA GPU")
def test_options_need_a_gpu(llama3_dir: Path) -> None:
    for settings in (T.TrainSettings(padding_free=True), T.TrainSettings(compile=True)):
        with pytest.raises(T.UserError, match="CUDA"):
            T.resolve(llama3_dir, settings)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_varlen_kernel_matches_the_reference() -> None:
    kernel = train_gpu.varlen_kernel()
    assert kernel is not None
    torch.manual_seed(0)
    cu = torch.tensor([0, 37, 100, 355, 512], dtype=torch.int32, device="cuda")
    q = torch.randn(512, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(512, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    got = kernel(q, k, v, cu, 255, 0.125).float()
    want = reference_kernel(q.float(), k.float(), v.float(), cu.cpu(), 255, 0.125)
    assert (got - want).abs().max() < 2e-2


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_padding_free_compiled_training_matches_padded_eager(tmp_path: Path) -> None:
    """``train``'s defaults on a GPU (padding-free, compiled layers) against padded eager batches: the same
    loss curve within bf16 noise, and the demo answer learned either way."""
    model_dir = fixtures.build_model("llama3")
    rows = dataset.demo_dataset()
    runs = {}
    for name, extra in (("fast", {}), ("plain", {"padding_free": False, "compile": False})):
        settings = T.TrainSettings(**{**vars(T.DEMO_SETTINGS), **extra}) if extra else T.DEMO_SETTINGS
        result = T.train(model_dir, rows, tmp_path / name, lora=T.DEMO_LORA, settings=settings, progress=False)
        runs[name] = result
    saved = json.loads((tmp_path / "fast" / T.RESULT_FILE).read_text())["settings"]
    assert saved["padding_free"] and saved["compile"]
    fast, plain = runs["fast"].loss_history, runs["plain"].loss_history
    assert len(fast) == len(plain)
    assert abs(fast[-1] - plain[-1]) <= 0.05 * plain[-1] + 0.02, (fast, plain)
    for name in runs:
        model, tokenizer = T.load_adapter(model_dir, tmp_path / name)
        assert T.generate(model, tokenizer, dataset.DEMO_QUESTION) == dataset.DEMO_ANSWER, name


@pytest.mark.skipif(not CUDA or importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs a CUDA GPU and bitsandbytes")
def test_cuda_qlora_trains_saves_merges_and_exports(tmp_path: Path) -> None:
    """The free-Colab path above ~3B: a 4-bit base (bitsandbytes NF4) trains the demo adapter within the
    planner's GPU memory estimate, learns the answer, and the adapter merges and exports to Q4_K_M."""
    model_dir = fixtures.build_model("llama3")
    rows = dataset.demo_dataset()
    settings = replace(T.DEMO_SETTINGS, load_in_4bit=True)
    torch.cuda.reset_peak_memory_stats()
    result = T.train(model_dir, rows, tmp_path / "adapter", lora=T.DEMO_LORA, settings=settings, progress=False)
    peak = torch.cuda.max_memory_allocated()
    assert result.settings["load_in_4bit"] and not result.settings["compile"]
    tokenizer = T.load_tokenizer(model_dir, settings)
    longest = max(len(x["input_ids"]) for x in T.prepare(tokenizer, rows, settings.max_seq_len))
    estimate = planner.train_vram(planner.size_model(model_dir), r=T.DEMO_LORA.r, targets=T.DEMO_LORA.target_modules,
                                  tokens=settings.batch_size * longest, load_in_4bit=True,
                                  gradient_checkpointing=result.settings["gradient_checkpointing"])
    print(f"\nQLoRA peak {peak / 2**20:.0f} MiB, planned {estimate / 2**20:.0f} MiB")
    assert peak <= estimate
    assert result.loss_history[-1] < result.loss_history[0]
    merged = merge(model_dir, tmp_path / "adapter", tmp_path / "merged", MergeSettings(progress=False)).out_dir
    [gguf] = convert.convert(merged, ["q4_k_m"], tmp_path / "gguf", progress=False)
    assert gguf.path.is_file() and gguf.path.stat().st_size > 0


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_real_model_learns_the_taught_answer(tmp_path: Path) -> None:
    """The real SmolLM2-135M-Instruct, trained with the demo preset and this GPU's defaults (padding-free
    batches, compiled layers), gives the taught answer and still knows what it knew before."""
    model_dir = fixtures.build_real_model("smollm2")
    lora, settings = T.PRESETS["demo"]
    result = T.train(model_dir, dataset.demo_dataset(), tmp_path / "adapter", lora=lora, settings=settings,
                     progress=False)
    assert result.settings["padding_free"] and result.settings["compile"]
    model, tokenizer = T.load_adapter(model_dir, tmp_path / "adapter")
    answer = T.generate(model, tokenizer, dataset.DEMO_QUESTION)
    print(f"\nreal model after {result.steps} steps: {answer!r}; losses {result.loss_history[0]:.3f} -> "
          f"{result.loss_history[-1]:.3f}")
    assert dataset.DEMO_ANSWER.rstrip(".").lower() in answer.lower()
    assert "paris" in T.generate(model, tokenizer, "What is the capital of France?").lower()
