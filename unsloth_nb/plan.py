"""Plan before doing: what each step needs (RAM, VRAM, disk), where its outputs go, and whether it fits.

A model is sized from its safetensors headers alone (no weight is read; ``checkpoint`` reads them). GGUF sizes
come from the converter's own layout when the folder can be converted (exact), else from the converter's tensor
list and per-tensor type mix (``convert.tensor_sources``, ``recipes.tensor_type``) plus an estimate of the
metadata: an architecture is added to the converter once and the planner knows it. Placement follows the
platform: on Kaggle outputs go to /kaggle/working while they fit its 20 GB, else to /tmp with a warning; on Colab
no step may plan more than 75% of the available RAM (``runtime.RAM_SHARE``). Steps call
``make_plan(...).require()`` before writing anything.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unsloth_nb import checkpoint, runtime
from unsloth_nb.checkpoint import DTYPES, TensorInfo
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import layout, recipes
from unsloth_nb.runtime import Runtime, detect, gb

TOKENIZER_BYTES_PER_TOKEN = 130
"""tokenizer.json bytes per vocabulary entry, for folders without one (real files: 75-135)."""

METADATA_BYTES_PER_TOKEN = 50
"""GGUF key/value bytes per vocabulary entry (token text, type, score or merges) for header-only models."""

CHECKPOINT_BYTES_PER_LORA_PARAM = 12
"""A training checkpoint holds the LoRA weights (float32) and AdamW's two float32 moments per weight."""

CHECKPOINT_EXTRA_BYTES = 2 * 10**6
"""Per checkpoint besides the weights and the tokenizer files: trainer state, scheduler, RNG states, configs."""

CHECKPOINTS_AT_ONCE = 3
"""The trainer keeps 2 checkpoints and writes the next before deleting the oldest: 3 exist at the peak."""

DEFAULT_OUT = "unsloth_nb_out"
IMATRIX_CPU_FLOPS_PER_CORE = 2e10
"""Float32 forward-pass throughput per CPU core that the imatrix estimate assumes (transformers on AVX2)."""
IMATRIX_GPU_FLOPS = 1.5e13
"""bf16/fp16 forward-pass throughput the imatrix estimate assumes on a GPU (a T4 reaches about this)."""
IMATRIX_ACTIVATION_BYTES = 64
"""Bytes per token per hidden unit one forward pass of the imatrix holds at its peak (the widest layer's input
and output, the attention's, the hooks' float32 squares)."""
"""Folder name for outputs when the user did not choose one."""

@dataclass(frozen=True)
class ModelSize:
    """What a checkpoint holds, read from config.json and the safetensors headers."""

    path: Path
    """The folder (for a Hub id: its snapshot in the local Hugging Face cache)."""
    config: dict
    """config.json."""
    tensors: tuple[TensorInfo, ...]
    """Every tensor of every shard."""
    has_weights: bool = True
    """False when the files carry headers only (synthetic test models)."""

    @property
    def architecture(self) -> str:
        """First entry of config.json's "architectures", else its model_type."""
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return str(archs[0])

    @property
    def name(self) -> str:
        """Name for output files: the folder name, or the repo name for a Hugging Face cache snapshot."""
        return checkpoint.model_name(self.path)

    @property
    def n_params(self) -> int:
        """Parameter count (all tensors)."""
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def bytes_16bit(self) -> int:
        """Bytes of a 16-bit copy (floats in 16 bits, other dtypes unchanged), as a merge writes it."""
        return sum(t.numel * 2 if t.dtype.startswith(("F", "BF")) else t.nbytes for t in self.tensors)

    @property
    def params_by_dtype(self) -> dict[str, int]:
        """Parameters per safetensors dtype."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.dtype] = out.get(t.dtype, 0) + t.numel
        return out

    @property
    def bytes_by_dtype(self) -> dict[str, int]:
        """Checkpoint bytes per safetensors dtype."""
        return {dtype: n * DTYPES[dtype][0] for dtype, n in self.params_by_dtype.items()}

    @property
    def largest(self) -> TensorInfo:
        """The tensor with the most elements: it sets the peak of every streaming step."""
        return max(self.tensors, key=lambda t: t.numel)

    @property
    def extra_bytes(self) -> int:
        """Bytes of the folder's other files (config, tokenizer...), copied along with a merge."""
        files = [p for p in self.path.iterdir() if p.is_file() and p.suffix != ".safetensors"]
        return sum(p.stat().st_size for p in files)

    def describe(self) -> str:
        """One line: name, architecture, parameters, bytes per dtype, largest tensor."""
        dtypes = ", ".join(f"{d} {gb(n)}" for d, n in self.bytes_by_dtype.items())
        big = self.largest
        n = self.n_params
        count = f"{n / 1e9:.2f} B" if n >= 10**9 else f"{n / 1e6:.1f} M"
        return (f"{self.name} ({self.architecture}): {count} parameters, {dtypes}; "
                f"largest tensor {big.name} {'x'.join(map(str, big.shape))} ({gb(big.nbytes)})")


@dataclass
class Step:
    """One row of a plan: a step (or one file of it) and what it needs."""

    name: str
    """What happens, e.g. "merge" or "gguf Q4_K_M"."""
    ram: int
    """Peak resident memory of the step, in bytes."""
    disk: int
    """Bytes the step writes (they stay until the user deletes them)."""
    where: Path
    """The file or folder written."""
    vram: int = 0
    """Peak GPU memory when the step runs on a GPU, in bytes."""
    exact: bool = False
    """True when ``disk`` is the exact size (the converter's layout), False for an estimate."""
    fits: bool = True
    """Whether the step's RAM and its share of the disk fit, with every earlier output still present."""
    seconds: float = 0.0
    """Estimated duration where one is known (the imatrix's forward passes), else 0."""
    vram_warning: str = ("quantizing the largest tensor needs about {need} of GPU memory and the GPU has {free} "
                         "free: use device='cpu'.")
    """The warning when ``vram`` is over the GPU's free memory ({need} and {free} are filled in): what needs less."""


@dataclass
class Plan:
    """The steps of a job on one machine, where they write and whether they fit; show or ``require()`` it."""

    model: ModelSize
    """The model being converted (the base model when an adapter is given)."""
    runtime: Runtime
    """The machine the plan was made for."""
    methods: list[str]
    """GGUF methods, canonical names (e.g. "q4_k_m")."""
    out_dir: Path
    """Folder of the GGUF files."""
    adapter: Path | None = None
    """LoRA adapter folder, if any."""
    fused: bool = False
    """True: GGUF straight from base + adapter (no merged copy); False with an adapter: merge first."""
    steps: list[Step] = field(default_factory=list)
    """The rows, in the order they run."""
    warnings: list[str] = field(default_factory=list)
    """Things to know even when everything fits (e.g. /tmp is not kept)."""
    problems: list[str] = field(default_factory=list)
    """What does not fit and by how much, one sentence each."""
    fixes: list[str] = field(default_factory=list)
    """What would make it fit, one sentence each."""

    @property
    def fits(self) -> bool:
        """True when every step fits."""
        return not self.problems

    @property
    def ram_budget(self) -> int:
        """The most RAM any step may plan for on this runtime."""
        return runtime.ram_budget(self.runtime)

    def reason(self) -> str:
        """One paragraph: what does not fit, by how much, and what to do. Empty when it fits."""
        if self.fits:
            return ""
        text = " ".join(self.problems)
        if self.fixes:
            text += " What to do: " + "; or ".join(self.fixes) + "."
        return text

    def require(self) -> Plan:
        """Return the plan when it fits; else raise UserError with :meth:`reason` (nothing written yet)."""
        if not self.fits:
            raise UserError(self.reason())
        return self

    def rows(self) -> list[list[str]]:
        """Table rows (header first), shared by the text and HTML renderings."""
        gpu = bool(self.runtime.gpus)
        timed = any(s.seconds for s in self.steps)
        head = (["step", "needs RAM"] + (["needs VRAM"] if gpu else []) + ["needs disk"] + (["takes"] if timed else [])
                + ["where", "fits?"])
        rows = [head]
        for s in self.steps:
            disk = gb(s.disk) if s.exact else f"~{gb(s.disk)}"
            vram = [gb(s.vram) if s.vram else "-"] if gpu else []
            took = [_duration(s.seconds) if s.seconds else "-"] if timed else []
            rows.append([s.name, gb(s.ram), *vram, disk, *took, str(s.where), "yes" if s.fits else "NO"])
        return rows

    def _header(self) -> list[str]:
        rt = self.runtime
        lines = [self.model.describe()]
        if self.adapter is not None:
            how = "fused into the GGUF, no merged copy" if self.fused else "merged first"
            lines.append(f"adapter {self.adapter} ({how})")
        share = int(runtime.RAM_SHARE.get(rt.platform, 0.9) * 100)
        lines.append(f"{rt.platform}: {gb(rt.available_ram)} RAM available (plans use at most {share}%: "
                     f"{gb(self.ram_budget)}), {len(rt.gpus)} GPU(s), {gb(rt.free_disk(self.out_dir))} free "
                     f"in {self.out_dir}")
        return lines

    def __str__(self) -> str:
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        table = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines = self._header() + [""] + table + [""]
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append("fits: yes" if self.fits else f"does not fit: {self.reason()}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = self.rows()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = ""
        for r in rows[1:]:
            color = "" if r[-1] == "yes" else " style='color:#b00'"
            body += f"<tr{color}>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
        notes = "".join(f"<p>{html.escape(line)}</p>" for line in self._header())
        notes_after = "".join(f"<p>&#9888; {html.escape(w)}</p>" for w in self.warnings)
        verdict = ("<p><b>fits</b></p>" if self.fits
                   else f"<p style='color:#b00'><b>does not fit:</b> {html.escape(self.reason())}</p>")
        return f"{notes}<table><tr>{head}</tr>{body}</table>{notes_after}{verdict}"


# ---------------------------------------------------------------------------------------------- sizing


def _online() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on")


def hub_headers(repo_id: str) -> Path:
    """For users online: config.json and the safetensors headers of a Hub model (no weights: a few kB per
    shard), saved as a header-only folder the planner reads like a local one."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    try:
        meta = get_safetensors_metadata(repo_id)
        config = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except Exception as exc:  # network, gated repo, no safetensors: all end in the same advice
        raise UserError(f"Model {repo_id!r} is not a local folder, not in the Hugging Face cache "
                        f"({checkpoint.hf_cache_dir()}), and its size could not be read from the Hub "
                        f"({type(exc).__name__}: "
                        f"{str(exc)[:160]}). Fix: check the id and your login (gated models need a token), or "
                        f"download it first (`huggingface-cli download {repo_id}`) or pass its folder.") from None
    from unsloth_nb.gguf.llamacpp import cache_dir

    return write_header_folder(cache_dir() / "hub-headers" / repo_id, config, meta)


def write_header_folder(dest: Path, config: dict, meta: Any) -> Path:
    """Write ``config.json`` and header-only safetensors files (and the index) from the Hub's
    ``SafetensorsRepoMetadata``; replaces an older copy atomically."""
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for filename, file_meta in meta.files_metadata.items():
        header: dict[str, Any] = {"__metadata__": dict(file_meta.metadata or {})}
        for name, info in file_meta.tensors.items():
            header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)}
        raw = json.dumps(header, separators=(",", ":")).encode()
        (partial / filename).write_bytes(struct.pack("<Q", len(raw)) + raw)
    if meta.sharded:
        index = {"metadata": dict(meta.metadata or {}), "weight_map": dict(meta.weight_map)}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index))
    (partial / "config.json").write_text(json.dumps(config))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(partial, dest)
    return dest


def size_model(model: str | os.PathLike) -> ModelSize:
    """Size a model from config.json and its safetensors headers (sharded models through the index).

    A Hub id is read from the local cache; when it is not there and the machine is online, only its
    headers are fetched (``hub_headers``)."""
    try:
        folder = checkpoint.resolve_model(model)
    except UserError:
        if not (checkpoint.is_hub_id(model) and _online()):
            raise
        folder = hub_headers(str(model))
    headers = [checkpoint.read_header(f) for f in checkpoint.weight_files(folder)]
    for h in headers:  # header-only files (the planner's copies of a Hub model's headers) are fine; cut ones not
        if h.data_start < h.path.stat().st_size and not h.complete:
            raise UserError(f"{h.path} is truncated: its header promises {h.data_end} bytes but the file has "
                            f"{h.path.stat().st_size}. Fix: download or copy the model again.")
    config = checkpoint.read_config(folder)
    tensors = tuple(t for h in headers for t in h.tensors.values())
    return ModelSize(folder, config, tensors, has_weights=all(h.complete for h in headers))


def size_adapter(adapter: str | os.PathLike) -> ModelSize:
    """Size a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), from headers."""
    folder = Path(adapter).expanduser()
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise UserError(f"{folder} is not a LoRA adapter folder (no adapter_model.safetensors). Fix: pass "
                        f"the folder that train or peft's save_pretrained wrote.")
    config = checkpoint.read_json(folder / "adapter_config.json", fix="re-save the adapter with peft")
    header = checkpoint.read_header(file)
    return ModelSize(folder, config, tuple(header.tensors.values()), has_weights=header.complete)


def lora_targets(base: ModelSize, adapter: ModelSize) -> list[TensorInfo]:
    """Base tensors that the adapter changes (from its lora_A / lora_B tensor names)."""
    by_name = {t.name: t for t in base.tensors}
    found = {}
    for t in adapter.tensors:
        m = re.match(r"(?:base_model\.model\.)?(.*)\.lora_[AB](?:\.\w+)?\.weight$", t.name)
        if m:
            for candidate in (m.group(1) + ".weight", "model." + m.group(1) + ".weight"):
                if candidate in by_name:
                    found[candidate] = by_name[candidate]
    return list(found.values())


# ------------------------------------------------------------------------------------------- GGUF sizes


def gguf_sizes(model: ModelSize, methods: list[str]) -> dict[str, tuple[int, bool]]:
    """(bytes, exact) of ``model``'s GGUF file for each method.

    A folder the converter can read (it has a tokenizer) gets its exact size: the converter's layout for the
    first method gives the bytes before the data (header, metadata, tensor infos: the same for every
    method), and each method adds its tensor data (:func:`gguf_data_bytes`). Header-only folders get an
    estimate of the metadata instead."""
    if not methods:
        return {}
    from unsloth_nb.gguf import arch, convert

    data = {m: gguf_data_bytes(model, m) for m in methods}
    has_tokenizer = any((model.path / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
    if not has_tokenizer or arch.architecture_name(model.config) not in arch.ARCHITECTURES:
        head = estimate_gguf_metadata(model)
        return {m: (head + data[m], False) for m in methods}
    head = convert.file_layout(model.path, methods[0], require_data=model.has_weights).metadata_size
    return {m: (head + data[m], True) for m in methods}


def estimate_gguf_size(model: ModelSize, method: str) -> int:
    """GGUF bytes without the converter: metadata estimate plus the exact tensor data of ``method``."""
    return estimate_gguf_metadata(model) + gguf_data_bytes(model, method)


def gguf_data_bytes(model: ModelSize, method: str) -> int:
    """Bytes of the GGUF data section for ``method``: each tensor the converter writes, in the type llama.cpp's
    mix gives it (recipes.tensor_type), padded to 32 bytes. Exact, not a flat bits-per-weight guess."""
    from unsloth_nb.gguf import recipes

    chosen = recipes.resolve(method)
    tensors, shape = _gguf_tensors(model)
    return sum(layout.aligned(layout.nbytes(dims, recipes.tensor_type(chosen, name, dims, shape)))
               for name, dims, _ in tensors)


def estimate_gguf_metadata(model: ModelSize) -> int:
    """Bytes before the GGUF data: header, tensor infos (exact) and key/values, which are mostly the
    vocabulary (estimated from its size: real vocabularies take 20-60 bytes per token)."""
    infos = 24  # magic, version, tensor count, key/value count
    for name, dims, _ in _gguf_tensors(model)[0]:
        infos += 8 + len(name.encode()) + 4 + 8 * len(dims) + 4 + 8
    return layout.aligned(infos + METADATA_BYTES_PER_TOKEN * _vocab_size(model) + 16 * 1024)


def _gguf_tensors(model: ModelSize) -> tuple[list[tuple[str, tuple[int, ...], int | None]], recipes.ModelShape]:
    """(GGUF name, torch-order shape, rows per head of a permuted q/k) of every tensor the converter writes,
    in file order, and the facts its type mix needs: asked of the converter itself (headers only). An
    architecture the native converter does not write (the llama.cpp backend converts it) keeps its HF names."""
    from unsloth_nb.gguf import arch, convert

    if arch.architecture_name(model.config) in arch.ARCHITECTURES:
        _, sources, shape = convert.tensor_sources(model.path, require_data=False)
        return [(s.name, s.shape, convert.head_rows(s)) for s in sources], shape
    heads = int(model.config.get("num_attention_heads", 1))
    shape = recipes.ModelShape(int(model.config.get("num_hidden_layers", 0)), heads,
                               int(model.config.get("num_key_value_heads") or heads), True)
    return [(t.name, t.shape, None) for t in model.tensors], shape


def _tokenizer_bytes(model: ModelSize) -> int:
    file = model.path / "tokenizer.json"
    return file.stat().st_size if file.is_file() else TOKENIZER_BYTES_PER_TOKEN * _vocab_size(model)


def _vocab_size(model: ModelSize) -> int:
    return int(model.config.get("vocab_size") or 32000)


# ------------------------------------------------------------------------------------------- planning


def parse_methods(methods: str | list[str] | tuple[str, ...]) -> list[str]:
    """Canonical method names from "q4_k_m,q8_0" or a list; an unknown name raises UserError."""
    from unsloth_nb.gguf import recipes

    items = methods.split(",") if isinstance(methods, str) else list(methods)
    out: list[str] = []
    for item in items:
        if item.strip():
            name = recipes.resolve(item.strip()).name
            if name not in out:
                out.append(name)
    return out


def make_plan(
    model: str | os.PathLike,
    methods: str | list[str] = "q4_k_m",
    out: str | os.PathLike | None = None,
    *,
    adapter: str | os.PathLike | None = None,
    fused: bool = False,
    merged_out: str | os.PathLike | None = None,
    runtime: Runtime | None = None,
    device: str | None = None,
    imatrix_tokens: int | None = None,
) -> Plan:
    """Plan merge (when an adapter is given and not ``fused``) and GGUF conversion for each method.

    ``out`` holds the GGUF files (default: placed by platform); the merged copy goes to ``merged_out``
    (default ``out/merged``). ``methods`` may be empty to plan a merge alone. ``device`` "cpu" plans no VRAM.
    ``imatrix_tokens`` plans an importance matrix over that many tokens of data first (its memory and time).
    Reads only headers and writes nothing."""
    rt = runtime or detect()
    base = size_model(model)
    lora = size_adapter(adapter) if adapter is not None else None
    names = parse_methods(methods)
    if lora is None and not names:
        raise UserError("Nothing to plan: give GGUF methods (e.g. --quant q4_k_m) or a LoRA adapter to "
                        "merge.")
    sizes = gguf_sizes(base, names)
    gpu = bool(rt.gpus) and device != "cpu"

    def build(folder: Path, chosen: list[str], use_fused: bool) -> Plan:
        merged = Path(os.path.abspath(merged_out)) if merged_out is not None else folder / "merged"
        plan = Plan(base, rt, list(chosen), folder, Path(adapter) if adapter else None,
                    use_fused and lora is not None)
        plan.steps = _steps(base, lora, chosen, sizes, plan.fused, folder, merged, gpu)
        if imatrix_tokens:
            plan.steps.insert(0, imatrix_step(base, imatrix_tokens, folder / "imatrix.gguf", rt, gpu))
        _check(plan)
        return plan

    if out is not None:
        plan = build(Path(os.path.abspath(out)), names, fused)
    else:
        candidates = [rt.default_dir / DEFAULT_OUT]
        if rt.platform == "kaggle":
            candidates.append(rt.tmp_dir / DEFAULT_OUT)
        plans = [build(folder, names, fused) for folder in candidates]
        plan = next((p for p in plans if p.fits), plans[0])
        if plan is not plans[0]:
            plan.warnings.append(f"the outputs do not fit in {plans[0].out_dir} ({_disk_need(plans[0])}), so "
                                 f"they go to {plan.out_dir} instead.")
    if not rt.is_kept(plan.out_dir):
        plan.warnings.append(_not_kept(rt, plan.out_dir))
    if plan.fused:
        plan.warnings.append(f"there is no merged copy to serve with vLLM: serve the base with the adapter as an "
                             f"adapter (`python -m unsloth_nb serve {base.path} --adapter adapter={adapter}`), "
                             "or the GGUF with llama.cpp.")
    if not plan.fits:
        plan.fixes = _alternatives(plan, build, plan.out_dir, sizes)
        plan.fixes += _elsewhere(plan, build)
    elif rt.platform == "kaggle" and not rt.is_kept(plan.out_dir):
        kept = rt.kaggle_working / DEFAULT_OUT
        if build(kept, names, fused).fits:
            plan.warnings.append(f"everything also fits in {kept}, which Kaggle keeps.")
        else:
            offers = _alternatives(plan, build, kept, sizes)
            if offers:
                plan.warnings.append(f"to keep the outputs in {kept}: " + "; or ".join(offers) + ".")
    return plan


def imatrix_step(base: ModelSize, tokens: int, where: Path, rt: Runtime, gpu: bool) -> Step:
    """The importance matrix over ``tokens`` tokens: the model in float32 on the CPU (bf16/fp16 on the GPU, where
    RAM holds one 16-bit shard while it loads), one forward pass's activations, and a time from the forward
    passes' FLOPs (2 per weight per token); the file holds one float per input column of every matrix."""
    from unsloth_nb.gguf import imatrix

    hidden = base.config.get("hidden_size") or 4096
    per_pass = imatrix.CUDA_TOKENS_PER_FORWARD if gpu else imatrix.TOKENS_PER_FORWARD
    activations = per_pass * int(hidden) * IMATRIX_ACTIVATION_BYTES
    tensors, _ = _gguf_tensors(base)
    disk = sum(4 * (dims[-1] + 1) for name, dims, _ in tensors if name.startswith("blk.") and len(dims) == 2)
    flops = 2 * base.n_params * tokens
    if gpu:
        return Step(f"imatrix ({tokens:,} tokens, GPU)", runtime.BASE_RAM + base.largest.nbytes, disk + 4096, where,
                    vram=base.n_params * 2 + activations, seconds=flops / IMATRIX_GPU_FLOPS)
    ram = runtime.BASE_RAM + base.n_params * 4 + activations
    return Step(f"imatrix ({tokens:,} tokens, CPU)", ram, disk + 4096, where,
                seconds=flops / (IMATRIX_CPU_FLOPS_PER_CORE * max(1, rt.cpu_count)))


def _duration(seconds: float) -> str:
    return f"~{seconds:.0f} s" if seconds < 90 else f"~{seconds / 60:.0f} min"


def lora_params(model: ModelSize, r: int, targets: tuple[str, ...] | list[str]) -> int:
    """Trainable LoRA weights for rank ``r`` on the linear layers named ``targets`` (e.g. "q_proj")."""
    return sum(r * (t.shape[0] + t.shape[1]) for t in model.tensors
               if len(t.shape) == 2 and t.name.endswith(".weight") and t.name.split(".")[-2] in targets)


def tokenizer_files_bytes(folder: Path) -> int:
    """Bytes of the tokenizer and chat-template files in ``folder`` (copied into checkpoints and adapters)."""
    return sum((folder / name).stat().st_size for name in checkpoint.TOKENIZER_FILES if (folder / name).is_file())


QLORA_BYTES_PER_WEIGHT = 0.5 + 0.127 / 8
"""A 4-bit NF4 weight with double-quantized block scales (64 weights a block): bitsandbytes' layout."""
LORA_TRAIN_BYTES_PER_PARAM = 16
"""A trainable LoRA weight in float32, its gradient and AdamW's two moments."""
TRAIN_VRAM_OVERHEAD = 512 * 2**20
"""cuBLAS workspaces, the optimizer's temporaries and the LM head's tiles, beside weights and activations."""
LOGIT_BYTES = {False: 6, True: 12}
"""Bytes per token and vocabulary entry at the loss, by whether the base is 4-bit: 16-bit logits and the float32
log-probabilities the loss keeps; for a 4-bit base peft keeps the LM head in float32, so float32 logits, their
log-probabilities and gradient (a 128k vocabulary makes this several GB at a few thousand tokens a step)."""
QLORA_FLOAT32_HIDDEN = 6
"""Hidden-size values per token and layer that a 4-bit base keeps in float32 rather than 16 bits: peft's float32
embedding and norms make the residual stream float32. With the rest of ``train_vram`` this gave 1.04x the peak
measured for an 8B-shaped model (H200, 4,096 tokens a step, ``benchmarks/train_vram_vs_plan.py``)."""


def activation_bytes_per_token(config: dict) -> int:
    """Bytes one decoder layer keeps per token for the backward pass when nothing is recomputed (eager
    PyTorch, 16-bit): the norms' inputs and float32 intermediates, q/k/v and the attention output, and the MLP's
    gate, up and product (what autograd saves in a Llama-type layer)."""
    h = int(config.get("hidden_size") or 0)
    m = int(config.get("intermediate_size") or 4 * h)
    heads = int(config.get("num_attention_heads") or 1)
    kv = h * int(config.get("num_key_value_heads") or heads) // heads
    return 2 * (14 * h + 4 * m + 2 * kv)


def train_vram(base: ModelSize, *, r: int, targets: tuple[str, ...] | list[str], tokens: int, load_in_4bit: bool,
               gradient_checkpointing: bool) -> int:
    """Peak GPU memory of LoRA training on ``tokens`` tokens a step (batch x longest row): an upper bound that
    takes every row at the longest length. 4-bit keeps the decoder's linear weights in NF4 and the rest in
    float32; gradient checkpointing keeps each layer's input and one layer's activations at a time; the loss
    holds the logits over the whole vocabulary."""
    layers = int(base.config.get("num_hidden_layers") or 1)
    linear = sum(t.numel for t in base.tensors if len(t.shape) == 2 and ".layers." in t.name)
    # a 4-bit base: NF4 decoder weights, and peft casts every other weight to float32
    weights = (linear * QLORA_BYTES_PER_WEIGHT + (base.n_params - linear) * 4) if load_in_4bit else base.n_params * 2
    hidden = int(base.config.get("hidden_size") or 0) * tokens
    per_layer = activation_bytes_per_token(base.config) * tokens + (2 * QLORA_FLOAT32_HIDDEN * hidden
                                                                    if load_in_4bit else 0)
    kept = layers * 2 * hidden + per_layer if gradient_checkpointing else layers * per_layer
    logits = LOGIT_BYTES[load_in_4bit] * tokens * _vocab_size(base)
    return int(weights + lora_params(base, r, targets) * LORA_TRAIN_BYTES_PER_PARAM + kept + 4 * hidden + logits
               + TRAIN_VRAM_OVERHEAD)


TRAIN_VRAM_WARNING = ("training may need up to {need} of GPU memory (every row at the longest length) and the GPU "
                      "has {free} free: a smaller batch_size or max_seq_len, gradient_checkpointing=True or "
                      "load_in_4bit=True need less.")


def plan_train(model: str | os.PathLike, out: str | os.PathLike, *, r: int, targets: tuple[str, ...] | list[str],
               checkpoints: str | os.PathLike, runtime: Runtime | None = None, batch_size: int = 2,
               max_seq_len: int = 2048, load_in_4bit: bool = False, gradient_checkpointing: bool = True) -> Plan:
    """Plan what a fine-tune needs: the disk of its resumable checkpoints (next to ``out``) and of the final
    adapter, and on a machine with a GPU its peak GPU memory (:func:`train_vram`).

    Reads only headers; ``require()`` refuses before training starts when the files cannot fit."""
    rt = runtime or detect()
    base = size_model(model)
    params = lora_params(base, r, targets)
    tokenizer = tokenizer_files_bytes(base.path)
    one = params * CHECKPOINT_BYTES_PER_LORA_PARAM + tokenizer + CHECKPOINT_EXTRA_BYTES
    out_dir = Path(os.path.abspath(out))
    plan = Plan(base, rt, [], out_dir)
    plan.steps = [
        Step(f"train checkpoints ({CHECKPOINTS_AT_ONCE} at the peak)", 0, CHECKPOINTS_AT_ONCE * one,
             Path(os.path.abspath(checkpoints))),
        Step("train adapter", 0, params * 4 + tokenizer, out_dir),
    ]
    if rt.gpus:
        vram = train_vram(base, r=r, targets=targets, tokens=batch_size * max_seq_len, load_in_4bit=load_in_4bit,
                          gradient_checkpointing=gradient_checkpointing)
        plan.steps.append(Step("train on the GPU" + (" (4-bit base)" if load_in_4bit else ""), 0, 0, out_dir,
                               vram=vram, vram_warning=TRAIN_VRAM_WARNING))
    _check(plan)
    if not plan.fits:
        plan.fixes = _elsewhere(plan, lambda *a: plan)
        plan.fixes.append("save fewer adapter weights (a smaller rank r or fewer target modules)")
    if not rt.is_kept(out_dir):
        plan.warnings.append(_not_kept(rt, out_dir))
    return plan


def _not_kept(rt: Runtime, folder: Path) -> str:
    if rt.platform == "kaggle":
        return (f"{folder} is not kept after the Kaggle session (only /kaggle/working is saved with the "
                f"notebook): download or upload the files before the session ends.")
    if rt.platform == "colab" and not str(folder).startswith(str(rt.tmp_dir)):
        return (f"Colab deletes {folder} when the runtime is recycled: copy the files to Google Drive or "
                f"download them.")
    return f"{folder} is deleted when the session ends: copy what you need."


def _steps(base: ModelSize, lora: ModelSize | None, methods: list[str], sizes: dict[str, tuple[int, bool]],
           fused: bool, folder: Path, merged: Path, gpu: bool) -> list[Step]:
    """The rows: the merge (peak = one tensor and the adapter) then one row per GGUF file (one pass writes
    them all, so they share the pass's peak RAM). Every output stays on disk until the end."""
    steps = []
    if lora is not None and not fused:
        ram = runtime.BASE_RAM + max(2 * base.largest.nbytes, _adapter_ram(base, lora))
        steps.append(Step("merge (16-bit copy)", ram, base.bytes_16bit + base.extra_bytes, merged))
    if methods:
        ram = gguf_ram(base, methods, lora if fused else None, gpu)
        vram = (layout.GPU_WORKERS * layout.GPU_CHUNK_FACTOR * gguf_chunk_elements(base) * layout.WORK_BYTES
                if gpu else 0)
        tag = " (fused LoRA)" if fused else ""
        for m in methods:
            size, exact = sizes[m]
            steps.append(Step(f"gguf {m.upper()}{tag}", ram, size, folder / f"{base.name}.{m.upper()}.gguf",
                              vram=vram, exact=exact))
    return steps


def _adapter_ram(base: ModelSize, lora: ModelSize) -> int:
    """The adapter in float32 plus the working copies of its largest target while it is merged."""
    targets = lora_targets(base, lora) or [base.largest]
    return checkpoint.merge_working_bytes(lora.n_params, max(t.numel for t in targets))


def gguf_ram(base: ModelSize, methods: list[str], lora: ModelSize | None = None, gpu: bool = False) -> int:
    """Peak RAM of one GGUF pass writing every method in ``methods`` (fusing ``lora`` when given; on a GPU
    without one, the encoded chunks quantized ahead of the writer count too)."""
    return runtime.BASE_RAM + layout.peak_ram(
        gguf_chunk_elements(base, whole=lora is not None), methods, _tokenizer_bytes(base),
        fused_adapter_bytes=_adapter_ram(base, lora) if lora is not None else 0, gpu=gpu,
        output_bytes=base.n_params * sum(layout.bits_per_weight(m) for m in methods) // 8)


def gguf_chunk_elements(model: ModelSize, whole: bool = False) -> int:
    """Elements of the largest piece the converter holds at once: one row chunk (whole heads for permuted
    q/k), or with ``whole`` (an adapter fused while converting) the largest tensor."""
    tensors, _ = _gguf_tensors(model)
    return layout.largest_chunk([(dims, head_rows) for _, dims, head_rows in tensors], whole=whole)


def _check(plan: Plan) -> None:
    """Mark each step's fit (RAM; disk with all earlier outputs still present) and record the problems."""
    rt = plan.runtime
    used: dict[str, int] = {}
    free: dict[str, int] = {}
    folders: dict[str, Path] = {}
    for step in plan.steps:
        key = rt.volume(step.where)
        free.setdefault(key, rt.free_disk(step.where))
        home = plan.out_dir if rt.volume(plan.out_dir) == key else step.where
        folders.setdefault(key, home.parent if home.suffix == ".gguf" else home)
        used[key] = used.get(key, 0) + step.disk
        step.fits = used[key] <= free[key] and step.ram <= plan.ram_budget
    for key, need in used.items():
        if need > free[key]:
            plan.problems.append(f"The outputs need {gb(need)} of disk in {folders[key]}, which has "
                                 f"{gb(free[key])} free ({gb(need - free[key])} short).")
    heavy = max(plan.steps, key=lambda s: s.ram, default=None)
    if heavy is not None and heavy.ram > plan.ram_budget:
        plan.problems.append(runtime.ram_problem(heavy.name, heavy.ram, rt))
    if rt.gpus and any(s.vram for s in plan.steps):
        step = max(plan.steps, key=lambda s: s.vram)
        best = max(g.free_vram for g in rt.gpus)
        if step.vram > best:
            plan.warnings.append(step.vram_warning.format(need=gb(step.vram), free=gb(best)))


def _disk_need(plan: Plan) -> str:
    need = sum(s.disk for s in plan.steps)
    return f"{gb(need)} needed, {gb(plan.runtime.free_disk(plan.out_dir))} free"


def _alternatives(plan: Plan, build, folder: Path, sizes: dict[str, tuple[int, bool]]) -> list[str]:
    """Smaller variants of ``plan`` that fit in ``folder``: the fused path, then fewer methods."""
    offers = []
    can_fuse = plan.adapter is not None and not plan.fused and bool(plan.methods)
    if can_fuse and build(folder, plan.methods, True).fits:
        saved = sum(s.disk for s in plan.steps if s.name.startswith("merge"))
        offers.append(f"use the fused LoRA->GGUF path (the `gguf` command with --adapter: no merged copy, "
                      f"{gb(saved)} less), which fits in {folder}")
        offers.append(f"serve it without a merged copy: vLLM serves the base with the adapter as an adapter "
                      f"(`python -m unsloth_nb serve {plan.model.path} --adapter adapter={plan.adapter}`, "
                      "serve(base, adapters={'adapter': ADAPTER_DIR}) in a notebook)")
    if len(plan.methods) > 1:
        keep: list[str] = []
        for m in sorted(plan.methods, key=lambda m: sizes[m][0]):
            if build(folder, keep + [m], plan.fused).fits:
                keep.append(m)
        if keep:
            verb = "fits" if len(keep) == 1 else "fit"
            offers.append(f"convert fewer methods ({', '.join(keep)} {verb} in {folder})")
    return offers


def _elsewhere(plan: Plan, build) -> list[str]:
    """More RAM when a step's peak is over budget; another folder when the disk is short: /tmp on Kaggle
    when everything fits there, else any folder with enough free space."""
    fixes = []
    rt = plan.runtime
    if any(s.ram > plan.ram_budget for s in plan.steps):
        need = max(s.ram for s in plan.steps) / runtime.RAM_SHARE.get(rt.platform, 0.9)
        fixes.append(f"use a machine with at least {gb(need)} of available RAM")
    if any(not s.fits and s.ram <= plan.ram_budget for s in plan.steps):
        need = sum(s.disk for s in plan.steps)
        tmp = rt.tmp_dir / DEFAULT_OUT
        if rt.platform == "kaggle" and plan.out_dir != tmp and build(tmp, plan.methods, plan.fused).fits:
            fixes.append(f"write to {tmp} (--out; {gb(rt.free_disk(tmp))} free, but not kept after the "
                         f"session)")
        else:
            fixes.append(f"choose another folder with at least {gb(need)} free (--out)")
    return fixes


def run_cli(args: argparse.Namespace) -> int:
    """``python -m unsloth_nb plan MODEL --quant q4_k_m,q8_0 [--out DIR] [--adapter A]``: print the plan;
    exit 1 with the reason when it does not fit."""
    plan = make_plan(args.model, args.quant, args.out, adapter=args.adapter)
    print(plan)
    plan.require()
    return 0


