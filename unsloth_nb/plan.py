"""Plan before doing: what each step needs (RAM, VRAM, disk), where its outputs go, and whether it fits.

A model is sized from its safetensors headers alone (no weight is read). GGUF sizes come from the converter's
own layout when the folder can be converted (exact), else from the per-tensor type mix of each method
(recipes.tensor_type) plus an estimate of the metadata. Placement follows the platform: on Kaggle outputs go
to /kaggle/working while they fit its 20 GB, else to /tmp with a warning; on Colab no step may plan more than
75% of the available RAM. Steps call ``make_plan(...).require()`` before writing anything.
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

from unsloth_nb.errors import UserError
from unsloth_nb.runtime import Runtime, detect, gb

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
"""Bytes per element of each safetensors dtype."""

RAM_SHARE = {"colab": 0.75, "kaggle": 0.9, "local": 0.9}
"""Largest share of the available RAM a plan may use: Colab kills the kernel without a word when full."""

BASE_RAM = 480 * 10**6
"""Resident memory of a step's Python process before the first tensor (interpreter, torch, transformers:
465 MB measured on CPU)."""

TOKENIZER_RAM_FACTOR = 28
"""The GGUF converter holds about this many bytes per byte of tokenizer.json while it builds the vocabulary
metadata (fitted with GGUF_WORK_BYTES on the fixture models' peak RSS: Llama-3 BPE and SentencePiece)."""

TOKENIZER_BYTES_PER_TOKEN = 130
"""tokenizer.json bytes per vocabulary entry, for folders without one (real files: 75-135)."""

GGUF_CHUNK_ELEMENTS = 1 << 22
"""The converter reads a tensor in row chunks of at most this many elements (convert.CHUNK_ELEMENTS);
Llama's q/k projections in chunks of whole heads, because their rows are permuted within a head."""

GGUF_IN_FLIGHT = 6
"""Chunks the converter holds at once at most on the CPU (convert.IN_FLIGHT with 4 or more cores). On a GPU it
reads two chunks GGUF_GPU_CHUNK_FACTOR times larger at a time (less host RAM, as they stay 16-bit) and quantizes
them in GPU memory; the encoded chunks waiting for the writer count separately (GGUF_GPU_LOOKAHEAD_BYTES)."""

GGUF_GPU_CHUNK_FACTOR = 4
"""convert.GPU_CHUNK_FACTOR: how much larger the converter's chunks are on a GPU."""

GGUF_GPU_LOOKAHEAD_BYTES = 512 << 20
"""convert.GPU_LOOKAHEAD_BYTES: encoded bytes a GPU pass may hold for the writer (at most the outputs' size)."""

GGUF_WORK_BYTES = 10
"""Working bytes per element of a chunk while converting: its float32 copy plus the quantizer's buffers."""

METADATA_BYTES_PER_TOKEN = 50
"""GGUF key/value bytes per vocabulary entry (token text, type, score or merges) for header-only models."""

MERGE_WORK_BYTES = 12
"""Working bytes per element while merging one LoRA target: float32 weight, float32 B @ A, 16-bit result."""

GGUF_ALIGNMENT = 32
"""GGUF aligns the data section and each tensor's data to 32 bytes."""

CHECKPOINT_BYTES_PER_LORA_PARAM = 12
"""A training checkpoint holds the LoRA weights (float32) and AdamW's two float32 moments per weight."""

CHECKPOINT_EXTRA_BYTES = 2 * 10**6
"""Per checkpoint besides the weights and the tokenizer files: trainer state, scheduler, RNG states, configs."""

CHECKPOINTS_AT_ONCE = 3
"""The trainer keeps 2 checkpoints and writes the next before deleting the oldest: 3 exist at the peak."""

TOKENIZER_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
                           "vocab.json", "merges.txt")
"""Files a checkpoint and an adapter folder carry along with the weights (the tokenizer and its template)."""

DEFAULT_OUT = "unsloth_nb_out"
"""Folder name for outputs when the user did not choose one."""

_ARCH_ALIASES = {"mistral": "llama"}
_SKIPPED = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by a safetensors header."""

    name: str
    """Name in the checkpoint, e.g. "model.layers.0.self_attn.q_proj.weight"."""
    dtype: str
    """safetensors dtype, e.g. "BF16"."""
    shape: tuple[int, ...]
    """Shape in torch order."""

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of its data in the checkpoint."""
        return self.numel * DTYPE_BYTES[self.dtype]


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
        if self.path.parent.name == "snapshots" and self.path.parent.parent.name.startswith("models--"):
            return self.path.parent.parent.name.split("--")[-1]
        return self.path.name or "model"

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
        return {dtype: n * DTYPE_BYTES[dtype] for dtype, n in self.params_by_dtype.items()}

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
        return int(self.runtime.available_ram * RAM_SHARE.get(self.runtime.platform, 0.9))

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
        head = ["step", "needs RAM"] + (["needs VRAM"] if gpu else []) + ["needs disk", "where", "fits?"]
        rows = [head]
        for s in self.steps:
            disk = gb(s.disk) if s.exact else f"~{gb(s.disk)}"
            vram = [gb(s.vram) if s.vram else "-"] if gpu else []
            rows.append([s.name, gb(s.ram), *vram, disk, str(s.where), "yes" if s.fits else "NO"])
        return rows

    def _header(self) -> list[str]:
        rt = self.runtime
        lines = [self.model.describe()]
        if self.adapter is not None:
            how = "fused into the GGUF, no merged copy" if self.fused else "merged first"
            lines.append(f"adapter {self.adapter} ({how})")
        share = int(RAM_SHARE.get(rt.platform, 0.9) * 100)
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


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """The JSON header of a .safetensors file (``__metadata__`` removed) and where its data section starts.

    The one place unsloth_nb parses safetensors headers: planning, merging, converting and serving use it.
    Reads only the 8-byte little-endian header length and the JSON after it, so header-only files work."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise UserError(f"{path} is not a safetensors file (shorter than 8 bytes). Fix: re-download it.")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 2**20:
                raise UserError(f"{path} is not a safetensors file (header length {length}). Fix: re-download it.")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise UserError(f"Cannot read {path} ({exc.strerror or exc}). Fix: check the path and permissions.") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} has a damaged safetensors header ({exc}). Fix: re-download it.") from exc
    if not isinstance(header, dict):
        raise UserError(f"{path} has a damaged safetensors header (not a JSON object). Fix: re-download it.")
    header.pop("__metadata__", None)
    return header, 8 + length


def read_safetensors_header(path: str | os.PathLike) -> tuple[list[TensorInfo], int]:
    """The tensors a .safetensors file declares and the byte size its data section must have."""
    header, start = read_header(path)
    tensors, end = [], 0
    for name, info in header.items():
        if info["dtype"] not in DTYPE_BYTES:
            raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which unsloth_nb cannot "
                            f"plan for.")
        tensors.append(TensorInfo(name, info["dtype"], tuple(int(d) for d in info["shape"])))
        end = max(end, int(info["data_offsets"][1]))
    return tensors, start + end


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def resolve_model(model: str | os.PathLike) -> Path:
    """A model folder, or for a Hub id ("org/name") its snapshot in the local Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.is_file() and path.suffix == ".gguf":
        raise UserError(f"{path} is a GGUF file, but this step reads a Hugging Face model folder (config.json and "
                        "*.safetensors). Fix: pass the folder the GGUF was made from (the merged model); GGUF "
                        "files are for `serve` and `verify`.")
    if path.exists():
        raise UserError(f"{path} is a file, not a model folder. Fix: pass the folder that holds config.json and "
                        "*.safetensors.")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text) or text.startswith((".", "/")):
        raise UserError(f"The model folder {text} does not exist. Fix: pass the folder that holds config.json "
                        "and *.safetensors, or a Hub id like 'meta-llama/Llama-3.2-1B' that you downloaded "
                        "before.")
    repo = hf_cache_dir() / ("models--" + text.replace("/", "--"))
    snapshots = []
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshots.append(repo / "snapshots" / ref.read_text().strip())
    if (repo / "snapshots").is_dir():
        snapshots += sorted((repo / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snap in snapshots:
        if (snap / "config.json").is_file() and any(snap.glob("*.safetensors")):
            return snap
    raise UserError(
        f"Model {text!r} is not a local folder and is not in the Hugging Face cache ({hf_cache_dir()}); "
        f"unsloth_nb reads models from local files and does not download them. Fix: download it first "
        f"(`huggingface-cli download {text}` or huggingface_hub.snapshot_download) or pass its folder."
    )


def _hub_id(model: str | os.PathLike) -> bool:
    text = str(model)
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not text.startswith((".", "/"))


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
                        f"({hf_cache_dir()}), and its size could not be read from the Hub ({type(exc).__name__}: "
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
        folder = resolve_model(model)
    except UserError:
        if not (_hub_id(model) and _online()):
            raise
        folder = hub_headers(str(model))
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no config.json. Fix: pass a Hugging Face model folder.")
    config = json.loads(config_path.read_text())
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [folder / name for name in files]
    else:
        paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise UserError(f"{folder} holds no *.safetensors files (only those are supported). Fix: re-save the "
                        f"model with save_pretrained(..., safe_serialization=True).")
    tensors: list[TensorInfo] = []
    complete = True
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p} is listed in the model's index but missing. "
                            f"Fix: download the missing shard.")
        found, expected = read_safetensors_header(p)
        tensors += found
        complete = complete and p.stat().st_size >= expected
    return ModelSize(folder, config, tuple(tensors), has_weights=complete)


def size_adapter(adapter: str | os.PathLike) -> ModelSize:
    """Size a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)."""
    folder = Path(adapter).expanduser()
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise UserError(f"{folder} is not a LoRA adapter folder (no adapter_model.safetensors). Fix: pass "
                        f"the folder that train or peft's save_pretrained wrote.")
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    tensors, expected = read_safetensors_header(file)
    return ModelSize(folder, config, tuple(tensors), has_weights=file.stat().st_size >= expected)


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
    data = {m: gguf_data_bytes(model, m) for m in methods}
    if not any((model.path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        head = estimate_gguf_metadata(model)
        return {m: (head + data[m], False) for m in methods}
    from unsloth_nb.gguf import convert

    first = convert.layout(model.path, methods[0])
    if first.size != first.metadata_size + data[methods[0]]:
        # The converter writes tensors this planner does not know of: ask it for every method.
        return {m: (int(convert.layout(model.path, m).size), True) for m in methods}
    return {m: (first.metadata_size + data[m], True) for m in methods}


def estimate_gguf_size(model: ModelSize, method: str) -> int:
    """GGUF bytes without the converter: metadata estimate plus the exact tensor data of ``method``."""
    return estimate_gguf_metadata(model) + gguf_data_bytes(model, method)


def gguf_data_bytes(model: ModelSize, method: str) -> int:
    """Bytes of the GGUF data section for ``method``: each tensor in the type llama.cpp's mix gives it
    (recipes.tensor_type), padded to 32 bytes. Exact, not a flat bits-per-weight guess."""
    import gguf

    from unsloth_nb.gguf import recipes

    chosen = recipes.resolve(method)
    shape = _model_shape(model)
    data = 0
    for name, dims in _gguf_tensors(model):
        block, type_size = gguf.GGML_QUANT_SIZES[recipes.tensor_type(chosen, name, dims, shape)]
        data += _align(_prod(dims) // block * type_size)
    return data


def estimate_gguf_metadata(model: ModelSize) -> int:
    """Bytes before the GGUF data: header, tensor infos (exact) and key/values, which are mostly the
    vocabulary (estimated from its size: real vocabularies take 20-60 bytes per token)."""
    infos = 24  # magic, version, tensor count, key/value count
    for name, dims in _gguf_tensors(model):
        infos += 8 + len(name.encode()) + 4 + 8 * len(dims) + 4 + 8
    return _align(infos + METADATA_BYTES_PER_TOKEN * _vocab_size(model) + 16 * 1024)


def _model_shape(model: ModelSize):
    from unsloth_nb.gguf import recipes

    cfg = model.config
    heads = int(cfg.get("num_attention_heads", 1))
    return recipes.ModelShape(
        n_layer=int(cfg.get("num_hidden_layers", 0)),
        n_head=heads,
        n_head_kv=int(cfg.get("num_key_value_heads") or heads),
        has_output=any(name == "output.weight" for name, _ in _gguf_tensors(model)),
    )


def _gguf_tensors(model: ModelSize) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, torch-order shape) of every tensor the converter writes, in checkpoint order."""
    names = _gguf_names(model)
    out = [(names[t.name], t.shape) for t in model.tensors if t.name in names]
    cfg = model.config
    if (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3" and cfg.get("model_type") == "llama":
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        out.append(("rope_freqs.weight", (head_dim // 2,)))
    return out


def _tokenizer_bytes(model: ModelSize) -> int:
    file = model.path / "tokenizer.json"
    return file.stat().st_size if file.is_file() else TOKENIZER_BYTES_PER_TOKEN * _vocab_size(model)


def _vocab_size(model: ModelSize) -> int:
    return int(model.config.get("vocab_size") or 32000)


def _prod(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _gguf_names(model: ModelSize) -> dict[str, str]:
    """Checkpoint name -> GGUF name through gguf-py's tables (unknown names keep their own)."""
    import gguf

    kind = str(model.config.get("model_type", "llama"))
    kind = _ARCH_ALIASES.get(kind, kind)
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == kind), gguf.MODEL_ARCH.LLAMA)
    table = gguf.get_tensor_name_map(arch, int(model.config.get("num_hidden_layers", 0)))
    out = {}
    for t in model.tensors:
        if t.name.endswith(_SKIPPED):
            continue
        out[t.name] = table.get_name(t.name, try_suffixes=(".weight", ".bias")) or t.name
    return out


def _align(n: int) -> int:
    return (n + GGUF_ALIGNMENT - 1) // GGUF_ALIGNMENT * GGUF_ALIGNMENT


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
) -> Plan:
    """Plan merge (when an adapter is given and not ``fused``) and GGUF conversion for each method.

    ``out`` holds the GGUF files (default: placed by platform); the merged copy goes to ``merged_out``
    (default ``out/merged``). ``methods`` may be empty to plan a merge alone. ``device`` "cpu" plans no VRAM.
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


def lora_params(model: ModelSize, r: int, targets: tuple[str, ...] | list[str]) -> int:
    """Trainable LoRA weights for rank ``r`` on the linear layers named ``targets`` (e.g. "q_proj")."""
    return sum(r * (t.shape[0] + t.shape[1]) for t in model.tensors
               if len(t.shape) == 2 and t.name.endswith(".weight") and t.name.split(".")[-2] in targets)


def tokenizer_files_bytes(folder: Path) -> int:
    """Bytes of the tokenizer and chat-template files in ``folder`` (copied into checkpoints and adapters)."""
    files = {p for pattern in TOKENIZER_FILE_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return sum(p.stat().st_size for p in files)


def plan_train(model: str | os.PathLike, out: str | os.PathLike, *, r: int, targets: tuple[str, ...] | list[str],
               checkpoints: str | os.PathLike, runtime: Runtime | None = None) -> Plan:
    """Plan the disk a fine-tune writes: its resumable checkpoints (next to ``out``) and the final adapter.

    Reads only headers; ``require()`` refuses before training starts when they cannot fit."""
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
        ram = BASE_RAM + max(2 * base.largest.nbytes, _adapter_ram(base, lora))
        steps.append(Step("merge (16-bit copy)", ram, base.bytes_16bit + base.extra_bytes, merged))
    if methods:
        ram = gguf_ram(base, methods, lora if fused else None, gpu)
        vram = 2 * GGUF_GPU_CHUNK_FACTOR * gguf_chunk_elements(base) * GGUF_WORK_BYTES if gpu else 0
        tag = " (fused LoRA)" if fused else ""
        for m in methods:
            size, exact = sizes[m]
            steps.append(Step(f"gguf {m.upper()}{tag}", ram, size, folder / f"{base.name}.{m.upper()}.gguf",
                              vram=vram, exact=exact))
    return steps


def _adapter_ram(base: ModelSize, lora: ModelSize) -> int:
    """The adapter in float32 plus the working copies of its largest target while it is merged."""
    targets = lora_targets(base, lora) or [base.largest]
    return lora.n_params * 4 + max(t.numel for t in targets) * MERGE_WORK_BYTES


def gguf_ram(base: ModelSize, methods: list[str], lora: ModelSize | None = None, gpu: bool = False) -> int:
    """Peak RAM of one GGUF pass writing every method in ``methods`` (fusing ``lora`` when given; on a GPU
    without one, the encoded chunks quantized ahead of the writer count too)."""
    chunk = gguf_chunk_elements(base, whole=lora is not None)
    per_chunk = GGUF_WORK_BYTES + sum(_bits(m) for m in methods) // 8
    held = 1 if lora is not None else GGUF_IN_FLIGHT  # fused: one whole tensor at a time
    ram = BASE_RAM + TOKENIZER_RAM_FACTOR * _tokenizer_bytes(base) + held * chunk * per_chunk
    if gpu and lora is None:
        ram += min(GGUF_GPU_LOOKAHEAD_BYTES, base.n_params * sum(_bits(m) for m in methods) // 8)
    return ram + (_adapter_ram(base, lora) if lora is not None else 0)


def require_ram(step: str, need: int, runtime: Runtime | None = None) -> None:
    """Refuse (UserError) before a step whose peak RAM is over this runtime's budget."""
    rt = runtime or detect()
    budget = int(rt.available_ram * RAM_SHARE.get(rt.platform, 0.9))
    if need > budget:
        raise UserError(_ram_problem(step, need, rt) + " Fix: use a machine with more RAM, or do less in one "
                        "call (fewer GGUF methods at once).")


def _ram_problem(step: str, need: int, rt: Runtime) -> str:
    share = RAM_SHARE.get(rt.platform, 0.9)
    budget = int(rt.available_ram * share)
    return (f"{step} needs about {gb(need)} of RAM at its peak; this {rt.platform} runtime has "
            f"{gb(rt.available_ram)} available and plans use at most {int(share * 100)}% of it ({gb(budget)}, "
            f"{gb(need - budget)} short).")


def gguf_chunk_elements(model: ModelSize, whole: bool = False) -> int:
    """Elements of the largest piece the converter holds at once: one row chunk (rounded to whole heads for
    permuted q/k), or with ``whole`` (an adapter fused while converting) the largest tensor."""
    permuted = model.config.get("model_type") in ("llama", "mistral")
    biggest = 0
    for t in model.tensors:
        if len(t.shape) < 2 or whole:
            biggest = max(biggest, t.numel)
            continue
        row = t.numel // t.shape[0]
        rows = max(1, GGUF_CHUNK_ELEMENTS // row)
        if permuted and t.name.endswith(("q_proj.weight", "k_proj.weight")):
            head_dim = int(model.config.get("head_dim") or model.config.get("hidden_size", row)
                           // max(1, int(model.config.get("num_attention_heads", 1))))
            rows = max(1, rows // max(1, head_dim)) * max(1, head_dim)
        biggest = max(biggest, min(t.numel, rows * row))
    return biggest


def _bits(method: str) -> int:
    """Upper bound on bits per weight of a method, for the output buffer of one tensor."""
    return {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 9}.get(method, 7)


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
        plan.problems.append(_ram_problem(heavy.name, heavy.ram, rt))
    if rt.gpus and any(s.vram for s in plan.steps):
        need = max(s.vram for s in plan.steps)
        best = max(g.free_vram for g in rt.gpus)
        if need > best:
            plan.warnings.append(f"quantizing the largest tensor needs about {gb(need)} of GPU memory and "
                                 f"the GPU has {gb(best)} free: use device='cpu'.")


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
        need = max(s.ram for s in plan.steps) / RAM_SHARE.get(rt.platform, 0.9)
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


