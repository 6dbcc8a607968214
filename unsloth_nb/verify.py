"""Fidelity check: does the fine-tune survive export? (``python -m unsloth_nb verify``)

Every artifact (a merged folder, or a GGUF file) is judged against what a *correct* export of the same method
would be on this very model, never against fixed thresholds: how much a method loses depends on the model
(a 135M model loses far more to 4 bits than an 8B one), so a number that is right for one is wrong for the
next. Three questions, each with its own measurement:

1. **Are the weights the fine-tune's?** Each tensor of the artifact is compared with the fine-tune's tensor
   (base + adapter, through peft, in float32, laid out as the converter lays it out). A correct export differs
   only by its own rounding, and that rounding is known exactly: the fine-tune's tensor quantized to the same
   type by our quantizers (byte-identical to llama.cpp's). A tensor that differs clearly more is from another
   model, swapped, or broken.
2. **Did the adapter survive?** With an adapter, the share of the adapter's change that the artifact holds:
   100% for a correct export, 0% for an export of the base alone, 200% for an adapter merged at twice its
   scaling. Rounding noise is almost orthogonal to the change, so this stays near 100% even at 2 bits.
3. **Does the runtime read the file as meant?** llama.cpp's next-token distribution on the GGUF against
   transformers' on the *same* (dequantized) weights: what remains is the runtime's own arithmetic (llama.cpp
   rounds activations to 8 bits for quantized matrices), so a larger gap means metadata or tokenizer trouble.

Plus the usual causes checked directly (chat template missing or different, doubled BOS, llama.cpp tokenizing
the prompt differently), and, for the reader, what the method costs on this model: top-1 agreement with the
fine-tune, mean KL divergence, relative logit error, perplexity on a held-out text, and the greedy answers.
"""

from __future__ import annotations

import argparse
import difflib
import html
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unsloth_nb.errors import UserError
from unsloth_nb.serve import gguf_scalars

DEFAULT_PROMPTS = ("What is the capital of Zorblax?", "Write one sentence about the sea.",
                   "List three colours.")
HELD_OUT = Path(__file__).parent / "data" / "heldout.txt"
"""English prose no training set here contains: the perplexity of every artifact is measured on it."""
HELD_OUT_TOKENS = 256
"""Tokens of the held-out text used (enough for a stable perplexity, cheap on a CPU)."""

WEIGHT_SLACK = 1.25
"""A tensor may differ from the fine-tune's by at most this many times what a correct export of its type
differs (relative RMS), plus :data:`ROUNDING_FLOOR`. Correct exports measured 1.00 (identical bytes) to 1.03
(a merge rounded differently, e.g. peft's instead of ours); a swapped or foreign tensor is 10-100x off."""
ROUNDING_FLOOR = 2.0**-8
"""Relative RMS difference any 16-bit copy may carry on top (bf16 keeps 8 significant bits: two merges of the
same adapter, rounded in different orders, differ by up to one unit in the last place)."""
ADAPTER_TOLERANCE = 0.25
"""The share of the adapter's change an artifact holds may differ by this much from what a correct export of
its method holds (measured by rounding the fine-tune's own tensors: 93% for bf16, where small changes vanish in
rounding): a doubled scaling gives about twice, a forgotten adapter 0%. Correct exports of SmolLM2 were within
0.09 of it."""
RUNTIME_KL: dict[str, float] = {"float": 2e-3, "quantized": 4e-2}
"""Largest mean KL between llama.cpp and transformers on the same weights, per kind of tensor data: llama.cpp
multiplies 16-bit matrices with 16-bit activations and quantized ones with 8-bit activations. Correct files
measured (benchmarks/README.md): 16-bit at most 0.0003, quantized at most 0.014 (SmolLM2-135M; Qwen2.5-0.5B at
most 0.0014). A rope base ten times too small gave 0.12, a wrong norm epsilon 0.62."""
SAMPLE_ROWS = 64
"""Rows per tensor the weight check quantizes again (the expensive part): enough for a stable error measure;
a swapped or foreign tensor is off in every row."""
DECISIVE = 0.1
"""A position is decisive when the reference's best logit beats the second by this share of the logits' spread
(near-ties flip under any rounding and say nothing)."""
PRESERVING = ("merged", "f32", "bf16", "f16", "q8_0")
"""Methods whose output should still give the taught answer word for word (used by the demo)."""

_FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0", 2: "q4_0", 3: "q4_1", 8: "q5_0", 9: "q5_1", 10: "q2_k", 11: "q3_k_s",
               12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s", 17: "q5_k_m", 18: "q6_k",
               32: "bf16"}
_FLOAT_METHODS = ("f32", "f16", "bf16", "merged")


@dataclass
class ArtifactReport:
    """How one artifact compares with the fine-tune, and why it is judged broken if it is."""

    path: Path
    method: str
    top1: float
    """Share of decisive positions whose most likely next token equals the fine-tune's."""
    kl: float
    """Mean KL(fine-tune || artifact) over positions, in nats: what the method costs on this model."""
    logit_error: float
    """Relative RMS error of the centred logits (scale-free)."""
    perplexity: float
    """Perplexity on the held-out text (the fine-tune's own is in the report's header)."""
    answers: list[str]
    weight_error: float = 0.0
    """Worst tensor's relative RMS difference from the fine-tune, divided by what a correct export of its type
    gives plus the rounding floor: at most 1 for a correct file (see WEIGHT_SLACK)."""
    adapter_kept: float | None = None
    """Share of the adapter's change the artifact holds (1.0 = all of it); None without an adapter."""
    runtime_kl: float | None = None
    """KL between llama.cpp and transformers on the artifact's own weights (GGUF only)."""
    problems: list[str] = field(default_factory=list)
    """What makes the artifact broken."""
    notes: list[str] = field(default_factory=list)
    """Caveats that do not make it broken (e.g. small tokenization differences)."""

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport:
    """The reference's answers and one :class:`ArtifactReport` per artifact."""

    prompts: list[str]
    reference_answers: list[str]
    artifacts: list[ArtifactReport]
    reference_perplexity: float = math.nan

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.artifacts)

    def rows(self) -> list[list[str]]:
        """Table rows (header first), shared by the text and HTML renderings."""
        rows = [["artifact", "method", "top-1", "KL", "logit err", "ppl", "adapter", "verdict"]]
        for a in self.artifacts:
            kept = "-" if a.adapter_kept is None else f"{a.adapter_kept:.0%}"
            rows.append([a.path.name[:40], a.method, f"{a.top1:.1%}", f"{a.kl:.4f}", f"{a.logit_error:.1%}",
                         f"{a.perplexity:.2f}", kept, "ok" if a.ok else "BROKEN"])
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"fine-tune: perplexity {self.reference_perplexity:.2f} on the held-out text"]
        for row, artifact in zip(rows, [None, *self.artifacts], strict=True):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            if artifact is not None:
                lines.extend(f"    ! {p}" for p in artifact.problems)
                lines.extend(f"    note: {n}" for n in artifact.notes)
        for i, prompt in enumerate(self.prompts):
            lines.append(f"\nprompt: {prompt}\n  fine-tune: {self.reference_answers[i]!r}")
            lines.extend(f"  {a.path.name}: {a.answers[i]!r}" for a in self.artifacts)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = self.rows()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = ""
        for row, a in zip(rows[1:], self.artifacts, strict=True):
            cells = "".join(f"<td>{html.escape(c)}</td>" for c in row[:-1])
            verdict = "ok" if a.ok else "broken: " + html.escape("; ".join(a.problems))
            body += f"<tr>{cells}<td style='color:{'green' if a.ok else 'red'}'>{verdict}</td></tr>"
        return (f"<p>fine-tune: perplexity {self.reference_perplexity:.2f} on the held-out text</p>"
                f"<table><tr>{head}</tr>{body}</table>")


# --------------------------------------------------------------------------------------------- reference


class _Reference:
    """The fine-tune the artifacts are compared with: the base in float32 with the adapter through peft."""

    def __init__(self, model: Path, adapter: Path | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir, self.adapter_dir = model, adapter
        self.tokenizer = AutoTokenizer.from_pretrained(adapter if _has_tokenizer(adapter) else model)
        net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel

            vocab = len(self.tokenizer)
            if vocab > net.get_input_embeddings().weight.shape[0]:
                net.resize_token_embeddings(vocab, mean_resizing=False)
            net = PeftModel.from_pretrained(net, adapter)
        self.model = net.eval()
        self.config = net.config
        self._weights, self._lora = _weight_sources(net)
        self._logits: dict[tuple[int, ...], Any] = {}

    def render(self, prompt: str) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        import torch

        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return out[0, len(ids):].tolist()

    def logits(self, ids: list[int]) -> Any:
        """Float64 logits of every position (computed once per sequence, shared by all artifacts)."""
        key = tuple(ids)
        if key not in self._logits:
            self._logits[key] = _forward(self.model, ids)
        return self._logits[key]

    def weight(self, hf_name: str) -> Any:
        """The fine-tune's tensor ``hf_name`` in float32: the base's, plus the adapter's change (peft's own
        ``get_delta_weight``), or the adapter's trained copy (``modules_to_save``)."""
        import torch

        with torch.no_grad():
            if hf_name in self._lora:
                layer = self._lora[hf_name]
                return (layer.base_layer.weight.detach().float()
                        + layer.get_delta_weight(layer.active_adapters[0]).detach().float())
            return self._weights[hf_name].detach().float()

    def delta(self, hf_name: str) -> Any | None:
        """The adapter's change to ``hf_name`` (None where the adapter leaves it alone)."""
        import torch

        layer = self._lora.get(hf_name)
        if layer is None:
            return None
        with torch.no_grad():
            return layer.get_delta_weight(layer.active_adapters[0]).detach().float()


def _weight_sources(net: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """HF weight name -> parameter, and HF weight name -> peft LoRA layer, for a plain or a peft model."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        LoraLayer = ()  # noqa: N806 - no peft, no adapter
    lora = {}
    for name, module in net.named_modules():
        if LoraLayer and isinstance(module, LoraLayer):
            lora[_hf_name(name) + ".weight"] = module
    params = {}
    for name, param in net.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        params[_hf_name(name)] = param
    for name, buffer in net.named_buffers():
        params.setdefault(_hf_name(name), buffer)
    return params, lora


def _hf_name(name: str) -> str:
    """A peft-wrapped parameter's name as it is in the model's own safetensors."""
    for prefix in ("base_model.model.",):
        name = name.removeprefix(prefix)
    return name.replace(".base_layer", "").replace(".modules_to_save.default", "")


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def _forward(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


class _Tally:
    """Accumulates the comparison of artifact logits with reference logits over all sequences."""

    def __init__(self) -> None:
        self.agree = self.decisive = self.positions = 0
        self.kl = self.error = self.spread = 0.0

    def add(self, ref_logits: Any, art_logits: Any) -> None:
        import torch

        art_logits = art_logits.double()
        ref = torch.log_softmax(ref_logits, -1)
        art = torch.log_softmax(art_logits, -1)
        self.kl += float((ref.exp() * (ref - art)).sum(-1).clamp_min(0).sum())
        centred_ref = ref_logits - ref_logits.mean(-1, keepdim=True)
        centred_art = art_logits - art_logits.mean(-1, keepdim=True)
        self.error += float((centred_art - centred_ref).pow(2).sum())
        self.spread += float(centred_ref.pow(2).sum())
        best = ref_logits.topk(2, -1).values
        decisive = (best[:, 0] - best[:, 1]) > DECISIVE * centred_ref.std(-1)
        self.agree += int((ref_logits.argmax(-1) == art_logits.argmax(-1))[decisive].sum())
        self.decisive += int(decisive.sum())
        self.positions += len(ref_logits)

    @property
    def mean_kl(self) -> float:
        return self.kl / max(self.positions, 1)

    def result(self) -> tuple[float, float, float]:
        """(top-1 agreement on decisive positions, mean KL, relative RMS logit error)."""
        top1 = self.agree / self.decisive if self.decisive else 1.0
        return top1, self.mean_kl, (self.error / max(self.spread, 1e-30)) ** 0.5


def perplexity(logits: Any, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ``ids[1:]`` under ``logits`` (one row per position)."""
    import torch

    logp = torch.log_softmax(logits[:-1].double(), -1)
    return float(torch.exp(-logp.gather(1, torch.tensor(ids[1:])[:, None]).mean()))


# ----------------------------------------------------------------------------------------------- weights


@dataclass
class _WeightCheck:
    """Per-tensor comparison of an artifact's values with the fine-tune's (see the module docstring)."""

    worst: float = 0.0
    worst_name: str = ""
    worst_actual: float = 0.0
    worst_expected: float = 0.0
    off: list[str] = field(default_factory=list)
    kept_num: float = 0.0
    kept_exp_num: float = 0.0
    kept_den: float = 0.0

    def add(self, name: str, art: Any, expected: Any, ref: Any, delta: Any | None) -> None:
        """``art``: the artifact's values; ``expected``: the fine-tune's rounded as a correct export rounds
        them; ``ref``: the fine-tune's; ``delta``: the adapter's change (all float32, one layout)."""
        norm = float(ref.double().pow(2).sum()) or 1.0
        actual = math.sqrt(float((art - ref).double().pow(2).sum()) / norm)
        wanted = math.sqrt(float((expected - ref).double().pow(2).sum()) / norm)
        ratio = actual / (WEIGHT_SLACK * wanted + ROUNDING_FLOOR)
        if ratio > 1:
            self.off.append(name)
        if ratio > self.worst:
            self.worst, self.worst_name, self.worst_actual, self.worst_expected = ratio, name, actual, wanted
        if delta is not None:
            base = ref - delta
            self.kept_num += float(((art - base) * delta).double().sum())
            self.kept_exp_num += float(((expected - base) * delta).double().sum())
            self.kept_den += float(delta.double().pow(2).sum())

    def kept(self) -> tuple[float, float] | None:
        """(share of the adapter's change held, the same for a correct export); None without an adapter."""
        if self.kept_den <= 0:
            return None
        return self.kept_num / self.kept_den, self.kept_exp_num / self.kept_den

    def problems(self, what: str) -> list[str]:
        out = []
        if self.off:
            out.append(f"{len(self.off)} tensor(s) differ from the fine-tune's far more than {what} rounding does "
                       f"(worst {self.worst_name}: {self.worst_actual:.1%} where a correct export differs by "
                       f"{self.worst_expected:.1%}): exported from another model or a broken merge, or tensors "
                       "swapped or renamed")
        kept = self.kept()
        if kept is not None:
            share, expected = kept
            if abs(share - expected) > ADAPTER_TOLERANCE:
                cause = ("exported without the adapter (from the base model alone)" if share < 0.5 else
                         "merged with the wrong scaling (lora_alpha / r, rsLoRA) or merged twice" if share > 1
                         else "merged with the wrong scaling or into a different base")
                out.append(f"it holds {share:.0%} of the adapter's change where a correct export holds "
                           f"{expected:.0%}: {cause}")
        return out


def _sample_rows(value: Any) -> Any:
    """The rows of a tensor the weight check compares: all of a small tensor, else SAMPLE_ROWS spread evenly
    (blocks never span rows, so each sampled row's rounding is exactly the whole tensor's)."""
    import torch

    if value.ndim < 2 or value.shape[0] <= SAMPLE_ROWS:
        return slice(None)
    return torch.linspace(0, value.shape[0] - 1, SAMPLE_ROWS).round().long()


def _gguf_values(data: Any, qtype: int, shape: tuple[int, ...]) -> Any:
    """A GGUF tensor's stored bytes as float32 values, torch-order ``shape``."""
    import gguf
    import numpy as np
    import torch

    kind = gguf.GGMLQuantizationType(qtype)
    if kind == gguf.GGMLQuantizationType.F32:
        values = np.frombuffer(data, dtype=np.float32)
    elif kind == gguf.GGMLQuantizationType.F16:
        values = np.frombuffer(data, dtype=np.float16).astype(np.float32)
    elif kind == gguf.GGMLQuantizationType.BF16:
        values = (np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        values = gguf.quants.dequantize(np.frombuffer(data, dtype=np.uint8).reshape(rows, -1), kind)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _rounded(ref: Any, qtype: int) -> Any:
    """The fine-tune's tensor as a correct export of type ``qtype`` holds it (our llama.cpp-exact quantizers)."""
    import gguf
    import torch

    from unsloth_nb.gguf import quants

    kind = gguf.GGMLQuantizationType(qtype)
    floats = {gguf.GGMLQuantizationType.F32: torch.float32, gguf.GGMLQuantizationType.F16: torch.float16,
              gguf.GGMLQuantizationType.BF16: torch.bfloat16}
    if kind in floats:
        return ref.to(floats[kind]).float()
    packed = quants.quantize(ref, kind, device="cpu")
    return _gguf_values(packed.tobytes(), qtype, tuple(ref.shape))


def _sources(ref: _Reference) -> tuple[Any, list[Any], Any]:
    """The converter's view of the fine-tune: (architecture rules, GGUF tensors with their HF sources)."""
    from unsloth_nb.gguf import convert

    return convert.tensor_sources(ref.model_dir, ref.adapter_dir)


def _reference_in_gguf_layout(ref: _Reference, arch: Any, source: Any) -> tuple[Any, Any | None]:
    """(fine-tune's tensor, adapter's change) as the GGUF lays them out; generated tensors have no change."""
    from unsloth_nb.gguf import convert

    if source.hf_name is None:
        return source.data.float(), None
    rows = slice(0, source.shape[0]) if source.shape else slice(None)
    value = convert.to_gguf_layout(arch, source, ref.weight(source.hf_name)[rows].contiguous())
    delta = ref.delta(source.hf_name)
    if delta is not None:
        delta = convert.to_gguf_layout(arch, source, delta[rows].contiguous())
    return value.reshape(source.shape).float(), None if delta is None else delta.reshape(source.shape)


# -------------------------------------------------------------------------------------------- artifacts


def gguf_method(path: Path) -> str:
    """The export method of a GGUF file, from its general.file_type key."""
    return _method(gguf_scalars(path))


def _method(scalars: dict) -> str:
    file_type = scalars.get("general.file_type")
    return _FILE_TYPES.get(int(file_type), "unknown") if file_type is not None else "unknown"


def _gguf_tensors(path: Path) -> Iterator[tuple[str, tuple[int, ...], int, Any]]:
    """(name, torch-order shape, GGML type, stored bytes) of every tensor of a GGUF file."""
    import gguf
    import numpy as np

    from unsloth_nb.gguf import header

    head = header.read(path, tensors=True)
    alignment = int(head.values.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    start = -(-head.end // alignment) * alignment
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for t in head.tensors:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.qtype)]
        nbytes = math.prod(t.shape) // block * size
        yield t.name, t.shape, t.qtype, data[start + t.offset:start + t.offset + nbytes]


def _check_gguf_weights(ref: _Reference, path: Path) -> tuple[_WeightCheck, dict[str, Any], list[str]]:
    """Compare every tensor of a GGUF with the fine-tune's; returns the check, the artifact's weights in HF
    layout (to run them in transformers) and problems with the tensor list itself."""
    from unsloth_nb.gguf import convert

    arch, sources, _ = _sources(ref)
    by_name = {s.name: s for s in sources}
    stored = {name: (shape, qtype, data) for name, shape, qtype, data in _gguf_tensors(path)}
    problems = []
    missing, extra = sorted(set(by_name) - set(stored)), sorted(set(stored) - set(by_name))
    if missing or extra:
        problems.append("the file's tensors are not this model's (" + "; ".join(
            part for part in (f"missing {', '.join(missing[:3])}" if missing else "",
                              f"unexpected {', '.join(extra[:3])}" if extra else "") if part)
            + "): it was exported from another model or architecture")
    check, hf_weights = _WeightCheck(), {}
    for name, source in by_name.items():
        if name not in stored:
            continue
        shape, qtype, data = stored[name]
        if tuple(shape) != tuple(source.shape):
            problems.append(f"tensor {name} has shape {tuple(shape)} where this model's has {tuple(source.shape)}: "
                            "the file was exported from another model")
            continue
        art = _gguf_values(data, qtype, tuple(shape))
        value, delta = _reference_in_gguf_layout(ref, arch, source)
        rows = _sample_rows(value)
        check.add(name, art[rows], _rounded(value[rows], qtype), value[rows], None if delta is None else delta[rows])
        if source.hf_name is not None:
            hf_weights[source.hf_name] = convert.from_gguf_layout(arch, source, art)
    return check, hf_weights, problems


def _artifact_model(ref: _Reference, weights: dict[str, Any]) -> Any:
    """A transformers model of the fine-tune's architecture holding ``weights`` (the artifact's values);
    tensors the file trims (Gemma 3's out-of-vocabulary embedding rows) keep the fine-tune's."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(ref.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name, param in model.state_dict().items():
        full = ref.weight(name) if name in ref._weights or name in ref._lora else None
        value = weights.get(name)
        if value is not None and full is not None and value.shape != full.shape:
            full = full.clone()
            full[: value.shape[0]] = value
            value = full
        state[name] = (value if value is not None else full if full is not None else torch.zeros(param.shape))
    model.load_state_dict(state, assign=True, strict=False)
    for name, buffer in list(model.named_buffers()):  # non-persistent buffers (rotary frequencies): as the reference
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(attr, ref._weights[name].clone(), persistent=False)
    model.tie_weights()
    return model.eval()


def _gguf_report(ref: _Reference, path: Path, prompts: list[str], sequences: list[tuple[list[int], list[int]]],
                 held_out: list[int], max_new_tokens: int) -> ArtifactReport:
    from llama_cpp import Llama

    from unsloth_nb.gguf import llamacpp

    llamacpp.require_safe_build()
    scalars = gguf_scalars(path)  # not gguf-py's GGUFReader: it builds every vocabulary entry (10-20 s at 128k)
    method = _method(scalars)
    problems, notes = [], []
    template = scalars.get("tokenizer.chat_template")
    if ref.tokenizer.chat_template:
        if template is None:
            problems.append("the GGUF has no chat template: servers will format prompts with a generic one, not "
                            "the fine-tune's (export from a folder that holds the tokenizer's chat template)")
        elif template != ref.tokenizer.chat_template:
            problems.append("the GGUF's chat template differs from the fine-tune's: servers will format prompts "
                            "differently from training (export with the adapter's tokenizer files)")
    check, weights, listing = _check_gguf_weights(ref, path)
    problems += listing + check.problems(method)
    art_model = _artifact_model(ref, weights) if not listing else None
    del weights
    longest = max([len(p) + len(a) for p, a in sequences] + [len(held_out)])
    llm = Llama(model_path=str(path), n_ctx=max(512, longest + max_new_tokens + 8), logits_all=True, verbose=False,
                n_threads=None, seed=0)
    tally, runtime, answers = _Tally(), _Tally(), []
    try:
        bos = llm.token_bos()
        for (prompt_ids, answer_ids), prompt in zip(sequences, prompts, strict=True):
            text = ref.tokenizer.decode(prompt_ids).encode()
            native = llm.tokenize(text, add_bos=False, special=True)
            if template is not None and bos >= 0 and _served(ref, llm, template, prompt)[:2] == [bos, bos]:
                problems.append("the GGUF's chat template writes the BOS token twice (its bos_token, then the same "
                                "token as text): served prompts start with a doubled BOS; export with the fine-tune's "
                                "own template")
            similarity = difflib.SequenceMatcher(a=native, b=prompt_ids, autojunk=False).ratio()
            if similarity < 0.8:
                problems.append("llama.cpp tokenizes the prompt very differently from the HF tokenizer: the GGUF's "
                                "vocabulary or pre-tokenizer (tokenizer.ggml.pre) does not match the fine-tune's")
            elif native != prompt_ids:
                notes.append(f"llama.cpp splits the templated prompt into {len(native)} tokens where HF has "
                             f"{len(prompt_ids)} (spacing around special tokens); served answers may differ slightly")
            ids = prompt_ids + answer_ids
            scores = _llama_logits(llm, ids)
            tally.add(ref.logits(ids), scores)
            if art_model is not None:
                runtime.add(_forward(art_model, ids), scores)
            answers.append(_llama_greedy(llm, ref, prompt_ids, max_new_tokens))
        held = _llama_logits(llm, held_out)
        if art_model is not None:
            runtime.add(_forward(art_model, held_out), held)
    finally:
        llm.close()
    runtime_kl = runtime.mean_kl if art_model is not None else None
    kind = "float" if method in _FLOAT_METHODS else "quantized"
    if runtime_kl is not None and runtime_kl > RUNTIME_KL[kind]:
        problems.append(f"llama.cpp's predictions on this file's weights differ from transformers' on the same "
                        f"weights (KL {runtime_kl:.4f}, at most {RUNTIME_KL[kind]} for {kind} files): the file's "
                        "metadata (rope, norm epsilon, head counts, vocabulary) does not describe this model")
    kept = check.kept()
    report = ArtifactReport(path, method, *tally.result(), perplexity(held, held_out), answers,
                            weight_error=check.worst, adapter_kept=None if kept is None else kept[0],
                            runtime_kl=runtime_kl, problems=sorted(set(problems)), notes=sorted(set(notes)))
    return report


def _served(ref: _Reference, llm: Any, template: str, prompt: str) -> list[int]:
    """The tokens a llama.cpp server feeds the model for one user message: the GGUF's own template rendered,
    then tokenized with special tokens and without an extra BOS (llama-cpp-python's server adds none after a
    template; llama.cpp's own server drops a leading BOS text before adding its BOS token: the same tokens)."""
    text = ref.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def _llama_logits(llm: Any, ids: list[int]) -> Any:
    import torch

    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(llm.scores[: len(ids)].copy())


def _llama_greedy(llm: Any, ref: _Reference, prompt_ids: list[int], max_new_tokens: int) -> str:
    llm.reset()
    out: list[int] = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
        if llm.token_eos() == token or token in _stop_ids(ref) or len(out) >= max_new_tokens:
            break
        out.append(token)
    return ref.tokenizer.decode(out, skip_special_tokens=True)


def _stop_ids(ref: _Reference) -> set[int]:
    ids = {ref.tokenizer.eos_token_id}
    config = getattr(ref.model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


def _folder_report(ref: _Reference, path: Path, prompts: list[str], sequences: list[tuple[list[int], list[int]]],
                   held_out: list[int], max_new_tokens: int) -> ArtifactReport:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unsloth_nb import checkpoint

    problems = []
    tokenizer = AutoTokenizer.from_pretrained(path)
    if ref.tokenizer.chat_template and tokenizer.chat_template != ref.tokenizer.chat_template:
        problems.append("the merged folder's chat template differs from the fine-tune's (copy the adapter's "
                        "tokenizer files into it)")
    check = _WeightCheck()
    wanted = {n for n in ref._weights if not n.endswith("inv_freq")} | set(ref._lora)
    found = set()
    for file in checkpoint.weight_files(path):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name not in wanted:
                    continue
                found.add(name)
                art = handle.get_tensor(name)
                value = ref.weight(name)
                if tuple(art.shape) != tuple(value.shape):
                    problems.append(f"tensor {name} has shape {tuple(art.shape)} where the fine-tune's has "
                                    f"{tuple(value.shape)}: the folder holds another model")
                    continue
                check.add(name, art.float(), value.to(art.dtype).float(), value, ref.delta(name))
    tied = {"lm_head.weight"} if getattr(ref.config, "tie_word_embeddings", False) else set()
    missing = sorted(wanted - found - tied)
    if missing:
        problems.append(f"the folder lacks the fine-tune's tensor(s) {', '.join(missing[:3])}: it holds another "
                        "model or an incomplete copy")
    problems += check.problems("16-bit")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tally, answers = _Tally(), []
    for prompt_ids, answer_ids in sequences:
        ids = prompt_ids + answer_ids
        tally.add(ref.logits(ids), _forward(model, ids))
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True))
    kept = check.kept()
    return ArtifactReport(path, "merged", *tally.result(), perplexity(_forward(model, held_out), held_out), answers,
                          weight_error=check.worst, adapter_kept=None if kept is None else kept[0],
                          problems=sorted(set(problems)))


def held_out_ids(tokenizer: Any, tokens: int = HELD_OUT_TOKENS) -> list[int]:
    """The held-out text as the fine-tune's tokenizer reads it (with its BOS when it adds one)."""
    return tokenizer(HELD_OUT.read_text(encoding="utf-8")).input_ids[:tokens]


def verify(model: str | Path, artifacts: list[str | Path], adapter: str | Path | None = None,
           prompts: list[str] | None = None, max_new_tokens: int = 16) -> VerifyReport:
    """Compare each artifact (merged folder or .gguf) with the fine-tune (``model`` [+ ``adapter``])."""
    from unsloth_nb import checkpoint

    model = checkpoint.resolve_model(model)
    adapter_path = Path(adapter) if adapter is not None else None
    checkpoint.read_config(model)
    paths = [Path(a) for a in artifacts]
    for path in paths:
        if not path.exists():
            raise UserError(f"Artifact {path} does not exist. Fix: pass the merged folder or the .gguf file that "
                            "the export wrote.")
        if path.is_file() and path.suffix != ".gguf":
            raise UserError(f"{path} is neither a model folder nor a .gguf file. Fix: pass one of those.")
    _check_inputs(model, adapter_path, paths)
    ref = _Reference(model, adapter_path)
    prompts = list(prompts or DEFAULT_PROMPTS)
    sequences, answers = [], []
    for prompt in prompts:
        ids = ref.render(prompt)
        answer = ref.greedy(ids, max_new_tokens)
        sequences.append((ids, answer))
        answers.append(ref.tokenizer.decode(answer, skip_special_tokens=True))
    held_out = held_out_ids(ref.tokenizer)
    reports = [(_gguf_report if p.is_file() else _folder_report)(ref, p, prompts, sequences, held_out,
                                                                 max_new_tokens) for p in paths]
    bos = ref.tokenizer.bos_token_id
    if bos is not None and any(ids[:2] == [bos, bos] for ids, _ in sequences):
        for report in reports:
            report.problems.append("the chat template writes BOS and the tokenizer adds another: prompts start "
                                   "with a doubled BOS (drop bos_token from the template or add_bos_token)")
    return VerifyReport(prompts, answers, reports, perplexity(ref.logits(held_out), held_out))


def _check_inputs(model: Path, adapter: Path | None, artifacts: list[Path]) -> None:
    """Read every input's headers before anything is loaded, so that a damaged file is named at once."""
    from unsloth_nb import checkpoint
    from unsloth_nb.gguf import header

    checkpoint.check_tokenizer(model)
    checkpoint.model_tensors(model)
    if adapter is not None:
        checkpoint.read_adapter(adapter)
        checkpoint.check_tokenizer(adapter)
    for path in artifacts:
        if path.is_file():
            header.require(path)
        else:
            checkpoint.read_config(path)
            checkpoint.check_tokenizer(path)
            checkpoint.model_tensors(path)


def run_cli(args: argparse.Namespace) -> int:
    report = verify(args.model, args.artifacts, adapter=args.adapter)
    print(report)
    print(json.dumps({"ok": report.ok}))
    return 0 if report.ok else 1
