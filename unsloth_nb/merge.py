"""Streaming merge of a LoRA adapter into its 16-bit base, one tensor in memory at a time.

peft's ``merge_and_unload()`` + ``save_pretrained()`` holds the whole model (often twice); here each base
tensor is read from its safetensors shard, merged as ``W + scaling * (B @ A)`` in float32, cast back to the
base dtype and streamed into the output shard. The same :class:`MergedModel` feeds the GGUF writer directly
(the fused path: no merged copy on disk).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from unsloth_nb import manifest
from unsloth_nb import plan as planner
from unsloth_nb.errors import UserError

ADAPTER_PREFIX = "base_model.model."
# Files copied next to the merged weights; taken from the adapter folder when the fine-tune saved its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclass
class MergeSettings:
    """How to merge (all fields have safe defaults)."""

    max_shard_size: int = 5 * 1024**3
    """Largest output shard in bytes (safetensors files are split above it, with an index)."""
    device: str | None = None
    """Where the B @ A products are computed: "cuda" when a GPU is present, else "cpu"."""
    progress: bool = True
    """Show a tqdm progress bar over tensors."""
    plan: bool = True
    """Ask the planner first and refuse before writing when RAM or disk cannot fit (off only to test faults)."""
    overwrite: bool = False
    """Replace an existing, non-empty output folder (never done unasked; a complete merge of the same inputs
    is reused without this)."""


@dataclass
class TensorSource:
    """Where one tensor lives: shard file, dtype and shape from the safetensors header."""

    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(st_dtype: str) -> int:
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    return sizes[st_dtype]


def read_header(path: Path) -> dict[str, dict]:
    """The tensors of a safetensors file from its header, refusing a file cut short (no data is read)."""
    header, start = planner.read_header(path)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    size = path.stat().st_size
    if start + end > size:
        raise UserError(
            f"{path} is truncated: its header promises {start + end} bytes but the file has {size}. "
            "Fix: download or copy the model again."
        )
    return header


def weight_map(model_dir: Path) -> dict[str, TensorSource]:
    """Every tensor of an HF model folder (single file or sharded with an index), from headers only."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise UserError(
                f"{model_dir} is missing shard(s) {', '.join(missing)} listed in model.safetensors.index.json. "
                "Fix: download the complete model (every shard) again."
            )
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if not files:
        raise UserError(
            f"No safetensors weights in {model_dir}. unsloth_nb reads HF folders saved with safetensors "
            "(model.safetensors or model-0000x-of-0000N.safetensors). Fix: point at the model folder, or re-save "
            "it with save_pretrained(..., safe_serialization=True)."
        )
    sources: dict[str, TensorSource] = {}
    for name in files:
        for tensor, info in read_header(model_dir / name).items():
            sources[tensor] = TensorSource(model_dir / name, info["dtype"], tuple(info["shape"]))
    return sources


def load_tensor(source: TensorSource, name: str):
    """Read one tensor. The file is opened just for it, so no mapping of the whole shard stays resident."""
    from safetensors import safe_open

    with safe_open(source.file, framework="pt") as handle:
        return handle.get_tensor(name)


@dataclass
class LoraPair:
    """The low-rank factors of one module and how to scale them."""

    a: str
    b: str
    scaling: float
    embedding: bool = False
    bias: str | None = None


@dataclass
class Adapter:
    """A peft LoRA adapter folder, read lazily."""

    path: Path
    config: dict
    tensors: dict[str, TensorSource]
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    """base tensor name -> its LoRA factors."""
    replacements: dict[str, str] = field(default_factory=dict)
    """base tensor name -> adapter tensor that replaces it whole (modules_to_save)."""
    token_deltas: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    """base tensor name -> (adapter tensor, token rows it overwrites) (peft trainable_token_indices)."""


def read_adapter(adapter_dir: Path) -> Adapter:
    """Read and check a peft LoRA adapter folder; map each of its tensors to the base tensor it changes."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not adapter_dir.is_dir():
        raise UserError(f"Adapter folder {adapter_dir} does not exist. Fix: pass the folder that train (or peft's "
                        "save_pretrained) wrote, which holds adapter_config.json and adapter_model.safetensors.")
    if not config_path.is_file() or not weights.is_file():
        found = ", ".join(sorted(p.name for p in adapter_dir.iterdir())[:8]) or "nothing"
        raise UserError(
            f"{adapter_dir} is not a LoRA adapter folder: it needs adapter_config.json and "
            f"adapter_model.safetensors (found: {found}). Fix: pass the folder peft's save_pretrained wrote; an "
            "adapter saved as adapter_model.bin must be re-saved with safe_serialization=True."
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc}). Fix: re-save the adapter.") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter_dir} holds a {config.get('peft_type')} adapter; only LoRA adapters can be merged. "
                        "Fix: train a LoRA adapter (the default of unsloth_nb train).")
    if config.get("use_dora"):
        raise UserError(
            f"{adapter_dir} is a DoRA adapter (use_dora=true). unsloth_nb's streaming merge supports plain LoRA and "
            "rsLoRA only. Fix: merge it with peft (PeftModel.from_pretrained(...).merge_and_unload()) on a machine "
            "with enough RAM, or retrain without use_dora."
        )
    adapter = Adapter(adapter_dir, config, {
        name: TensorSource(weights, info["dtype"], tuple(info["shape"])) for name, info in read_header(weights).items()
    })
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def scaling_for(module: str) -> float:
        rank = rank_pattern[_pattern_key(rank_pattern, module)] if _pattern_key(rank_pattern, module) else r_default
        alpha = (alpha_pattern[_pattern_key(alpha_pattern, module)] if _pattern_key(alpha_pattern, module)
                 else alpha_default)
        return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    token_indices = config.get("trainable_token_indices") or {}
    if isinstance(token_indices, list):
        token_indices = {"embed_tokens": token_indices}
    for name in adapter.tensors:
        if not name.startswith(ADAPTER_PREFIX):
            raise UserError(f"Unexpected tensor {name} in {weights}: not a peft adapter layout. Fix: re-save the "
                            "adapter with peft's save_pretrained.")
        key = name[len(ADAPTER_PREFIX):]
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?(\.bias)?", key)
        if match:
            module, part, bias = match.groups()
            base = f"{module}.weight"
            pair = adapter.pairs.setdefault(base, LoraPair("", "", scaling_for(module)))
            if bias:
                pair.bias = name
            elif part.endswith("A"):
                pair.a = name
            else:
                pair.b = name
            pair.embedding = part.startswith("lora_embedding")
            continue
        match = re.fullmatch(r"(.+)\.token_adapter\.trainable_tokens_delta", key)
        if match:
            module = match.group(1)
            pattern = _pattern_key(token_indices, module)
            adapter.token_deltas[f"{module}.weight"] = (name, list(token_indices.get(pattern, [])))
            continue
        adapter.replacements[key] = name
    for base, pair in adapter.pairs.items():
        if not pair.a or not pair.b:
            raise UserError(f"{weights} has only one of lora_A/lora_B for {base}. The adapter file is incomplete. "
                            "Fix: re-save the adapter.")
    return adapter


def _pattern_key(patterns: dict, module: str) -> str | None:
    """peft's rule for rank/alpha patterns: a key matches the end of the module name at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


class MergedModel:
    """Base weights with an adapter applied lazily: ``get(name)`` returns one merged tensor at a time.

    Used by :func:`merge` to write a merged folder and by the GGUF converter for the fused path.
    """

    def __init__(self, base_dir: Path, adapter_dir: Path | None = None, device: str | None = None):
        self.base_dir = planner.resolve_model(base_dir)
        config_path = self.base_dir / "config.json"
        if not config_path.is_file():
            raise UserError(f"{self.base_dir} has no config.json, so it is not an HF model folder. Fix: pass the "
                            "folder that holds config.json and the *.safetensors files.")
        self.config: dict = json.loads(config_path.read_text())
        self.sources = weight_map(self.base_dir)
        self.adapter = read_adapter(adapter_dir) if adapter_dir is not None else None
        self.device = device or _default_device()
        self.shapes: dict[str, tuple[str, tuple[int, ...]]] = {
            name: (src.dtype, src.shape) for name, src in self.sources.items()
        }
        if self.adapter is not None:
            self._check_adapter()

    def shapes_nbytes(self, name: str) -> int:
        """Bytes of one merged tensor as written (base dtype)."""
        dtype, shape = self.shapes[name]
        return math.prod(shape) * _itemsize(dtype)

    def input_files(self) -> list[Path]:
        """Every file the merged output depends on: base weights and config, adapter, tokenizer files."""
        folders = [self.base_dir] + ([self.adapter.path] if self.adapter is not None else [])
        side = [d / n for d in folders for n in ("config.json", "generation_config.json", "adapter_config.json",
                                                  "adapter_model.safetensors", *TOKENIZER_FILES)]
        return sorted({src.file for src in self.sources.values()}) + [p for p in side if p.is_file()]

    @property
    def tokenizer_dir(self) -> Path:
        """Where the tokenizer and chat template come from: the adapter's own when it saved one."""
        if self.adapter is not None and any((self.adapter.path / f).is_file() for f in TOKENIZER_FILES):
            return self.adapter.path
        return self.base_dir

    def _check_adapter(self) -> None:
        adapter = self.adapter
        assert adapter is not None
        base_name = self.config.get("_name_or_path") or str(self.base_dir)
        for target, pair in adapter.pairs.items():
            if target not in self.sources:
                raise UserError(
                    f"The adapter changes {target}, which the base {self.base_dir} does not have. The adapter was "
                    f"trained on another model (its config says {adapter.config.get('base_model_name_or_path')}). "
                    "Fix: pass the base model the adapter was trained on."
                )
            rows_a = adapter.tensors[pair.a].shape
            rows_b = adapter.tensors[pair.b].shape
            expected = (rows_a[1], rows_b[0]) if pair.embedding else (rows_b[0], rows_a[1])
            if adapter.config.get("fan_in_fan_out"):
                expected = expected[::-1]
            if tuple(expected) != self.sources[target].shape:
                raise UserError(
                    f"Shape mismatch for {target}: the adapter's LoRA product is {tuple(expected)} but the base "
                    f"({base_name}) has {self.sources[target].shape}. The adapter was trained on another model "
                    f"(its config says {adapter.config.get('base_model_name_or_path')}). Fix: pass the right base."
                )
        main_dtype = max(("BF16", "F16", "F32"), key=lambda d: sum(s.dtype == d for s in self.sources.values()))
        for target, tensor in adapter.replacements.items():
            dtype, shape = main_dtype, adapter.tensors[tensor].shape
            if target in self.sources:
                dtype = self.sources[target].dtype
                base_shape = self.sources[target].shape
                if shape[1:] != base_shape[1:]:
                    raise UserError(f"The adapter's full copy of {target} has shape {shape}, the base has {base_shape}."
                                    " Fix: pass the base model the adapter was trained on.")
            self.shapes[target] = (dtype, shape)
        for target in adapter.token_deltas:
            if target not in self.sources:
                raise UserError(f"The adapter's trainable tokens change {target}, which the base does not have. "
                                "Fix: pass the base model the adapter was trained on.")

    def merged_config(self) -> dict:
        """config.json of the merged model: no quantization_config; vocab/tying updated for replaced tensors."""
        config = dict(self.config)
        config.pop("quantization_config", None)
        if self.adapter is None:
            return config
        for name in self.adapter.replacements:
            if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                config["vocab_size"] = self.shapes[name][1][0]
            if name == "lm_head.weight" and "lm_head.weight" not in self.sources:
                config["tie_word_embeddings"] = False  # a trained lm_head no longer equals the embedding
        return config

    def names(self) -> list[str]:
        """Tensor names of the merged model, in the base's order (plus an untied lm_head if the adapter adds one)."""
        return list(self.shapes)

    def get(self, name: str):
        """One merged tensor, in the base's dtype."""
        import torch

        adapter = self.adapter
        if adapter is not None and name in adapter.replacements:
            value = load_tensor(adapter.tensors[adapter.replacements[name]], adapter.replacements[name])
            return value.to(_torch_dtype(self.shapes[name][0]))
        value = load_tensor(self.sources[name], name)
        if adapter is None:
            return value
        if name in adapter.pairs:
            pair = adapter.pairs[name]
            a = load_tensor(adapter.tensors[pair.a], pair.a).to(self.device, torch.float32)
            b = load_tensor(adapter.tensors[pair.b], pair.b).to(self.device, torch.float32)
            delta = b @ a
            if pair.embedding or adapter.config.get("fan_in_fan_out"):
                delta = delta.T  # embeddings store (vocab, dim); fan_in_fan_out layers store W transposed
            merged = value.to(self.device, torch.float32) + delta * pair.scaling
            value = merged.to(value.dtype).cpu()
        bias_pair = adapter.pairs.get(name.removesuffix(".bias") + ".weight") if name.endswith(".bias") else None
        if bias_pair is not None and bias_pair.bias:
            bias = load_tensor(adapter.tensors[bias_pair.bias], bias_pair.bias).float()
            value = (value.float() + bias * bias_pair.scaling).to(value.dtype)
        if name in adapter.token_deltas:
            tensor, rows = adapter.token_deltas[name]
            delta = load_tensor(adapter.tensors[tensor], tensor)
            value = value.clone()
            value[rows] = delta.to(value.dtype)
        return value

    def __iter__(self) -> Iterator[tuple[str, object]]:
        for name in self.names():
            yield name, self.get(name)


def _torch_dtype(st_dtype: str):
    import torch

    return getattr(torch, ST_DTYPES[st_dtype])


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2G' or a plain number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise UserError(f"Cannot read the size {text!r}. Fix: write it like 5GB, 500MB or 2G.")
    number, unit, _ = match.groups()
    return int(float(number) * 1024 ** "_KMGT".index(unit or "_"))


def _plan_shards(shapes: dict[str, tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, (dtype, shape) in shapes.items():
        nbytes = math.prod(shape) * _itemsize(dtype)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class SafetensorsStreamWriter:
    """Writes a safetensors file tensor by tensor: the header is known up front, data follows in order."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.expected = [name for name, _, _ in entries]
        self.handle = manifest.HashingFile(path)
        self.handle.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor) -> None:
        import torch

        if name != self.expected[0]:
            raise RuntimeError(f"tensors out of order: got {name}, expected {self.expected[0]}")
        self.expected.pop(0)
        data = tensor.contiguous().cpu()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        self.handle.write(memoryview(data.numpy()).cast("B"))

    def close(self) -> str:
        """Flush and close; returns the file's sha256."""
        self.handle.close()
        return self.handle.hexdigest()


@dataclass
class MergeResult:
    """What a merge wrote."""

    out_dir: Path
    shards: list[Path]
    total_bytes: int
    seconds: float
    reused: bool = False
    """True when ``out_dir`` already held a complete merge of the same inputs, which was kept."""

    def __str__(self) -> str:
        took = "complete from an earlier run, kept" if self.reused else f"{self.seconds:.1f} s"
        return f"merged model: {self.out_dir} ({len(self.shards)} shard(s), {self.total_bytes / 1e9:.2f} GB, {took})"


def merge(base: str | Path, adapter: str | Path, out_dir: str | Path,
          settings: MergeSettings | None = None) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write a 16-bit HF folder at ``out_dir``, one tensor at a time."""
    from tqdm.auto import tqdm

    settings = settings or MergeSettings()
    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    model = MergedModel(Path(base), Path(adapter), settings.device)
    shards = _plan_shards(model.shapes, settings.max_shard_size)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(model.shapes_nbytes(n) for n in model.shapes)
    inputs = manifest.fingerprint(model.input_files(), max_shard_size=settings.max_shard_size)
    if _complete(out_dir, inputs):
        return MergeResult(out_dir, [out_dir / n for n in names], total, 0.0, reused=True)
    _check_output(out_dir, [model.base_dir.resolve(), model.adapter.path.resolve()], settings.overwrite)
    if settings.plan:
        planner.make_plan(base, [], adapter=adapter, merged_out=out_dir, device=settings.device).require()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    manifest.remove_stale(out_dir.parent, re.escape(f".{out_dir.name}.") + r"(partial|old)-(?P<pid>\d+)")
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    partial.mkdir()
    free_before = shutil.disk_usage(partial).free
    try:
        bar = tqdm(total=len(model.shapes), desc="merge", unit="tensor", disable=not settings.progress)
        written: dict[str, tuple[int, str]] = {}
        for shard_name, members in zip(names, shards, strict=True):
            entries = [(n, *model.shapes[n]) for n in members]
            writer = SafetensorsStreamWriter(partial / shard_name, entries)
            try:
                for name in members:
                    tensor = model.get(name)
                    writer.write(name, tensor)
                    del tensor
                    bar.update(1)
            finally:
                digest = writer.close()
            written[shard_name] = ((partial / shard_name).stat().st_size, digest)
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: f for f, members in zip(names, shards, strict=True) for n in members}}
            (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _copy_side_files(model, partial)
        for path in partial.iterdir():
            if path.name not in written:
                written[path.name] = (path.stat().st_size, manifest.sha256_file(path))
        manifest.record(partial, written, inputs)
        _swap_in(partial, out_dir)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise UserError(f"Disk full: the merged model needs about {total / 1e9:.2f} GB in {out_dir.parent}, "
                            f"which had {free_before / 1e9:.2f} GB free ({max(total - free_before, 0) / 1e9:.2f} GB "
                            "more needed); nothing was left under the output name and earlier files are intact. "
                            "Fix: free that much space, choose another --out folder, or skip the merged copy with "
                            "the fused path (`gguf BASE --adapter ADAPTER`).") from exc
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return MergeResult(out_dir, [out_dir / n for n in names], total, time.perf_counter() - started)


def _complete(out_dir: Path, inputs: str) -> bool:
    """True when ``out_dir`` holds a merge of the same inputs whose every recorded file checks out."""
    recorded = manifest.load(out_dir)
    return bool(recorded) and all(manifest.status(out_dir, name, inputs) == "complete" for name in recorded)


def _swap_in(partial: Path, out_dir: Path) -> None:
    """Put the finished folder under its final name in one rename (an old folder is replaced only when asked)."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out_dir.exists():
        out_dir.rmdir()  # _check_output allowed only an empty folder here
    os.replace(partial, out_dir)


def _check_output(out_dir: Path, inputs: list[Path], overwrite: bool = False) -> None:
    for source in inputs:
        if out_dir == source or source in out_dir.parents or out_dir in source.parents:
            raise UserError(f"The output folder {out_dir} overlaps the input folder {source}; writing there would "
                            "mix the merged model with its inputs. Fix: choose an output folder outside it.")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"The output path {out_dir} is a file, not a folder. Fix: choose a new folder name.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        what = ("a merge of other inputs (the adapter or base changed since)" if manifest.load(out_dir)
                else "files unsloth_nb did not write")
        raise UserError(f"The output folder {out_dir} already exists and holds {what}; unsloth_nb never overwrites "
                        "your files unasked. Fix: choose a new folder, delete the old one yourself, or pass "
                        "overwrite=True (MergeSettings) to replace it.")
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"Cannot write to {parent} (permission denied). Fix: choose an output folder you can write.")


def _copy_side_files(model: MergedModel, dest: Path) -> None:
    """config.json (cleaned), generation config, tokenizer and chat template next to the merged weights."""
    (dest / "config.json").write_text(json.dumps(model.merged_config(), indent=2) + "\n")
    generation = next((d / "generation_config.json" for d in (model.tokenizer_dir, model.base_dir)
                       if (d / "generation_config.json").is_file()), None)
    if generation is not None:
        shutil.copy2(generation, dest / "generation_config.json")
    for name in TOKENIZER_FILES:
        source = next((d / name for d in (model.tokenizer_dir, model.base_dir) if (d / name).is_file()), None)
        if source is not None:
            shutil.copy2(source, dest / name)


def run_cli(args: argparse.Namespace) -> int:
    settings = MergeSettings(max_shard_size=parse_size(args.max_shard_size),
                             overwrite=getattr(args, "overwrite", False))
    result = merge(args.base, args.adapter, args.out, settings)
    print(result)
    return 0
