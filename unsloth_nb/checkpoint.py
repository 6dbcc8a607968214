"""Reading a user's model folder and adapter: the one place that knows which files hold what.

Every stage (plan, merge, convert, serve, verify, train) reads model folders through this module, so that
the rules live once: which files hold the weights (:func:`weight_files`), how a Hub id resolves to a local
folder, what a safetensors header must look like, which files are the tokenizer, how a LoRA adapter maps
onto its base, and the merged view (base + adapter, one tensor at a time) that merge writes and the fused GGUF
path reads. Everything a damaged or wrong file can raise while it is read becomes a :class:`UserError` that
names the file, what is wrong in it and the fix; a bug in our own code keeps its traceback.

Reading is header-only wherever possible: nothing here loads a weight except :func:`load_tensor` and
:class:`MergedModel.get`, one tensor at a time.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unsloth_nb.errors import UserError

DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"), "I64": (8, "int64"), "I32": (4, "int32"),
    "I16": (2, "int16"), "I8": (1, "int8"), "U64": (8, "uint64"), "U32": (4, "uint32"), "U16": (2, "uint16"),
    "U8": (1, "uint8"), "BOOL": (1, "bool"),
}
"""safetensors dtype -> (bytes per element, torch dtype name): the one dtype table."""
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""Dtypes whose tensors merge, convert and quantize (the rest are copied as they are, or refused)."""

MAX_HEADER_BYTES = 100 * 2**20
"""Longest safetensors JSON header read (real ones are well under 1 MB; a garbage length is refused)."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
"""The tokenizer and chat-template files: copied with a merge, saved with an adapter, read by the converter."""
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
"""Every non-weight file a model folder's outputs depend on."""

ADAPTER_PREFIX = "base_model.model."
"""How peft prefixes the base model's tensor names in adapter_model.safetensors."""

MERGE_WORK_BYTES = 12
"""Working bytes per element while merging one LoRA target: float32 weight, float32 B @ A, 16-bit result."""


# ---------------------------------------------------------------------------------------------- JSON files


def read_json(path: Path, *, required: bool = False, fix: str | None = None) -> dict[str, Any]:
    """A JSON object file, parsed once per file version (a 128k-token tokenizer.json takes most of a second);
    {} when absent and not ``required``. Broken JSON, or JSON that is not an object, is a UserError naming
    the file. Callers must not modify the result."""
    path = Path(path)
    fix = fix or f"restore {path.name} from the model's source (or re-save the folder with save_pretrained)"
    try:
        stat = path.stat()
    except FileNotFoundError:
        if required:
            raise UserError(f"{path} does not exist. Fix: {fix}.") from None
        return {}
    except OSError as exc:
        raise UserError(f"Cannot read {path} ({exc.strerror or exc}). Fix: check the path and permissions.") from exc
    if not path.is_file():
        raise UserError(f"{path} is a folder where a JSON file belongs. Fix: {fix}.")
    try:
        data = _parse_json(path, stat.st_mtime_ns, stat.st_size)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not a text file (byte {exc.start} is not UTF-8). Fix: {fix}.") from None
    except json.JSONDecodeError as exc:
        what = "is empty" if stat.st_size == 0 else f"is not valid JSON ({exc.msg} at line {exc.lineno})"
        raise UserError(f"{path} {what}. Fix: {fix}.") from None
    except OSError as exc:
        raise UserError(f"Cannot read {path} ({exc.strerror or exc}). Fix: check the path and permissions.") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object. Fix: {fix}.")
    return data


@functools.lru_cache(maxsize=8)
def _parse_json(path: Path, mtime_ns: int, size: int) -> Any:
    """The parsed file, cached per file version whatever the caller's ``fix`` (errors are not cached)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder, checked for what every stage needs: an architecture (or model type) and
    numeric sizes where they are given."""
    path = Path(folder) / "config.json"
    if Path(folder).is_file():
        raise UserError(f"{folder} is a file; a model folder holds config.json and *.safetensors. Fix: pass the "
                        "folder.")
    if not path.exists():
        raise UserError(f"{folder} has no config.json, so it is not a Hugging Face model folder. Fix: pass the folder "
                        "that holds config.json and the *.safetensors weights (for example the merge step's output).")
    config = read_json(path, required=True, fix="pass a Hugging Face model folder (config.json and *.safetensors)")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise UserError(f"{path}: 'architectures' must be a list of class names, not {archs!r}. Fix: restore the "
                        "model's original config.json.")
    if not archs and not isinstance(config.get("model_type"), str):
        raise UserError(f"{path} names no architecture ('architectures' and 'model_type' are missing). Fix: restore "
                        "the model's original config.json.")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size", "head_dim", "max_position_embeddings"):
        value = text.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise UserError(f"{path}: '{key}' must be a positive whole number, not {value!r}. Fix: restore the "
                            "model's original config.json.")
    return config


def check_tokenizer(folder: Path) -> None:
    """Refuse a folder whose tokenizer files cannot be read: tokenizer.json, tokenizer_config.json (and its
    chat template), chat_template.jinja/.json, added_tokens.json. A folder without tokenizer files passes
    (the adapter may bring them); what a tokenizer must contain is checked by whoever loads it."""
    folder = Path(folder)
    tokenizer = read_json(folder / "tokenizer.json")
    if tokenizer and not isinstance(tokenizer.get("model"), dict):
        raise UserError(f"{folder / 'tokenizer.json'} has no 'model' section, so it is not a tokenizers file. Fix: "
                        "restore it from the model's source.")
    if tokenizer and not isinstance(tokenizer.get("added_tokens", []), list):
        raise UserError(f"{folder / 'tokenizer.json'}: 'added_tokens' must be a list. Fix: restore it from the "
                        "model's source.")
    for token in tokenizer.get("added_tokens", []):
        if not (isinstance(token, dict) and isinstance(token.get("content"), str) and isinstance(token.get("id"), int)):
            raise UserError(f"{folder / 'tokenizer.json'}: an entry of 'added_tokens' is not an object with 'id' and "
                            f"'content' ({str(token)[:80]}). Fix: restore it from the model's source.")
    config = read_json(folder / "tokenizer_config.json")
    read_json(folder / "added_tokens.json")
    templates = [(folder / "tokenizer_config.json", config.get("chat_template"))]
    if (folder / "chat_template.jinja").is_file():
        templates.append((folder / "chat_template.jinja", _read_text(folder / "chat_template.jinja")))
    if (folder / "chat_template.json").is_file():
        templates.append((folder / "chat_template.json",
                          read_json(folder / "chat_template.json").get("chat_template")))
    for where, template in templates:
        if isinstance(template, str):
            check_chat_template(template, where)
        elif template is not None and not isinstance(template, list):
            raise UserError(f"{where}: 'chat_template' must be a string, not {type(template).__name__}. Fix: "
                            "restore the template from the model's source.")


def check_chat_template(template: str, where: Path) -> None:
    """Refuse a chat template that is not valid Jinja (transformers would fail on the first chat)."""
    try:
        import jinja2
    except ImportError:
        return
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"The chat template in {where} is not valid Jinja ({exc.message}, line {exc.lineno}). Fix: "
                        "restore the template from the model's source, or set one with "
                        "TrainSettings(chat_template=...).") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a UTF-8 text file. Fix: restore it from the model's source.") from None


# --------------------------------------------------------------------------------------------- locations


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def is_hub_id(model: str | os.PathLike) -> bool:
    """Whether ``model`` reads like a Hub id ("org/name") rather than a path."""
    text = str(model)
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not text.startswith((".", "/"))


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
    if not is_hub_id(text):
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


def model_name(folder: Path) -> str:
    """Name for output files: the folder name, or the repo name for a Hugging Face cache snapshot."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.split("--")[-1]
    return folder.name or "model"


# ------------------------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by a safetensors header."""

    name: str
    """Name in the checkpoint, e.g. "model.layers.0.self_attn.q_proj.weight"."""
    dtype: str
    """safetensors dtype, e.g. "BF16"."""
    shape: tuple[int, ...]
    """Shape in torch order."""
    file: Path | None = field(default=None, compare=False)
    """The file holding it (where it lives, not what it is: two copies of a model hold equal tensors)."""
    start: int = field(default=0, compare=False)
    """Offset of its data from the start of the file."""

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of its data in the checkpoint."""
        return self.numel * DTYPES[self.dtype][0]


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors file declares, checked against itself and the file's size."""

    path: Path
    tensors: dict[str, TensorInfo]
    data_start: int
    """File offset where the data section starts (8 + header length)."""
    data_end: int
    """File offset where the declared data ends."""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether the file holds all the data its header declares (header-only files, e.g. planning copies of a
        Hub model's headers, do not)."""
        return self.path.stat().st_size >= self.data_end


def read_header(path: Path, *, require_data: bool = False) -> SafetensorsHeader:
    """The header of a .safetensors file, checked: a sane length, a JSON object of tensors with known dtypes,
    whole-number shapes and data ranges that match them, inside the file when ``require_data``. Only the
    8-byte length and the JSON are read (no allocation follows a length the file cannot hold)."""
    path = Path(path)
    fix = "download or save the model again"
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise UserError(f"{path} is a folder where a safetensors file belongs. Fix: {fix}.")
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise UserError(f"{path} is not a safetensors file (shorter than 8 bytes). Fix: {fix}.")
            (length,) = struct.unpack("<Q", raw)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise UserError(f"{path} is not a readable safetensors file (its header claims {length} bytes, the "
                                f"file has {size}). Fix: {fix}.")
            text = f.read(length)
    except OSError as exc:
        raise UserError(f"Cannot read {path} ({exc.strerror or exc}). Fix: check the path and permissions.") from exc
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} has a damaged safetensors header ({exc}). Fix: {fix}.") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} has a damaged safetensors header (not a JSON object). Fix: {fix}.")
    metadata = header.pop("__metadata__", None) or {}
    start, tensors, end = 8 + length, {}, 0
    for name, info in header.items():
        problem = _entry_problem(info)
        if problem:
            raise UserError(f"{path}: the header entry of tensor {name!r} {problem}. Fix: {fix}.")
        shape = tuple(int(d) for d in info["shape"])
        first, last = (int(v) for v in info["data_offsets"])
        if last - first != math.prod(shape) * DTYPES[info["dtype"]][0]:
            raise UserError(f"{path}: tensor {name!r} declares {last - first} bytes of data but its shape {shape} "
                            f"in {info['dtype']} needs {math.prod(shape) * DTYPES[info['dtype']][0]}. Fix: {fix}.")
        tensors[name] = TensorInfo(name, info["dtype"], shape, path, start + first)
        end = max(end, last)
    result = SafetensorsHeader(path, tensors, start, start + end, metadata if isinstance(metadata, dict) else {})
    if require_data and start + end > size:
        raise UserError(f"{path} is truncated: its header promises {start + end} bytes but the file has {size}. "
                        f"Fix: {fix}.")
    return result


def _entry_problem(info: Any) -> str | None:
    """What is wrong with one tensor entry of a safetensors header, or None."""
    if not isinstance(info, dict):
        return "is not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return f"has the unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        return f"has the invalid shape {shape!r}"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in offsets)
            or offsets[1] < offsets[0]):
        return f"has the invalid data_offsets {offsets!r}"
    return None


def weight_files(folder: Path) -> list[Path]:
    """The files that hold a model folder's weights: those its ``model.safetensors.index.json`` lists, else
    every ``*.safetensors`` except a LoRA adapter's and Mistral's ``consolidated`` copy. The one rule."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, required=True, fix="restore it from the model's source, or re-save the model "
                                                          "with save_pretrained").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index} has no usable 'weight_map' (tensor name -> file). Fix: restore it from the "
                            "model's source, or re-save the model with save_pretrained.")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise UserError(f"{folder} is missing shard(s) {', '.join(missing)} listed in its "
                            "model.safetensors.index.json. Fix: finish the download or copy (every shard), then run "
                            "again.")
        return files
    files = sorted(p for p in folder.glob("*.safetensors")
                   if not p.name.startswith(("adapter_", "consolidated")))
    if not files:
        raise UserError(f"{folder} holds no *.safetensors weights. unsloth_nb reads HF folders saved with "
                        "safetensors (model.safetensors or model-0000x-of-0000N.safetensors). Fix: point at the "
                        "model folder, or re-save it with save_pretrained(..., safe_serialization=True).")
    return files


def model_tensors(folder: Path, *, require_data: bool = True) -> dict[str, TensorInfo]:
    """Every tensor of a model folder (all weight files), from headers only."""
    tensors: dict[str, TensorInfo] = {}
    for file in weight_files(folder):
        tensors.update(read_header(file, require_data=require_data).tensors)
    return tensors


def load_tensor(info: TensorInfo) -> Any:
    """Read one tensor (torch). The file is opened just for it, so no mapping of the whole shard stays
    resident; a file that fails to read here is damaged (the header was checked before)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(info.file, framework="pt") as handle:
            return handle.get_tensor(info.name)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"Reading tensor {info.name} from {info.file} failed ({exc}). The file is damaged. Fix: "
                        "download or save it again.") from exc


def torch_dtype(st_dtype: str) -> Any:
    import torch

    return getattr(torch, DTYPES[st_dtype][1])


# ------------------------------------------------------------------------------------------------ adapters


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
    tensors: dict[str, TensorInfo]
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    """base tensor name -> its LoRA factors."""
    replacements: dict[str, str] = field(default_factory=dict)
    """base tensor name -> adapter tensor that replaces it whole (modules_to_save)."""
    token_deltas: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    """base tensor name -> (adapter tensor, token rows it overwrites) (peft trainable_token_indices)."""

    @property
    def base_model(self) -> str | None:
        """The base the adapter says it was trained on (a Hub id or a path), if it says."""
        name = self.config.get("base_model_name_or_path")
        return name if isinstance(name, str) and name else None

    @property
    def rank(self) -> int:
        """The largest LoRA rank among its modules (lora_A's rows)."""
        return max((self.tensors[p.a].shape[0] for p in self.pairs.values()), default=int(self.config.get("r", 0)))

    @property
    def modules_to_save(self) -> list[str]:
        """Base tensors the adapter replaces whole (trained copies of embeddings, lm_head, ...)."""
        return sorted(self.replacements)


def read_adapter(adapter_dir: Path) -> Adapter:
    """Read and check a peft LoRA adapter folder; map each of its tensors to the base tensor it changes."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not adapter_dir.exists():
        raise UserError(f"Adapter folder {adapter_dir} does not exist. Fix: pass the folder that train (or peft's "
                        "save_pretrained) wrote, which holds adapter_config.json and adapter_model.safetensors.")
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir} is a file; an adapter is a folder with adapter_config.json and "
                        "adapter_model.safetensors. Fix: pass that folder.")
    if not config_path.is_file() or not weights.is_file():
        found = ", ".join(sorted(p.name for p in adapter_dir.iterdir())[:8]) or "nothing"
        raise UserError(
            f"{adapter_dir} is not a LoRA adapter folder: it needs adapter_config.json and "
            f"adapter_model.safetensors (found: {found}). Fix: pass the folder peft's save_pretrained wrote; an "
            "adapter saved as adapter_model.bin must be re-saved with safe_serialization=True."
        )
    fix = "re-save the adapter with peft's save_pretrained"
    config = read_json(config_path, required=True, fix=fix)
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter_dir} holds a {config.get('peft_type')} adapter; only LoRA adapters can be merged. "
                        "Fix: train a LoRA adapter (the default of unsloth_nb train).")
    if config.get("use_dora"):
        raise UserError(
            f"{adapter_dir} is a DoRA adapter (use_dora=true). unsloth_nb's streaming merge supports plain LoRA and "
            "rsLoRA only. Fix: merge it with peft (PeftModel.from_pretrained(...).merge_and_unload()) on a machine "
            "with enough RAM, or retrain without use_dora."
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise UserError(f"{config_path}: '{key}' must be a positive number, not {value!r}. Fix: {fix}.")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise UserError(f"{config_path}: '{key}' must be an object (module -> number). Fix: {fix}.")
    adapter = Adapter(adapter_dir, config, read_header(weights, require_data=True).tensors)
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
            raise UserError(f"Unexpected tensor {name} in {weights}: not a peft adapter layout. Fix: {fix}.")
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
                            f"Fix: {fix}.")
        a, b = adapter.tensors[pair.a].shape, adapter.tensors[pair.b].shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise UserError(f"{weights}: the LoRA factors of {base} have shapes {a} and {b}, which do not multiply. "
                            f"The adapter file is damaged. Fix: {fix}.")
    return adapter


def is_adapter(folder: Path) -> bool:
    """Whether ``folder`` is a peft adapter folder (it has adapter_config.json)."""
    return Path(folder).is_dir() and (Path(folder) / "adapter_config.json").is_file()


def _pattern_key(patterns: dict, module: str) -> str | None:
    """peft's rule for rank/alpha patterns: a key matches the end of the module name at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


# ----------------------------------------------------------------------------------------- merged view


class MergedModel:
    """Base weights with an adapter applied lazily: ``get(name)`` returns one merged tensor at a time.

    ``merge`` writes a merged folder from it; the GGUF converter reads it for the fused path (no merged copy).
    """

    def __init__(self, base_dir: Path, adapter_dir: Path | None = None, device: str | None = None):
        self.base_dir = resolve_model(base_dir)
        self.config: dict = read_config(self.base_dir)
        check_tokenizer(self.base_dir)
        self.sources = model_tensors(self.base_dir)
        self.adapter = read_adapter(adapter_dir) if adapter_dir is not None else None
        if self.adapter is not None:
            check_tokenizer(self.adapter.path)
        self.device = device or _default_device()
        self.shapes: dict[str, tuple[str, tuple[int, ...]]] = {
            name: (src.dtype, src.shape) for name, src in self.sources.items()
        }
        if self.adapter is not None:
            self._check_adapter()

    def shapes_nbytes(self, name: str) -> int:
        """Bytes of one merged tensor as written (base dtype)."""
        dtype, shape = self.shapes[name]
        return math.prod(shape) * DTYPES[dtype][0]

    def input_files(self) -> list[Path]:
        """Every file the merged output depends on: base weights and config, adapter, tokenizer files."""
        folders = [self.base_dir] + ([self.adapter.path] if self.adapter is not None else [])
        side = [d / n for d in folders for n in ("adapter_config.json", "adapter_model.safetensors", *SIDE_FILES)]
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
                    f"trained on another model (its config says {adapter.base_model}). "
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
                    f"(its config says {adapter.base_model}). Fix: pass the right base."
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

    def working_bytes(self) -> int:
        """Memory the merged view needs beyond one base tensor: the adapter in float32 and the working copies
        of its largest target while it is merged."""
        assert self.adapter is not None
        return merge_working_bytes(sum(t.numel for t in self.adapter.tensors.values()),
                                   max((self.sources[n].numel for n in self.adapter.pairs), default=0))

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

    def get(self, name: str) -> Any:
        """One merged tensor, in the base's dtype: ``W + scaling * (B @ A)`` computed in float32."""
        import torch

        adapter = self.adapter
        if adapter is not None and name in adapter.replacements:
            value = load_tensor(adapter.tensors[adapter.replacements[name]])
            return value.to(torch_dtype(self.shapes[name][0]))
        value = load_tensor(self.sources[name])
        if adapter is None:
            return value
        if name in adapter.pairs:
            pair = adapter.pairs[name]
            a = load_tensor(adapter.tensors[pair.a]).to(self.device, torch.float32)
            b = load_tensor(adapter.tensors[pair.b]).to(self.device, torch.float32)
            delta = b @ a
            if pair.embedding or adapter.config.get("fan_in_fan_out"):
                delta = delta.T  # embeddings store (vocab, dim); fan_in_fan_out layers store W transposed
            merged = value.to(self.device, torch.float32) + delta * pair.scaling
            value = merged.to(value.dtype).cpu()
        bias_pair = adapter.pairs.get(name.removesuffix(".bias") + ".weight") if name.endswith(".bias") else None
        if bias_pair is not None and bias_pair.bias:
            bias = load_tensor(adapter.tensors[bias_pair.bias]).float()
            value = (value.float() + bias * bias_pair.scaling).to(value.dtype)
        if name in adapter.token_deltas:
            tensor, rows = adapter.token_deltas[name]
            delta = load_tensor(adapter.tensors[tensor])
            value = value.clone()
            value[rows] = delta.to(value.dtype)
        return value

    def __iter__(self) -> Iterator[tuple[str, object]]:
        for name in self.names():
            yield name, self.get(name)


def merge_working_bytes(adapter_elements: int, largest_target_elements: int) -> int:
    """Memory a streaming merge holds besides the base tensor it reads: the adapter's tensors in float32 and the
    working copies of the largest tensor it changes (see MERGE_WORK_BYTES)."""
    return adapter_elements * 4 + largest_target_elements * MERGE_WORK_BYTES


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"
