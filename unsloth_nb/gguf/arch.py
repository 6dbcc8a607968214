"""Per-architecture rules for the native GGUF writer: which HF architectures we write, their hyper-parameter
keys, tensor names and the tensor transforms llama.cpp expects.

The values follow what llama.cpp's reference converter (``convert_hf_to_gguf.py``) writes for the same model,
so that a file from either writer loads the same way in llama.cpp, transformers and vLLM.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from unsloth_nb.errors import UserError
from unsloth_nb.gguf.recipes import ModelShape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    """How one family of HF architectures maps to GGUF."""

    gguf_arch: gguf.MODEL_ARCH
    """The GGUF architecture (its name prefixes every hyper-parameter key)."""
    permute_qk: bool
    """Llama-style (NORM) rope: interleave the two halves of every q/k head, as llama.cpp expects."""
    vocab_order: tuple[str, ...]
    """Tokenizer readers to try in order: "sentencepiece" (tokenizer.model), "llama_hf", "gpt2"."""
    reads_add_prefix_space: bool
    """Whether tokenizer_config's add_prefix_space is written as tokenizer.ggml.add_space_prefix."""
    writes_vocab_size: bool
    """Whether ``<arch>.vocab_size`` and ``<arch>.rope.dimension_count`` are written (Llama family)."""
    llama3_rope_freqs: bool
    """Whether rope_type "llama3" adds the ``rope_freqs`` tensor."""
    norm_shift: bool = False
    """Gemma: HF RMSNorms scale by ``1 + weight``, llama.cpp by ``weight``, so 1 is added to every
    ``*norm.weight`` (see ``transform``)."""
    drops_lm_head: bool = False
    """Gemma 2: ``lm_head.weight`` is never written (the embeddings are always tied in llama.cpp)."""
    trims_token_embd: bool = False
    """Gemma 3: ``token_embd`` keeps only the tokenizer's rows (see ``token_rows``)."""
    no_bos_vocab_size: int | None = None
    """Llama: a model with exactly this vocabulary size (49152: IBM Granite's small models and SmolLM) gets
    ``tokenizer.ggml.add_bos_token = false`` after its tokenizer keys, whatever its tokenizer files say."""

    @property
    def name(self) -> str:
        """GGUF architecture name, e.g. "llama"."""
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


_LLAMA = Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, vocab_order=("sentencepiece", "llama_hf", "gpt2"),
              reads_add_prefix_space=True, writes_vocab_size=True, llama3_rope_freqs=True, no_bos_vocab_size=49152)
_QWEN2 = Arch(gguf.MODEL_ARCH.QWEN2, permute_qk=False, vocab_order=("sentencepiece", "gpt2"),
              reads_add_prefix_space=False, writes_vocab_size=False, llama3_rope_freqs=False)
_QWEN3 = Arch(gguf.MODEL_ARCH.QWEN3, permute_qk=False, vocab_order=("sentencepiece", "gpt2"),
              reads_add_prefix_space=False, writes_vocab_size=False, llama3_rope_freqs=False)
_GEMMA2 = Arch(gguf.MODEL_ARCH.GEMMA2, permute_qk=False, vocab_order=("gemma_sentencepiece",),
               reads_add_prefix_space=False, writes_vocab_size=False, llama3_rope_freqs=False,
               norm_shift=True, drops_lm_head=True)
_GEMMA3 = Arch(gguf.MODEL_ARCH.GEMMA3, permute_qk=False, vocab_order=("gemma_sentencepiece", "gpt2"),
               reads_add_prefix_space=False, writes_vocab_size=False, llama3_rope_freqs=False,
               norm_shift=True, trims_token_embd=True)
_PHI3 = Arch(gguf.MODEL_ARCH.PHI3, permute_qk=False, vocab_order=("phi3",),
             reads_add_prefix_space=False, writes_vocab_size=False, llama3_rope_freqs=False)

ARCHITECTURES: dict[str, Arch] = {
    "LlamaForCausalLM": _LLAMA,
    "LLaMAForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _QWEN2,
    "Qwen3ForCausalLM": _QWEN3,
    "Gemma2ForCausalLM": _GEMMA2,
    "Gemma3ForCausalLM": _GEMMA3,
    "Gemma3ForConditionalGeneration": _GEMMA3,
    "Phi3ForCausalLM": _PHI3,
}
"""HF ``architectures[0]`` -> rules. Everything else goes through ``--backend llama.cpp``."""


def load_hparams(model_dir: Path) -> dict[str, Any]:
    """config.json as transformers completes it (defaults filled in, as the reference converter reads it)."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{model_dir} has no config.json, so it is not a Hugging Face model folder. Fix: pass the folder "
            "that holds config.json and the *.safetensors weights (for example the output of the merge step)."
        )
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{config_file} could not be read as JSON ({exc}). Fix: restore the model's config.json."
        ) from exc
    try:
        from transformers import AutoConfig

        hparams = AutoConfig.from_pretrained(model_dir, trust_remote_code=False).to_dict()
    except Exception as exc:  # an unknown model_type is fine: the raw file is what the reference falls back to
        logger.debug("transformers could not read %s (%s); using the raw config.json", config_file, exc)
        hparams = raw
    if "text_config" in hparams:
        top = hparams.get("architectures")
        hparams = {**hparams, **hparams["text_config"]}
        if not hparams.get("architectures"):  # a text_config without its own keeps the model's (Gemma 3)
            hparams["architectures"] = top
    return hparams


def architecture_name(hparams: dict[str, Any]) -> str:
    """The HF architecture class name of a config (``architectures[0]``)."""
    arches = hparams.get("text_config", {}).get("architectures") or hparams.get("architectures") or []
    return arches[0] if arches else str(hparams.get("model_type", "unknown"))


def find_arch(hparams: dict[str, Any], model_dir: Path) -> Arch:
    """The rules for a config, or a UserError that names the architecture and the alternatives."""
    name = architecture_name(hparams)
    if name in ARCHITECTURES:
        if not _is_reranker(hparams, model_dir):
            return ARCHITECTURES[name]
        name = f"{name} as a reranker"
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UserError(
        f"The native GGUF writer does not support the architecture {name}. It writes: {supported}. Fix: "
        "convert with llama.cpp's own converter instead (`--backend llama.cpp`), which supports many more."
    )


def _is_reranker(hparams: dict[str, Any], model_dir: Path) -> bool:
    """Qwen3 rerankers get a classifier head and pooling keys from llama.cpp: left to its converter."""
    readme = model_dir / "README.md"
    text = readme.read_text(encoding="utf-8", errors="replace").lower() if readme.is_file() else ""
    hints = " ".join(str(h).lower() for h in (model_dir.name, hparams.get("_name_or_path", "")))
    return "reranker" in hints or "# qwen3-reranker" in text or "# qwen3-vl-reranker" in text


def find_hparam(hparams: dict[str, Any], keys: Iterable[str]) -> Any:
    """The value of the first of ``keys`` present in the config (None when none is), as the reference reads it."""
    return next((hparams[k] for k in keys if k in hparams), None)


def block_count(hparams: dict[str, Any]) -> int:
    """Number of transformer blocks."""
    return int(find_hparam(hparams, ["n_layers", "num_hidden_layers", "n_layer", "num_layers"]))


def rope_parameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """The rope settings in one dict (``rope_parameters`` or ``rope_scaling``, completed from top-level keys)."""
    rope = dict(hparams.get("rope_parameters", hparams.get("rope_scaling")) or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        return rope
    theta = find_hparam(hparams, ["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                                  "rotary_emb_base"])
    local_theta = find_hparam(hparams, ["local_rope_theta", "rope_local_theta", "rope_theta_local",
                                        "swa_rope_theta", "rope_local_base_freq"])
    partial = find_hparam(hparams, ["partial_rotary_factor", "rope_pct", "rope_percent"])
    orig_ctx = find_hparam(hparams, ["original_max_position_embeddings"])
    if local_theta is not None:
        rope["sliding_attention"] = {"rope_theta": local_theta}
    if "rope_theta" not in rope and theta is not None:
        rope["rope_theta"] = theta
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = rope["type"]
    if "partial_rotary_factor" not in rope and partial is not None:
        rope["partial_rotary_factor"] = partial
    if "original_max_position_embeddings" not in rope and orig_ctx is not None:
        rope["original_max_position_embeddings"] = orig_ctx
    return rope


def model_shape(hparams: dict[str, Any], gguf_names: Iterable[str]) -> ModelShape:
    """The facts llama.cpp's type mix needs from a config and the GGUF tensor names."""
    n_head = find_hparam(hparams, ["num_attention_heads", "n_head", "n_heads"])
    return ModelShape(n_layer=block_count(hparams), n_head=n_head,
                      n_head_kv=find_hparam(hparams, ["num_key_value_heads", "n_kv_heads"]) or n_head,
                      has_output="output.weight" in set(gguf_names))


def head_dim(hparams: dict[str, Any]) -> int:
    """Per-head size: ``head_dim`` when given, else hidden_size / num_attention_heads."""
    return hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]


def write_hparams(writer: gguf.GGUFWriter, arch: Arch, hparams: dict[str, Any], file_type: int) -> None:
    """The ``<arch>.*`` hyper-parameter keys and ``general.file_type``, in the reference's order."""
    if arch.gguf_arch == gguf.MODEL_ARCH.GEMMA2:
        _gemma2_hparams(writer, hparams, file_type)
    elif arch.gguf_arch == gguf.MODEL_ARCH.PHI3:
        _phi3_hparams(writer, hparams, file_type)
    else:
        _text_hparams(writer, arch, hparams, file_type)
        if arch.gguf_arch == gguf.MODEL_ARCH.GEMMA3:
            _gemma3_hparams(writer, hparams)


def _text_hparams(writer: gguf.GGUFWriter, arch: Arch, hparams: dict[str, Any], file_type: int) -> None:
    """The keys every text model gets from the reference (its ``TextModel.set_gguf_parameters``)."""
    writer.add_block_count(block_count(hparams))
    keys = {
        writer.add_context_length: ["max_position_embeddings", "n_ctx", "n_positions", "max_length",
                                    "max_sequence_length", "model_max_length"],
        writer.add_embedding_length: ["hidden_size", "n_embd", "dim"],
        writer.add_feed_forward_length: ["prefix_dense_intermediate_size", "dense_intermediate_size",
                                         "intermediate_size", "n_inner", "hidden_dim"],
        writer.add_head_count: ["num_attention_heads", "n_head", "n_heads"],
        writer.add_head_count_kv: ["num_key_value_heads", "n_kv_heads"],
    }
    for add, names in keys.items():
        if (value := find_hparam(hparams, names)) is not None:
            add(value)
    if hparams.get("is_causal") is False:
        writer.add_causal_attention(False)

    rope = rope_parameters(hparams)
    params = rope.get("full_attention", rope)
    rope_type = params.get("rope_type")
    factor = params.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        for add, names in ((writer.add_rope_scaling_yarn_ext_factor, ["extrapolation_factor"]),
                           (writer.add_rope_scaling_yarn_attn_factor, ["attention_factor", "attn_factor"]),
                           (writer.add_rope_scaling_yarn_beta_fast, ["beta_fast"]),
                           (writer.add_rope_scaling_yarn_beta_slow, ["beta_slow"])):
            if (value := find_hparam(params, names)) is not None:
                add(value)
    elif rope_type in ("su", "longrope"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif rope_type is not None and rope_type.lower() not in ("llama3", "dynamic", "default"):
        logger.warning("unknown rope type %r: written without rope scaling keys", rope_type)
    if (theta := params.get("rope_theta")) is not None:
        writer.add_rope_freq_base(theta)
    if (local_theta := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        writer.add_rope_freq_base_swa(local_theta)
    if (eps := find_hparam(hparams, ["rms_norm_eps", "norm_eps"])) is not None:
        writer.add_layer_norm_rms_eps(eps)
    if (eps := find_hparam(hparams, ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])) is not None:
        writer.add_layer_norm_eps(eps)
    if (dim := hparams.get("head_dim")) is not None:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    writer.add_file_type(file_type)
    if arch.writes_vocab_size:
        writer.add_vocab_size(hparams["vocab_size"])
        writer.add_rope_dimension_count(head_dim(hparams))


def _gemma2_hparams(writer: gguf.GGUFWriter, hparams: dict[str, Any], file_type: int) -> None:
    """Gemma 2's own key list: no rope keys, soft-capping of attention and final logits, sliding window."""
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_block_count(block_count(hparams))
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams.get("num_key_value_heads", hparams["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    writer.add_key_length(hparams["head_dim"])
    writer.add_value_length(hparams["head_dim"])
    writer.add_file_type(file_type)
    writer.add_attn_logit_softcapping(hparams["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(hparams["final_logit_softcapping"])
    writer.add_sliding_window(hparams["sliding_window"])


def _gemma3_hparams(writer: gguf.GGUFWriter, hparams: dict[str, Any]) -> None:
    """Gemma 3's keys on top of the text-model ones: defaults for absent values (an overwritten key keeps
    its place), the global rope base (default 1e6), optional final soft-capping, the sliding window."""
    gguf_logger = logging.getLogger("gguf.gguf_writer")  # its "Duplicated key name" warnings are expected here
    level = gguf_logger.level
    gguf_logger.setLevel(logging.ERROR)
    try:
        writer.add_context_length(hparams.get("max_position_embeddings", 131072))
        writer.add_head_count(hparams.get("num_attention_heads", 8))
        writer.add_layer_norm_rms_eps(hparams.get("rms_norm_eps", 1e-6))
        writer.add_key_length(hparams.get("head_dim", 256))
        writer.add_value_length(hparams.get("head_dim", 256))
        rope = rope_parameters(hparams)
        writer.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
        if hparams.get("attn_logit_softcapping") is not None:
            raise UserError("This Gemma 3 config sets attn_logit_softcapping, which Gemma 3 does not have. Fix: "
                            "restore the model's original config.json.")
        if final := hparams.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(final)
        if hparams.get("sliding_window_pattern") != 1:
            writer.add_sliding_window(hparams["sliding_window"])
        writer.add_head_count_kv(hparams.get("num_key_value_heads", 4))
    finally:
        gguf_logger.setLevel(level)


def _phi3_rope_dims(hparams: dict[str, Any]) -> int:
    """Rotary dimensions per head: the partial rotary factor of the head size."""
    n_embd = find_hparam(hparams, ["hidden_size", "n_embd"])
    n_head = find_hparam(hparams, ["num_attention_heads", "n_head"])
    return int(rope_parameters(hparams).get("partial_rotary_factor", 1.0) * n_embd) // n_head


def _phi3_hparams(writer: gguf.GGUFWriter, hparams: dict[str, Any], file_type: int) -> None:
    """Phi-3's own key list (no rope scaling type: llama.cpp sees longrope from the rope_factors tensors);
    a sliding window of 0 means none. The longrope attention factor goes first, as the reference writes
    it while generating the rope_factors tensors, before any general.* key."""
    rope = rope_parameters(hparams)
    n_ctx = find_hparam(hparams, ["n_positions", "max_position_embeddings"])
    writer.add_context_length(n_ctx)
    writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings", n_ctx))
    writer.add_embedding_length(find_hparam(hparams, ["hidden_size", "n_embd"]))
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_block_count(block_count(hparams))
    writer.add_head_count(find_hparam(hparams, ["num_attention_heads", "n_head"]))
    writer.add_head_count_kv(find_hparam(hparams, ["num_key_value_heads", "n_head_kv"]))
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    writer.add_rope_dimension_count(_phi3_rope_dims(hparams))
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    writer.add_file_type(file_type)
    writer.add_sliding_window(hparams.get("sliding_window") or 0)
    if (factor := _phi3_attn_factor(hparams)) is not None:
        writer.add_rope_scaling_attn_factors(factor)
        key = gguf.Keys.Rope.SCALING_ATTN_FACTOR.format(arch=writer.arch)
        kv = writer.kv_data[0]
        items = list(kv.items())
        kv.clear()
        kv.update([items[0], (key, dict(items)[key]), *(i for i in items[1:] if i[0] != key)])


def _phi3_attn_factor(hparams: dict[str, Any]) -> float | None:
    """The longrope/yarn attention factor of a Phi-3 with long-context rope factors, else None."""
    rope = rope_parameters(hparams)
    if not rope.get("long_factor"):
        return None
    n_ctx = find_hparam(hparams, ["n_positions", "max_position_embeddings"])
    orig = rope.get("original_max_position_embeddings", n_ctx)
    scale = n_ctx / orig
    kind = str(rope.get("rope_type", "")).lower()
    if kind in ("su", "longrope"):
        return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    if kind == "yarn":
        return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    raise UserError(f"This Phi-3 config has long-context rope factors with rope type {kind or 'missing'!r}, which "
                    "the native writer does not know. Fix: convert with `--backend llama.cpp`.")


def generated_tensors(arch: Arch, hparams: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """Tensors llama.cpp needs that the checkpoint does not hold (float32, written first):
    Llama 3's ``rope_freqs``, Phi-3's longrope ``rope_factors_long`` / ``rope_factors_short``."""
    out = []
    if (freqs := rope_freqs(arch, hparams)) is not None:
        out.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs))
    if arch.gguf_arch == gguf.MODEL_ARCH.PHI3 and _phi3_attn_factor(hparams) is not None:
        rope = rope_parameters(hparams)
        long, short = rope.get("long_factor"), rope.get("short_factor")
        half = _phi3_rope_dims(hparams) / 2
        if short is None or len(long) != len(short) or len(long) != half:
            raise UserError(f"The rope long_factor/short_factor lists of this Phi-3 config must both have {half:g} "
                            "values. Fix: restore the model's original config.json.")
        for key, factors in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, long),
                             (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, short)):
            out.append((gguf.TENSOR_NAMES[key] + ".weight", torch.tensor(factors, dtype=torch.float32)))
    return out


def transform(arch: Arch, hf_name: str, x: torch.Tensor) -> torch.Tensor:
    """A tensor (rows of it) in its stored dtype, changed as the reference changes it before the float32 cast.

    Gemma's norms get 1 added, with the reference's rounding: it casts bf16 (any type but f16/f32) to float32
    first and adds in float32, but adds to f16 and f32 tensors in their own type.
    """
    if arch.norm_shift and hf_name.endswith("norm.weight"):
        if x.dtype not in (torch.float16, torch.float32):
            x = x.to(torch.float32)
        x = x + 1
    return x


def untransform(arch: Arch, hf_name: str | None, x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`transform` on float32 values (a GGUF's tensor back in HF terms)."""
    if arch.norm_shift and hf_name is not None and hf_name.endswith("norm.weight"):
        return x - 1
    return x


def token_rows(arch: Arch, hparams: dict[str, Any], tokenizer_dir: Path) -> int | None:
    """Gemma 3: rows of ``token_embd`` to keep, the tokenizer's size (out-of-vocabulary rows are dropped);
    None when the whole tensor is written."""
    if not arch.trims_token_embd:
        return None
    if (tokenizer_dir / "tokenizer.model").is_file():
        n = hparams.get("vocab_size_per_layer_input") or hparams.get("vocab_size")
        if n:
            return int(n)
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor()
        sp.LoadFromFile(str(tokenizer_dir / "tokenizer.model"))
        return sp.vocab_size()
    from unsloth_nb.checkpoint import read_json

    tokenizer = read_json(tokenizer_dir / "tokenizer.json")
    return len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"])


def rope_freqs(arch: Arch, hparams: dict[str, Any]) -> torch.Tensor | None:
    """Llama 3 rope scaling factors per frequency (the ``rope_freqs`` tensor), or None when not used."""
    rope = rope_parameters(hparams)
    params = rope.get("full_attention", rope)
    if not arch.llama3_rope_freqs or not params or str(params.get("rope_type", "")).lower() != "llama3":
        return None
    base = params.get("rope_theta", 10000.0)
    dim = head_dim(hparams)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low = params.get("low_freq_factor", 1.0)
    high = params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors: list[float] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


_SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


_MULTIMODAL_PREFIXES = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
                        "sound_projection.", "speech_embeddings.")
_MULTIMODAL_PARTS = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.",
                     "projector.", "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed",
                     "patch_embedding", "patch_merger.", "patch_merge_mlp.", "model.connector.")


def is_text_tensor(hf_name: str) -> bool:
    """False for the vision/audio tower tensors of a multimodal checkpoint, which a text GGUF leaves out
    (the reference's rule; e.g. Gemma 3's ``model.vision_tower.*`` and ``model.multi_modal_projector.*``)."""
    return not (hf_name.startswith(_MULTIMODAL_PREFIXES) or any(p in hf_name for p in _MULTIMODAL_PARTS))


def gguf_tensor_name(arch: Arch, hf_name: str, n_blocks: int) -> str | None:
    """The GGUF name of an HF tensor, or None for tensors llama.cpp drops (rotary caches, vision towers)."""
    name = hf_name.replace("language_model.", "").replace("text_model.", "")
    if name.endswith(_SKIPPED_SUFFIXES) or not is_text_tensor(hf_name):
        return None
    if arch.drops_lm_head and hf_name == "lm_head.weight":
        return None
    new = _name_map(arch.gguf_arch, n_blocks).get_name(name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise UserError(
            f"The tensor {hf_name!r} has no GGUF name for the {arch.name} architecture, so this checkpoint "
            "holds something the native writer does not know. Fix: convert with `--backend llama.cpp`."
        )
    return new


@functools.lru_cache(maxsize=4)
def _name_map(gguf_arch: gguf.MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    """gguf-py's HF -> GGUF name table (building it takes ~7 ms, so once per model, not per tensor)."""
    return gguf.get_tensor_name_map(gguf_arch, n_blocks)


def qk_heads(arch: Arch, hf_name: str, hparams: dict[str, Any]) -> int | None:
    """Heads to permute q/k rows over (Llama rope layout), or None when the tensor is left as it is."""
    if not arch.permute_qk:
        return None
    n_head = find_hparam(hparams, ["n_heads", "num_attention_heads"])
    n_kv = find_hparam(hparams, ["n_kv_heads", "num_key_value_heads"])
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return n_head
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return n_kv if n_kv is not None and n_kv != n_head else n_head
    return None


def unpermute_qk(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk` (llama.cpp's layout -> HF's)."""
    return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def permute_qk(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Interleave the two rotary halves of each head's rows (HF layout -> llama.cpp's NORM rope layout)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))
