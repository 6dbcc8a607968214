"""HF safetensors -> GGUF, natively in Python, one tensor at a time (``python -m unsloth_nb gguf``).

The model folder is read once: for each tensor, rows are loaded lazily from the safetensors files, turned into
float32, transformed as llama.cpp expects (q/k permutation for Llama) and fed to every requested output file,
each quantizing to its own type. Every file first gets all tensor infos and metadata (gguf-py's GGUFWriter),
then the data in the same order, so peak memory is about one tensor chunk, not the model.

Each file is written under a temporary name in the output folder, read back and checked (tensor count,
names, types, shapes, data offsets, size), and only then renamed to ``<name>.<METHOD>.gguf`` (see ``output``).
The metadata and tensors follow llama.cpp's reference converter for the same model (see ``arch``, ``vocab``);
the byte layout and its serialisation are ``layout``'s, the model folder is read through ``checkpoint``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import logging
import multiprocessing
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from unsloth_nb import checkpoint, manifest, runtime
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import arch as archs
from unsloth_nb.gguf import imatrix_file, layout, output, quants, recipes
from unsloth_nb.gguf import vocab as vocabs
from unsloth_nb.gguf.layout import GGUFLayout
from unsloth_nb.gguf.output import ConvertResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the GGUF file: where it comes from in the HF folder and what it becomes."""

    name: str
    """GGUF name."""
    shape: tuple[int, ...]
    """Shape in torch order."""
    hf_name: str | None = None
    """Name in the safetensors file (None for generated tensors)."""
    part: Path | None = None
    """Safetensors file holding it."""
    heads: int | None = None
    """Heads for the Llama q/k row permutation, None when not permuted."""
    data: torch.Tensor | None = None
    """Generated float32 data (rope_freqs, rope_factors_long/short)."""


class _Safetensors:
    """Rows of the tensors of one safetensors file, read with plain file reads rather than a memory map,
    so that resident memory stays at one chunk instead of growing to the whole file."""

    def __init__(self, path: Path, require_data: bool = True) -> None:
        self.path = path
        self.entries = checkpoint.read_header(path, require_data=require_data).tensors
        bad = sorted({t.dtype for t in self.entries.values()} - set(checkpoint.FLOAT_DTYPES))
        if bad:
            raise UserError(f"{path} holds {', '.join(bad)} tensors, which are not 16/32-bit weights (a pre-quantized "
                            "checkpoint?). Fix: convert from the model's 16-bit safetensors.")
        self.fd: int | None = None
        self._opening = threading.Lock()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape."""
        return {k: t.shape for k, t in self.entries.items()}

    def rows(self, name: str, rows: slice, into: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Rows ``rows`` of tensor ``name`` (the whole tensor for 1-D ones), in its stored dtype.

        Reads with ``pread`` at an absolute offset, so several threads may read from one file at once.
        ``into(nbytes)`` gives the uint8 buffer to read into (a page-locked one bound for a GPU); the result
        is a view of it."""
        entry = self.entries[name]
        dtype, shape = checkpoint.torch_dtype(entry.dtype), entry.shape or (1,)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        first, last, _ = rows.indices(shape[0])
        # Uninitialised memory: bytearray(n) would zero every page first, holding the GIL the whole time.
        nbytes = (last - first) * row_bytes
        buffer = torch.empty(nbytes, dtype=torch.uint8) if into is None else into(nbytes)[:nbytes]
        if self.fd is None:
            with self._opening:  # workers share one descriptor: open it once
                if self.fd is None:
                    self.fd = os.open(self.path, os.O_RDONLY)
        offset, view, done = entry.start + first * row_bytes, memoryview(buffer.numpy()), 0
        while done < len(view):
            try:
                got = _pread_into(self.fd, view[done:], offset + done)
            except OSError as exc:
                raise UserError(f"Reading tensor {name} from {self.path} failed ({exc.strerror or exc}). Fix: check "
                                "the disk, or download or save the model again.") from exc
            if got <= 0:
                raise UserError(f"{self.path} ended while reading tensor {name}: the file was cut short after it "
                                "was checked. Fix: download or save the model again.")
            done += got
        return buffer.view(dtype).reshape(last - first, *shape[1:])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` at an absolute file offset without moving a shared file position (thread-safe)."""
    if hasattr(os, "preadv"):  # Linux, BSD: straight into the buffer
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)  # macOS
    view[:len(data)] = data
    return len(data)


class _Model:
    """A model folder read for conversion: config, architecture and the tensor list (weights stay on disk)."""

    def __init__(self, model_dir: str | os.PathLike[str], adapter: str | os.PathLike[str] | None = None,
                 device: str | None = None, require_data: bool = True,
                 imatrix: str | os.PathLike[str] | None = None) -> None:
        self.require_data = require_data
        """False for header-only folders (the planner's copies of a Hub model's headers)."""
        self.dir = checkpoint.resolve_model(model_dir)
        checkpoint.read_config(self.dir)
        self.hparams = archs.load_hparams(self.dir)
        self.arch = archs.find_arch(self.hparams, self.dir)
        self.n_blocks = archs.block_count(self.hparams)
        self.merged: Any = None
        """checkpoint.MergedModel when a LoRA adapter is fused while converting (tensors come merged from it)."""
        self.tokenizer_dir = self.dir
        if adapter is not None:
            self.merged = checkpoint.MergedModel(self.dir, Path(adapter).expanduser(), device)
            merged_config = self.merged.merged_config()
            for key in ("vocab_size", "tie_word_embeddings"):
                if key in merged_config:
                    self.hparams[key] = merged_config[key]
            self.tokenizer_dir = self.merged.tokenizer_dir
        checkpoint.check_tokenizer(self.tokenizer_dir)
        self.tensors = self._index()
        self.imatrix_file = None if imatrix is None else Path(imatrix)
        """The importance matrix the quantized files are made with (llama-quantize's --imatrix), if any."""
        self.imatrix = imatrix_file.load(self.imatrix_file) if self.imatrix_file is not None else None

    @property
    def name(self) -> str:
        """Base of the output file names: the folder name."""
        return self.dir.resolve().name

    def input_files(self) -> list[Path]:
        """Every file the output depends on: weights, config, tokenizer files, and the adapter when fused."""
        folders = [self.dir, self.tokenizer_dir]
        if self.merged is not None:
            folders.append(self.merged.adapter.path)
        side = [d / n for d in folders for n in ("adapter_config.json", "adapter_model.safetensors",
                                                  *checkpoint.SIDE_FILES) if n != "generation_config.json"]
        imatrix = [self.imatrix_file] if self.imatrix_file is not None else []
        return checkpoint.weight_files(self.dir) + [p for p in side if p.is_file()] + imatrix

    def _index(self) -> list[SourceTensor]:
        tensors = [SourceTensor(name, tuple(data.shape), data=data)
                   for name, data in archs.generated_tensors(self.arch, self.hparams)]
        if self.merged is not None:
            shapes = {name: tuple(shape) for name, (_, shape) in self.merged.shapes.items()}
            self._check_layers({k: v for k, v in shapes.items() if archs.is_text_tensor(k)})
            tensors += self._mapped(shapes, None)
        else:
            every: dict[str, tuple[int, ...]] = {}
            for part in checkpoint.weight_files(self.dir):
                shapes = _Safetensors(part, require_data=self.require_data).shapes()
                every.update({k: v for k, v in shapes.items() if archs.is_text_tensor(k)})
                tensors += self._mapped(shapes, part)
            self._check_layers(every)
        rows = archs.token_rows(self.arch, self.hparams, self.tokenizer_dir)
        embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
        return [dataclasses.replace(t, shape=(min(rows, t.shape[0]), *t.shape[1:]))
                if rows is not None and t.name == embd else t for t in tensors]

    def _check_layers(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """The weights must hold exactly the layers config.json announces (a wrong count writes a broken file)."""
        found = {int(m[1]) for name in shapes if (m := re.search(r"\.layers\.(\d+)\.", name))}
        if found and len(found) != self.n_blocks:
            raw = checkpoint.read_json(self.dir / "config.json")
            said = ("has no num_hidden_layers, so the default" if "num_hidden_layers" not in raw
                    else "says num_hidden_layers =")
            raise UserError(f"{self.dir / 'config.json'} {said} {self.n_blocks} layers applies, but the weights hold "
                            f"{len(found)}. Fix: set num_hidden_layers to {len(found)} in config.json, or restore "
                            "the model's original config.json.")

    def _mapped(self, shapes: dict[str, tuple[int, ...]], part: Path | None) -> list[SourceTensor]:
        """GGUF tensors for HF tensors of one file, in name order (the reference's order)."""
        tensors = []
        for hf_name in sorted(shapes):
            name = archs.gguf_tensor_name(self.arch, hf_name, self.n_blocks)
            if name is not None:
                heads = archs.qk_heads(self.arch, hf_name, self.hparams)
                tensors.append(SourceTensor(name, shapes[hf_name], hf_name, part, heads))
        return tensors

    def model_shape(self) -> recipes.ModelShape:
        """The facts llama.cpp's type mix needs: layer and head counts, whether output.weight exists."""
        return archs.model_shape(self.hparams, [t.name for t in self.tensors])


def resolve_method(name: str) -> recipes.Method:
    """A method by name (``recipes.resolve``: case-insensitive, aliases, closest-name suggestion)."""
    return recipes.resolve(name)


def _file_name(model: _Model, method: recipes.Method) -> str:
    return f"{model.name}.{method.label}.gguf"


class _Plan:
    """Types per tensor for one method, and a GGUFWriter holding every tensor info and key/value."""

    def __init__(self, model: _Model, method: recipes.Method, shape: recipes.ModelShape,
                 split_max_size: int = 0) -> None:
        self.method = method
        imatrix = model.imatrix
        self.types = [recipes.tensor_type(method, t.name, t.shape, shape, imatrix is not None) for t in model.tensors]
        self.weights = [imatrix.for_tensor(t.name, qtype, t.shape) if imatrix is not None else None
                        for t, qtype in zip(model.tensors, self.types, strict=True)]
        """Per tensor, the importance weights its quantizer gets (None: llama.cpp's reference rounding)."""
        self.writer = gguf.GGUFWriter(None, model.arch.name, split_max_size=split_max_size)
        for t, qtype in zip(model.tensors, self.types, strict=True):
            self.writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), layout.nbytes(t.shape, qtype),
                                        raw_dtype=qtype)
        self.shard_of = [i for i, shard in enumerate(self.writer.tensors) for _ in shard]
        """Index of the file each tensor goes to (GGUFWriter splits by size as llama.cpp's converter does)."""

    def file_names(self, first: str) -> list[str]:
        """llama.cpp's shard names for a file called ``first`` (just ``[first]`` unless split)."""
        return [p.name for p in self.writer.format_shard_names(Path(first))]


def _metadata(model: _Model, template: gguf.GGUFWriter) -> dict[str, Any]:
    """Every key/value llama.cpp's converter writes (file type set per method later), in its order."""
    writer = template
    total, shared, expert, n_expert = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model.dir, None, total)
    generation = gguf.Metadata.load_generation_config(model.dir)
    if "penalty_repeat" not in generation and "repetition_penalty" in generation:
        meta.sampling_penalty_repeat = generation["repetition_penalty"]
    if meta.name is None:
        meta.name = model.dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    archs.write_hparams(writer, model.arch, model.hparams, 0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocabs.add_tokenizer(writer, model.tokenizer_dir, model.hparams, model.arch.vocab_order,
                         model.arch.reads_add_prefix_space)
    if model.arch.no_bos_vocab_size is not None and model.hparams.get("vocab_size") == model.arch.no_bos_vocab_size:
        writer.add_add_bos_token(False)
    return dict(writer.kv_data[0])


def _prepare(model: _Model, methods: list[recipes.Method], split_max_size: int = 0) -> list[_Plan]:
    shape = model.model_shape()
    plans = [_Plan(model, m, shape, split_max_size) for m in methods]
    _add_metadata(model, plans)
    return plans


def _add_metadata(model: _Model, plans: list[_Plan]) -> None:
    """Every plan's key/values (the slow part of preparing: the vocabulary), file type per method."""
    kv = _metadata(model, _Plan(model, plans[0].method, model.model_shape()).writer)
    for plan in plans:
        plan.writer.kv_data[0].update(kv)
        plan.writer.kv_data[0][gguf.Keys.General.FILE_TYPE] = gguf.GGUFValue(int(plan.method.file_type),
                                                                             gguf.GGUFValueType.UINT32)
        if model.imatrix is not None and plan.method.quantized:
            plan.writer.kv_data[0].update(model.imatrix.quantize_metadata(str(model.imatrix_file)))


def _measure(plan: _Plan, model: _Model, file_name: str, heads: list[bytes]) -> GGUFLayout:
    """Exact layout from the serialized heads and the aligned size of every tensor's data."""
    tensors = [(t.name, t.shape, qtype, shard)
               for t, qtype, shard in zip(model.tensors, plan.types, plan.shard_of, strict=True)]
    return layout.measure(plan.method.name, plan.file_names(file_name), tensors, heads)


def file_layout(model_dir: str | os.PathLike[str], method: str | recipes.Method,
                split_max_size: int | None = None, adapter: str | os.PathLike[str] | None = None,
                require_data: bool = True, imatrix: str | os.PathLike[str] | None = None) -> GGUFLayout:
    """The exact file(s) ``convert`` would write for one method: sizes, offsets, types (no weights read)."""
    model = _Model(model_dir, adapter, "cpu", require_data, imatrix)
    m = resolve_method(method) if isinstance(method, str) else method
    plan = _prepare(model, [m], split_max_size or 0)[0]
    return _measure(plan, model, _file_name(model, m), layout.serialize(plan.writer))


def _load(t: SourceTensor, model: _Model, handles: dict[Path, _Safetensors], rows: slice,
          gpu: torch.device | None = None) -> torch.Tensor:
    """Rows of one tensor in their stored dtype (merged with the adapter if any), transformed as llama.cpp
    expects. Encoders cast to float32 themselves, so a bf16 -> bf16 copy never makes a float32 copy.

    With ``gpu``, rows read from a safetensors file go through this thread's page-locked buffer to the GPU
    (a copy from ordinary memory crawls at a fraction of the bus's speed) and are transformed there."""
    if t.data is not None:
        return t.data[rows]
    rows = slice(*rows.indices(t.shape[0])) if t.shape else rows  # within t.shape: a tensor may be trimmed
    if model.merged is not None:
        x = model.merged.get(t.hf_name)[rows]
    elif gpu is not None:
        x = handles[t.part].rows(t.hf_name, rows, into=_read_buffer).to(gpu)  # waits: the buffer is free again
    else:
        x = handles[t.part].rows(t.hf_name, rows)
    return to_gguf_layout(model.arch, t, x).contiguous()


_reading = threading.local()


def _read_buffer(nbytes: int) -> torch.Tensor:
    """This thread's page-locked read buffer, grown to at least ``nbytes``."""
    buffer = getattr(_reading, "buffer", None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _reading.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return buffer


def to_gguf_layout(arch: archs.Arch, t: SourceTensor, x: torch.Tensor) -> torch.Tensor:
    """Rows of an HF tensor as the GGUF file holds them: the architecture's transform (Gemma's norm shift),
    then Llama's q/k row permutation within each head (``x`` holds whole heads)."""
    x = archs.transform(arch, t.hf_name, x)
    if t.heads is not None:
        x = archs.permute_qk(x, t.heads * x.shape[0] // t.shape[0])
    return x


def from_gguf_layout(arch: archs.Arch, t: SourceTensor, x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_gguf_layout` on a whole float32 tensor: a GGUF's values in HF layout."""
    if t.heads is not None:
        x = archs.unpermute_qk(x, t.heads)
    return archs.untransform(arch, t.hf_name, x)


def tensor_sources(model_dir: str | os.PathLike[str], adapter: str | os.PathLike[str] | None = None,
                   require_data: bool = True) -> tuple[archs.Arch, list[SourceTensor], recipes.ModelShape]:
    """The architecture's rules, every tensor ``convert`` writes for this folder (and adapter) in file order,
    and the model facts the type mix needs: the one answer to which HF tensor becomes which GGUF tensor, read
    from headers only (``require_data=False`` also reads header-only folders, for the planner)."""
    model = _Model(model_dir, adapter, "cpu", require_data)
    return model.arch, list(model.tensors), model.model_shape()


def head_rows(t: SourceTensor) -> int | None:
    """Rows of one attention head for a permuted q/k tensor (its chunks hold whole heads), else None."""
    return t.shape[0] // t.heads if t.heads else None


def _row_chunks(t: SourceTensor, model: _Model, chunk_elements: int = layout.CHUNK_ELEMENTS) -> list[slice]:
    """Row ranges read at once (see ``layout.row_chunks``); whole tensors when merged with an adapter."""
    return layout.row_chunks(t.shape, chunk_elements, head_rows(t), whole=model.merged is not None)


def prepare(methods: list[str], device: str | None = None) -> threading.Thread | None:
    """Start building the fused K-quant GPU kernels in a background thread, and return at once (the thread, or
    None when there is nothing to build: the CPU, or no K-quant method among ``methods``). All of them are
    built: a method's type mix spans several K-quant types, which depend on the model.

    Triton compiles the fused K-quant kernels the first time they run on a machine, which on a fresh one
    (every Colab session) takes seconds, and loads them in every new process (about a second). A notebook
    calls this before training, so the GGUF step finds them ready. Unknown names raise convert's UserError."""
    resolved = [resolve_method(m) if isinstance(m, str) else m for m in methods]
    device = device or quants.default_device()
    if device == "cpu" or not any(m.base_type in quants.K_QUANTS for m in resolved):
        return None
    thread = threading.Thread(target=quants.warm_up, args=(quants.K_QUANTS, device), name="gguf_prepare",
                              daemon=True)
    thread.start()
    return thread


def convert(model_dir: str | os.PathLike[str], methods: list[str], out_dir: str | os.PathLike[str], *,
            adapter: str | os.PathLike[str] | None = None, device: str | None = None,
            split_max_size: int | None = None, progress: bool = True,
            check_space: bool = True, overwrite: bool = False,
            imatrix: str | os.PathLike[str] | None = None) -> list[ConvertResult]:
    """Write ``out_dir/<name>.<METHOD>.gguf`` for every method, reading the safetensors once for all of them.

    ``imatrix`` (a GGUF or legacy .dat importance matrix, e.g. from ``python -m unsloth_nb imatrix``) weights
    the quantizers as ``llama-quantize --imatrix`` does, with its type mix and ``quantize.imatrix.*`` keys.

    ``device`` is where quantization runs ("cuda" or "cpu"; default: the quantizer's choice).
    ``split_max_size`` (bytes) splits each output the way llama.cpp's converter does (``-00001-of-0000n``
    names, ``split.*`` keys). ``adapter`` (a peft LoRA folder) is fused while converting, tensor by tensor,
    giving the same file as merging first (``merge.merge``) and converting the merged folder.
    Each file is written as ``<final>.tmp-<pid>``, read back and checked, recorded in the folder's manifest
    (size, sha256, inputs) and then renamed, so a failed or killed run never leaves a file under a final name
    that is not complete. A re-run reuses files that are complete for the same inputs and replaces files it
    wrote earlier from other inputs; a file of the same name that unsloth_nb did not write is refused unless
    ``overwrite``. Before writing, the exact sizes are checked against the folder's free space (as the planner
    counts it: Kaggle's 20 GB cap included); ``check_space=False`` skips that, for fault-injection tests only.
    """
    if not methods:
        raise UserError("No GGUF method given. Fix: pass at least one, e.g. --quant q8_0.")
    resolved = [resolve_method(m) if isinstance(m, str) else m for m in methods]
    resolved = list({m.name: m for m in resolved}.values())
    model = _Model(model_dir, adapter, device, imatrix=imatrix)
    out = Path(out_dir).expanduser()
    created = output.check_out_dir(out)
    try:
        return _convert(model, resolved, out, device, split_max_size or 0, progress, check_space, overwrite)
    except BaseException:
        output.remove_if_empty(out, created)
        raise


def _convert(model: _Model, resolved: list[recipes.Method], out: Path, device: str | None, split: int,
             progress: bool, check_space: bool, overwrite: bool) -> list[ConvertResult]:
    started = time.perf_counter()
    shape = model.model_shape()
    plans = [_Plan(model, m, shape, split) for m in resolved]
    finals = [[out / name for name in p.file_names(_file_name(model, p.method))] for p in plans]
    inputs = [manifest.fingerprint(model.input_files(), method=p.method.name, split=split) for p in plans]
    done = output.reusable(finals, inputs, out, overwrite)
    todo = [i for i in range(len(plans)) if not done[i]]
    temps = {i: [output.temporary(f) for f in finals[i]] for i in todo}
    if check_space and todo:
        _check_ram(model, [plans[i] for i in todo], (device or quants.default_device()) != "cpu")
    # Reading and quantizing start now, while this thread builds the metadata (mostly the vocabulary).
    chunks = _Chunks(model, [plans[i] for i in todo], device) if todo else None
    try:
        _add_metadata(model, plans)
        heads = [layout.serialize(p.writer) for p in plans]
        layouts = [_measure(p, model, _file_name(model, p.method), h) for p, h in zip(plans, heads, strict=True)]
        output.remove_stale(out, [f for i in todo for f in finals[i]])
        need = sum(layouts[i].size for i in todo)
        if check_space and todo:
            output.check_space(out, need)
        free_before = shutil.disk_usage(out).free
        try:
            if chunks is not None:
                digests = _write(chunks, [heads[i] for i in todo], [temps[i] for i in todo], progress)
                for i, file_digests in zip(todo, digests, strict=True):
                    output.commit(out, finals[i], temps[i], layouts[i], heads[i], file_digests, inputs[i])
        except OSError as exc:
            raise output.write_error(exc, out, need, free_before) from exc
        finally:
            for temp in (t for files in temps.values() for t in files):
                temp.unlink(missing_ok=True)
    finally:
        if chunks is not None:
            chunks.close()
    seconds = time.perf_counter() - started
    return [ConvertResult(p.method.name, files[0], sum(f.stat().st_size for f in files),
                          0.0 if done[i] else seconds, len(model.tensors), tuple(files), reused=done[i])
            for i, (p, files) in enumerate(zip(plans, finals, strict=True))]


def _check_ram(model: _Model, plans: list[_Plan], gpu: bool) -> None:
    """Refuse a pass whose peak memory is over this machine's budget, before any chunk is read."""
    fused = model.merged.working_bytes() if model.merged is not None else 0
    chunk = layout.largest_chunk([(t.shape, head_rows(t)) for t in model.tensors], whole=bool(fused))
    outputs = sum(layout.nbytes(t.shape, qtype) for plan in plans for t, qtype in zip(model.tensors, plan.types,
                                                                                       strict=True))
    tokenizer = model.tokenizer_dir / "tokenizer.json"
    need = runtime.BASE_RAM + layout.peak_ram(chunk, [p.method.name for p in plans],
                                              tokenizer.stat().st_size if tokenizer.is_file() else 0,
                                              fused_adapter_bytes=fused, gpu=gpu, output_bytes=outputs)
    runtime.require_ram("The GGUF pass", need)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (None: unchanged), restored afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _encode_chunk(model: _Model, plans: list[_Plan], device: str | None, handles: dict[Path, _Safetensors],
                  i: int, rows: slice) -> tuple[int, list[np.ndarray]]:
    """Rows ``rows`` of tensor ``i`` read and encoded for every plan: (element count, one array per plan).
    Rows that every plan quantizes on a GPU are read straight to it."""
    where = device or quants.default_device()
    on_gpu = where != "cpu" and all(plan.types[i] in quants.TORCH_TYPES for plan in plans)
    # a damaged file raises its own UserError while read
    x = _load(model.tensors[i], model, handles, rows, torch.device(where) if on_gpu else None)
    return x.numel(), [np.ascontiguousarray(quants.encode(x, plan.types[i], device, weights=plan.weights[i]))
                       for plan in plans]


_FORKED: tuple[Any, ...] = ()
"""(model, plans, device, handles) for encode processes: set just before they are forked, which copies it
into them, so that a job is only (tensor index, rows) and a result only the encoded bytes."""


def _encode_forked(i: int, rows: slice) -> tuple[int, list[np.ndarray]]:
    return _encode_chunk(*_FORKED, i, rows)


def _worker_start(parent: int) -> None:
    """In a forked encode worker: one torch thread, and die with the parent. A worker blocked on its job
    queue would otherwise outlive a killed parent (a restarted notebook kernel) and keep its memory."""
    torch.set_num_threads(1)
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _encoders(model: _Model, plans: list[_Plan], device: str | None, handles: dict[Path, _Safetensors],
              workers: int, on_cpu: bool) -> tuple[Executor, Callable[[int, slice], tuple[int, list[np.ndarray]]]]:
    """The pool that reads and encodes chunks, and the function it runs.

    Quantizing K-quants on the CPU is many small torch calls per chunk; in threads, their Python halves
    queue for the GIL, so on Linux those conversions use forked worker processes, each with one torch
    thread (about 12% faster on two cores). They inherit the model description and open the safetensors
    files themselves; only the encoded bytes travel back. Everything else (16-bit copies, Q8_0, a GPU)
    is bound by reads or the GPU and stays in threads."""
    global _FORKED
    heavy = any(t in quants.TORCH_TYPES for plan in plans for t in plan.types)
    forkable = sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()
    if not (on_cpu and heavy and forkable and workers > 1 and model.merged is None):
        return (ThreadPoolExecutor(workers, thread_name_prefix="gguf"),
                lambda i, rows: _encode_chunk(model, plans, device, handles, i, rows))
    _FORKED = (model, plans, device, handles)
    gc.freeze()  # the children share the parent's objects; keep their collector from touching (copying) them
    try:
        with warnings.catch_warnings():  # "process is multi-threaded": the children only run _encode_forked
            warnings.simplefilter("ignore", DeprecationWarning)
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                       initializer=_worker_start, initargs=(os.getpid(),))
            pool.submit(int).result()  # forks every worker now, while _FORKED and the frozen heap are set
    finally:
        gc.unfreeze()
        _FORKED = ()
    return pool, _encode_forked


class _Chunks:
    """Every tensor's row chunks, read and encoded for every plan by worker threads or processes, in file order.

    Workers start on construction, at most IN_FLIGHT chunks ahead of the consumer (iteration), so the
    caller can build the metadata meanwhile; on a GPU further ahead, while the waiting encoded bytes fit
    GPU_LOOKAHEAD_BYTES (a queued job holds no memory until a worker takes it). On the CPU
    each worker keeps torch to one thread, so the workers, not torch, share the cores. ``close`` stops the
    workers and closes the files."""

    def __init__(self, model: _Model, plans: list[_Plan], device: str | None, ahead: int | None = None) -> None:
        """``ahead``: encoded bytes that may wait beyond IN_FLIGHT chunks (default: GPU_LOOKAHEAD_BYTES on a
        GPU, none on the CPU, whose workers are busy anyway)."""
        self.model, self.plans = model, plans
        self.handles = {part: _Safetensors(part)
                        for part in sorted({t.part for t in model.tensors if t.part is not None})}
        on_cpu = (device or quants.default_device()) == "cpu"
        workers, self.in_flight, chunk, self.ahead = layout.WORKERS, layout.IN_FLIGHT, layout.CHUNK_ELEMENTS, 0
        if not on_cpu:
            workers, self.in_flight = layout.GPU_WORKERS, layout.GPU_IN_FLIGHT
            chunk, self.ahead = layout.CHUNK_ELEMENTS * layout.GPU_CHUNK_FACTOR, layout.GPU_LOOKAHEAD_BYTES
        if ahead is not None:
            self.ahead = ahead
        if model.merged is not None:  # fusing an adapter holds whole merged tensors: one at a time, as planned
            workers, self.in_flight, self.ahead = 1, 1, 0
        self._cleanup = contextlib.ExitStack()  # unwound by close(), last in first out
        self._cleanup.callback(lambda: [handle.close() for handle in self.handles.values()])
        self.pool, self.encode = _encoders(model, plans, device, self.handles, workers, on_cpu)
        self._cleanup.enter_context(_torch_threads(1 if on_cpu and workers > 1 else None))
        self._cleanup.callback(self.pool.shutdown, wait=True, cancel_futures=True)
        self.jobs = collections.deque((i, rows) for i, t in enumerate(model.tensors)
                                      for rows in _row_chunks(t, model, chunk))
        self.pending: collections.deque[tuple[int, int, Future]] = collections.deque()
        self.pending_bytes = 0
        """Encoded bytes the pending jobs produce (done or not)."""
        self._submit()

    def _encoded_bytes(self, i: int, rows: slice) -> int:
        t = self.model.tensors[i]
        shape = (len(range(*rows.indices(t.shape[0]))), *t.shape[1:]) if t.shape else t.shape
        return sum(layout.nbytes(shape, plan.types[i]) for plan in self.plans)

    def _submit(self) -> None:
        while self.jobs:
            i, rows = self.jobs[0]
            nbytes = self._encoded_bytes(i, rows)
            if len(self.pending) >= self.in_flight and self.pending_bytes + nbytes > self.ahead:
                return
            self.jobs.popleft()
            self.pending.append((i, nbytes, self.pool.submit(self.encode, i, rows)))
            self.pending_bytes += nbytes

    def __iter__(self) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        """(tensor index, element count, one encoded array per plan) for each chunk, in order."""
        while self.pending:
            i, nbytes, future = self.pending.popleft()
            self.pending_bytes -= nbytes
            try:
                count, parts = future.result()
            except BrokenProcessPool as exc:
                raise UserError("A GGUF worker process died while quantizing (most often the system ran out of "
                                "memory and killed it). Nothing was renamed into place. Fix: free memory (close "
                                "other notebooks, restart the runtime) or convert fewer methods at once.") from exc
            yield i, count, parts
            self._submit()

    def close(self) -> None:
        self._cleanup.close()


def _write(chunks: _Chunks, heads: list[list[bytes]], temps: list[list[Path]], progress: bool) -> list[list[str]]:
    """Write every plan's heads, then every chunk's data in order, aligned per tensor, into its file(s).

    Returns the sha256 of every file written, per plan and shard."""
    model, plans = chunks.model, chunks.plans
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(int(np.prod(t.shape)) for t in model.tensors)
        bar = tqdm(total=total, unit="param", unit_scale=True, desc=f"GGUF {model.name}", leave=False)
    files = output.Files(temps, heads)
    written = -1
    try:
        for i, count, parts in chunks:
            if i != written:
                files.begin_tensor([plan.shard_of[i] for plan in plans])
                written = i
            for k, (plan, data) in enumerate(zip(plans, parts, strict=True)):
                files.write(k, plan.shard_of[i], memoryview(data).cast("B"))
            if bar is not None:
                bar.update(count)
        return files.close()
    finally:
        if bar is not None:
            bar.close()
        files.abort()


def convert_with_llamacpp(model_dir: str | os.PathLike[str], methods: list[str],
                          out_dir: str | os.PathLike[str]) -> list[ConvertResult]:
    """Run llama.cpp's own converter (from the llama-cpp-python sdist) for each method it supports."""
    from unsloth_nb.gguf import llamacpp

    model = checkpoint.resolve_model(model_dir)
    checkpoint.read_config(model)
    out = Path(out_dir).expanduser()
    output.check_out_dir(out)
    tree = llamacpp.source_tree()
    results = []
    for name in methods:
        m = resolve_method(name)
        if m.name not in ("f32", "f16", "bf16", "q8_0"):
            raise UserError(f"llama.cpp's converter writes only f32, f16, bf16 and q8_0, not {m.name}. Fix: use "
                            "the native backend for K-quants.")
        final = out / f"{model.resolve().name}.{m.name.upper()}.gguf"
        temp = output.temporary(final)
        env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"))
        cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model), "--outtype", m.name,
               "--outfile", str(temp)]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise UserError(f"llama.cpp's converter failed for {m.name}: {proc.stderr.strip()[-600:]}")
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)
        with open(final, "rb") as f:  # the header's tensor count (GGUFReader would parse the vocabulary too)
            (n,) = struct.unpack_from("<Q", f.read(16), 8)
        results.append(ConvertResult(m.name, final, final.stat().st_size, time.perf_counter() - started, n))
    return results
