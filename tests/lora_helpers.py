"""Random LoRA adapters saved exactly as peft saves them (shared by the merge, GGUF and verify tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, dtype=torch.float32, seed: int = 0, **lora) -> Path:
    """A peft adapter with random non-zero A and B (as after training), saved the way peft saves it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    if lora.pop("add_tokens", False):
        tokenizer = AutoTokenizer.from_pretrained(base)
        tokenizer.add_tokens(["<|tool|>", "<|memo|>", "<|z|>"])
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        tokenizer.save_pretrained(out)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS, init_lora_weights=False, **lora)
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            with torch.no_grad():
                param.copy_((torch.randn_like(param, dtype=torch.float32) * 0.05).to(dtype))
                if "lora_" in name:
                    param.data = param.data.to(dtype)
    peft_model.save_pretrained(out)
    return out


def other_base(tmp_path: Path, hidden: int) -> Path:
    """A Llama-shaped base of another width (the fixtures all share one width): adapters do not fit it."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path / f"base{hidden}"
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder
