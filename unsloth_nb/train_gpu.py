"""What makes LoRA training fast and lean on a CUDA GPU: padding-free batches, compiled decoder layers, some
layers recomputed.

- **Padding-free batches.** trl's collator concatenates a batch's rows into one row with sequence boundaries
  (``cu_seq_lens_q``) instead of padding them to the longest; attention then runs over each sequence alone
  through PyTorch's variable-length FlashAttention (``torch.nn.attention.varlen``, Ampere and newer), so no
  compute or activation memory goes to padding, and no token attends across a boundary.
- **Some layers recomputed.** A share of the decoder layers keeps only its input for the backward pass and
  recomputes the rest (gradient checkpointing, layer by layer): memory bought back for a little speed.
- **Compiled decoder layers.** ``torch.compile`` fuses each layer's elementwise work (RMSNorm, rotary
  embedding, SiLU gate, the LoRA sums) and keeps fewer activations for the backward pass: its partitioner
  recomputes cheap elementwise results instead of saving them.

``train.resolve`` decides which of these run on the machine at hand and says why; the measured effect of each
is in benchmarks/README.md (``benchmarks/train_tokens_per_s.py``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

ATTENTION = "unsloth_nb_varlen"
"""The name under which :func:`varlen_attention` is registered with transformers' attention interface."""


@functools.cache
def varlen_kernel() -> Callable[..., Any] | None:
    """PyTorch's variable-length FlashAttention as ``f(q, k, v, cu_seq_lens, max_len, scale)`` for causal
    attention over (tokens, heads, head_dim) tensors, or None when this torch has none or no GPU can run it.

    torch 2.10 spells causal ``is_causal=True``, later versions ``window_size=(-1, 0)``; versions without
    ``enable_gqa`` get the key/value heads repeated for grouped-query attention. Looked up once (resolve asks
    whether there is one, register_attention then takes it)."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability(0) < (8, 0):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    gqa = "enable_gqa" in params

    def kernel(q: Any, k: Any, v: Any, cu_seq_lens: Any, max_len: int, scale: float | None) -> Any:
        if k.shape[1] != q.shape[1]:
            if gqa:
                return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_len, max_len, scale=scale,
                                   enable_gqa=True, **causal)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_len, max_len, scale=scale, **causal)

    return kernel


_kernel: Callable[..., Any] | None = None
"""The kernel :func:`register_attention` found (a plain global, so that torch.compile traces straight into it)."""
_sdpa: Callable[..., Any] | None = None
"""transformers' SDPA attention, for the calls that are not a padding-free batch (e.g. generating)."""


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                     scaling: float | None = None, cu_seq_lens_q: Any = None, max_length_q: int | None = None,
                     **kwargs: Any) -> tuple[Any, Any]:
    """transformers attention function: a padding-free row (query of shape (1, heads, tokens, dim) with the
    sequence boundaries trl's collator passes) goes to the varlen kernel and comes back as (1, tokens, heads,
    dim) like the built-in ones; any other call (generation, an eval batch) goes to SDPA."""
    if cu_seq_lens_q is None or max_length_q is None:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1 or dropout:
        raise RuntimeError("padding-free attention takes one concatenated row and no attention dropout")
    import torch

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if q.dtype == torch.float32:  # QLoRA keeps the norms in float32 (peft), and FlashAttention takes 16 bits
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = (t.to(half) for t in (q, k, v))
    out = _kernel(q, k, v, cu_seq_lens_q.to(device=q.device, dtype=torch.int32), int(max_length_q), scaling)
    return out.to(query.dtype).unsqueeze(0), None


def varlen_mask(*, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
                attention_mask: Any = None, **kwargs: Any) -> Any:
    """The mask for :func:`varlen_attention`: none for a whole causal forward without padding (a padding-free
    row is masked by its boundaries, a single row by SDPA's causal flag), else SDPA's mask."""
    if attention_mask is None and q_length == kv_length and not kv_offset and not q_offset:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     attention_mask=attention_mask, **kwargs)


def register_attention(kernel: Callable[..., Any] | None = None) -> bool:
    """Register :func:`varlen_attention` and its mask as ``ATTENTION`` with transformers, over ``kernel`` (the
    tests pass a reference one on the CPU) or :func:`varlen_kernel`; False when no kernel can run here."""
    global _kernel, _sdpa
    _kernel = kernel or varlen_kernel()
    if _kernel is None:
        return False
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    _sdpa = sdpa_attention_forward
    AttentionInterface.register(ATTENTION, varlen_attention)
    AttentionMaskInterface.register(ATTENTION, varlen_mask)
    return True


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated decoder blocks (the classes transformers keeps whole when it splits a model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


def compile_layers(model: Any) -> int:
    """Compile each decoder layer in place (the code is shared, so it is compiled once for all of them, with
    dynamic sequence lengths); returns how many layers were compiled."""
    import torch

    # A compiler failure on some shape (torch 2.11's inductor asserted on the tiny fixture's dynamic shapes)
    # makes torch run that frame eagerly instead of failing the training run: same results, less speed.
    torch._dynamo.config.suppress_errors = True
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def recompute_layers(model: Any, share: float) -> int:
    """Turn on gradient checkpointing (non-reentrant) for the first ``share`` of the decoder layers only;
    returns how many."""
    layers = decoder_layers(model)
    count = round(share * len(layers))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < count
    return count
