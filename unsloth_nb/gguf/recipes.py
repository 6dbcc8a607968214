"""The quantization methods users pick, and which GGML type each tensor gets under each method.

A method (q4_k_m, q8_0, bf16, ...) is a base type plus llama.cpp's per-tensor mix: the output
projection and the more sensitive attn_v / ffn_down tensors get more bits, norms and other 1-D
tensors stay F32, and a row length the base type cannot hold falls back to a 32-element type.
``tensor_type`` reproduces the choice made by llama.cpp's ``llama-quant.cpp`` (with or without an importance
matrix, no overrides) for dense models, so our files carry the same types as ``llama-quantize`` output.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from unsloth_nb.errors import UserError


@dataclass(frozen=True)
class Method:
    """One quantization method: a llama.cpp file type ("ftype") with its tensor-type mix."""

    name: str
    """Lower-case name users type, as llama-quantize spells it (``q4_k_m``)."""
    description: str
    """One sentence for newcomers: size/quality trade-off."""
    base_type: T
    """The type most 2-D weight tensors get."""
    file_type: int
    """llama.cpp's ``llama_ftype`` id, written to ``general.file_type``."""
    aliases: tuple[str, ...] = ()
    """Other names accepted by ``resolve``."""

    @property
    def label(self) -> str:
        """Upper-case name used in file names (``Q4_K_M``)."""
        return self.name.upper()

    @property
    def quantized(self) -> bool:
        """True for block-quantized methods, False for the float methods (f32, f16, bf16)."""
        return self.base_type not in (T.F32, T.F16, T.BF16)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("q2_k", "Smallest usable file (about 2.6 bits per weight); noticeably lower quality.",
               T.Q2_K, 10),
        Method("q3_k_s", "Very small (3-bit everywhere); quality drops clearly.", T.Q3_K, 11),
        Method("q3_k_m", "Small 3-bit mix with more bits for attention values and early layers.",
               T.Q3_K, 12),
        Method("q3_k_l", "Largest 3-bit mix: 5-bit attention values and feed-forward output.",
               T.Q3_K, 13),
        Method("q4_0", "Legacy 4-bit format: simple and fast, less accurate than q4_k_m.", T.Q4_0, 2),
        Method("iq4_xs", "4.25 bits per weight with a non-linear grid: smaller than q4_k_m, as good or better "
               "with an importance matrix (imatrix).", T.IQ4_XS, 30),
        Method("iq4_nl", "4.5-bit non-linear format in 32-value blocks (fits rows q4_k_m cannot).", T.IQ4_NL, 25),
        Method("q4_k_s", "4-bit, slightly smaller than q4_k_m with slightly lower quality.",
               T.Q4_K, 14),
        Method("q4_k_m", "Recommended default: 4-bit mix with the most sensitive tensors at 6 bits; "
               "good quality at about a third of the 16-bit size.", T.Q4_K, 15, ("q4_k",)),
        Method("q5_0", "Legacy 5-bit format.", T.Q5_0, 8),
        Method("q5_1", "Legacy 5-bit format with an offset; slightly larger than q5_0.", T.Q5_1, 9),
        Method("q5_k_s", "5-bit everywhere: close to 16-bit quality.", T.Q5_K, 16),
        Method("q5_k_m", "5-bit mix with the most sensitive tensors at 6 bits: very close to 16-bit quality.",
               T.Q5_K, 17, ("q5_k",)),
        Method("q6_k", "6-bit: practically indistinguishable from 16-bit.", T.Q6_K, 18),
        Method("q8_0", "8-bit: lossless in practice, half the 16-bit size.", T.Q8_0, 7),
        Method("bf16", "16-bit bfloat, the usual training precision: no loss, largest practical file.",
               T.BF16, 32),
        Method("f16", "16-bit float: no loss for most models; older GPUs run it faster than bf16.",
               T.F16, 1),
        Method("f32", "32-bit float: twice the 16-bit size, only useful for debugging.", T.F32, 0),
    )
}
"""Every method we can write, in the order menus show them."""

_BY_ALIAS: dict[str, Method] = {alias: m for m in METHODS.values() for alias in (m.name, *m.aliases)}


def resolve(name: str) -> Method:
    """The method called ``name`` (any case, ``-`` or ``_``); unknown names raise UserError with a hint."""
    key = name.strip().lower().replace("-", "_")
    if key in _BY_ALIAS:
        return _BY_ALIAS[key]
    close = difflib.get_close_matches(key, list(_BY_ALIAS), n=1, cutoff=0.0)
    fix = f"Fix: use '{close[0]}' if that is what you meant, or another" if close else "Fix: use one"
    raise UserError(
        f"Unknown quantization method '{name}'. {fix} of the valid methods: {', '.join(METHODS)} "
        f"(q4_k_m is a good default)."
    )


@dataclass(frozen=True)
class ModelShape:
    """The few model facts llama.cpp's type mix depends on."""

    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Attention (query) heads."""
    n_head_kv: int
    """Key/value heads (fewer than n_head with grouped-query attention)."""
    has_output: bool
    """False for tied embeddings (no output.weight): token_embd.weight then takes output.weight's rule."""

    @property
    def n_gqa(self) -> int:
        """Query heads per key/value head, as llama.cpp computes it (0 if n_head_kv is 0)."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


# Substrings that exclude a 2-D ".weight" tensor from quantization (llama-quant.cpp).
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "time_mix_",
                    "attn_rel_b.weight", "position_embd", "pos_embd", "rel_pos", "patch_embd", "patch_merger")
_NEVER_QUANTIZED_NAMES = ("token_types.weight",)

# A 256-element K-quant type that does not fit a row falls back to a 32-element type.
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.IQ4_XS: T.IQ4_NL}

_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _category(name: str) -> str:
    """llama.cpp's broad tensor category, by the same name matching (first match wins)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
                "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):
        if key in name:
            return key.removesuffix(".weight")
    return "other"


def is_quantizable(gguf_name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp would quantize this tensor at all (2-D/3-D weights except norms, routers, ...)."""
    dims = list(shape)
    while dims and dims[0] == 1:  # ggml counts dimensions up to the last one > 1 (reversed order)
        dims.pop(0)
    if len(dims) < 2 or not gguf_name.endswith("weight"):
        return False
    if gguf_name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(s in gguf_name for s in _NEVER_QUANTIZED)


_IQ4 = ("iq4_nl", "iq4_xs")


def _mixed_type(method: Method, name: str, row_len: int, model: ModelShape, imatrix: bool) -> T:
    """The type llama.cpp's mix picks before the row-length fallback (``imatrix``: quantized with one)."""
    ft, base = method.name, method.base_type
    cat = _category(name)
    match = _LAYER.match(name)
    i_layer = int(match.group(1)) if match else 0
    n_layer = model.n_layer

    if cat == "output" or (cat == "token_embd" and not model.has_output):
        if row_len % GGML_QUANT_SIZES[base][0] != 0:
            return T.Q8_0
        return base if base == T.Q8_0 else T.Q6_K
    if cat in ("attn_qkv", "attn_kv_b", "attn_v"):
        if ft == "q2_k":
            return T.Q4_K if model.n_gqa >= 4 else T.Q3_K
        if ft == "q3_k_m":
            return T.Q5_K if i_layer < 2 else T.Q4_K
        if ft == "q3_k_l":
            return T.Q5_K
        if ft in ("q4_k_m", "q5_k_m") and use_more_bits(i_layer, n_layer):
            return T.Q6_K
        if ft == "q4_k_s" and i_layer < 4:
            return T.Q5_K
        if ft in _IQ4 and model.n_gqa >= 4:
            return T.Q5_K
        return base
    if cat == "ffn_down":
        if ft == "q2_k":
            return T.Q3_K
        if ft == "q3_k_m":
            return T.Q5_K if i_layer < n_layer // 16 else T.Q4_K
        if ft == "q3_k_l":
            return T.Q5_K
        if ft in ("q4_k_m", "q5_k_m") and use_more_bits(i_layer, n_layer):
            return T.Q6_K
        if ft in _IQ4 and i_layer < n_layer // 8 and not imatrix:
            return T.Q5_K
        if ft == "q4_k_s" and i_layer < n_layer // 8:
            return T.Q5_K
        if ft in ("q4_0", "q5_0") and imatrix and i_layer < n_layer // 8:
            return T.Q4_1 if ft == "q4_0" else T.Q5_1  # llama.cpp's guard for the first ffn_down layers
        return base
    if cat == "attn_output":
        return {"q2_k": T.Q3_K, "q3_k_m": T.Q4_K, "q3_k_l": T.Q5_K}.get(ft, base)
    return base


def tensor_type(method: Method, gguf_name: str, shape: tuple[int, ...], model: ModelShape,
                imatrix: bool = False) -> T:
    """The GGML type llama.cpp gives tensor ``gguf_name`` (torch-order ``shape``) in a ``method`` file, quantized
    with an importance matrix when ``imatrix`` (it changes the mix of the IQ4 and legacy 4/5-bit methods).

    Tensors llama.cpp never quantizes (1-D tensors, norms, MoE routers) are F32, as the reference
    converter writes them. Layer-dependent rules use the block number in the name, which equals
    llama.cpp's running counter for dense models (MoE and 70B-specific rules are not modelled).
    """
    if not is_quantizable(gguf_name, shape):
        return T.F32
    if not method.quantized:
        return method.base_type
    row_len = shape[-1]
    qtype = _mixed_type(method, gguf_name, row_len, model, imatrix)
    block = GGML_QUANT_SIZES[qtype][0]
    if row_len % block != 0:
        qtype = _FALLBACK.get(qtype, qtype)
        if row_len % GGML_QUANT_SIZES[qtype][0] != 0:
            qtype = T.F16
    return qtype
