"""Importance matrix (imatrix) from the user's own data, computed in PyTorch, in llama.cpp's file formats.

An imatrix tells llama.cpp's quantizers which input columns of each weight matter: for every matrix
multiplication of a ``blk.*`` weight it holds, per input column j, the sum of x_j^2 over the activation rows
that reached it, and how many rows that was. ``llama-quantize --imatrix FILE`` then weighs each column's error
by sum / count. llama.cpp computes it with ``llama-imatrix`` on a GGUF (so a user needs a GGUF, a llama.cpp
build and a text file first); :func:`collect` computes the same statistics on the HF model itself, the
fine-tune included (base + LoRA adapter), from the data the user trained on, before any GGUF exists.

The rules follow llama.cpp's ``tools/imatrix/imatrix.cpp`` (``compute_imatrix``, ``collect_imatrix``,
``save_imatrix``, ``save_imatrix_legacy``), ``common/imatrix-loader.cpp`` and ``tools/quantize/quantize.cpp``
(``load_imatrix``):

- the text is tokenized once (BOS added when the tokenizer adds one) and cut into chunks of ``ctx`` tokens
  (a trailing partial chunk is dropped); the first token of every chunk is replaced by BOS when the model adds
  one; each chunk is a sequence of its own, starting at position 0;
- every token of a chunk is counted (the second half of a chunk matters only to llama-imatrix's perplexity);
  unlike llama-imatrix, which wants at least two chunks, fewer tokens than ``ctx`` make one chunk of what
  there is;
- a multiplication is counted only when its activation batch has at least 16 rows; ``output.weight`` is not
  collected (llama-imatrix's default, without ``--process-output``); q, k and v each get an entry, all equal,
  since they read the same input;
- ``counts`` is the number of rows (tokens) seen, one per matrix.

The files themselves (GGUF and legacy .dat, read and written) are :mod:`unsloth_nb.gguf.imatrix_file`.

Collection itself differs from llama-imatrix only in the forward pass (torch instead of ggml: float32 on the
CPU, bf16 or fp16 on CUDA), so the numbers agree closely but not to the byte. Not collected: ``output.weight``
(llama-imatrix's ``--process-output``) and expert (MoE) tensors, which the converter does not write; files with
expert entries (one row and count per expert) are read, written and turned into weights.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unsloth_nb.errors import UserError
from unsloth_nb.gguf.imatrix_file import Imatrix, load

__all__ = ["Gain", "Imatrix", "calibrate", "collect", "gain", "load", "token_ids"]

MIN_ROWS = 16
"""llama-imatrix ignores multiplications whose activation batch has fewer rows (tokens) than this."""
TOKENS_PER_FORWARD = 2048
"""Tokens of one forward pass on the CPU: llama-imatrix's default batch (2048 / ctx chunks in one pass)."""
CUDA_TOKENS_PER_FORWARD = 8192
"""Tokens of one forward pass on CUDA, where larger passes run several times faster per token; a pass that
runs out of GPU memory is retried with half as many chunks."""
TEXT_PIECE = 1 << 20
"""Characters tokenized at once from a .txt file: larger files are tokenized piece by piece, cut at paragraph
breaks, so the tokenizer's memory stays bounded (tokens at a cut may differ from a whole-file tokenization)."""
# ----------------------------------------------------------------------------------------------- collecting


def collect(model_dir: str | os.PathLike[str], data: str | os.PathLike[str] | Iterable[Mapping], *,
            adapter: str | os.PathLike[str] | None = None, device: str | None = None, ctx: int = 512,
            chunks: int | None = None, progress: bool = True) -> Imatrix:
    """The importance matrix of the model in ``model_dir`` (with the LoRA ``adapter`` applied, if given) over
    ``data``, as llama-imatrix computes it over a text file.

    ``data`` is a .txt file (read whole, as ``llama-imatrix -f`` does: BOS in front, special-token text kept as
    text), another data file (.jsonl, .json, .csv, .parquet) or rows (chat rows are rendered with the tokenizer's
    chat template; text rows get BOS/EOS as in training). All token ids are joined and cut into ``ctx``-token
    chunks (at most ``chunks`` of them); with fewer than ``ctx`` tokens, the one chunk is what there is. The model
    runs in float32 on the CPU, bf16 (fp16 before compute capability 8.0) on CUDA; ``device`` defaults to CUDA
    when present. Memory: the model, one forward pass of :data:`TOKENS_PER_FORWARD` tokens
    (:data:`CUDA_TOKENS_PER_FORWARD` on CUDA, fewer when they do not fit), and the token ids (4 bytes each).
    """
    import torch

    from unsloth_nb import checkpoint
    from unsloth_nb.gguf import convert

    ctx = _positive(ctx, "ctx", MIN_ROWS)
    chunks = None if chunks is None else _positive(chunks, "chunks", 1)
    dev = _device(device)
    source = _read_data(data)
    _, sources, _ = convert.tensor_sources(model_dir, adapter)  # checks the folder and the adapter
    targets = _targets(sources)
    model_path = checkpoint.resolve_model(model_dir)
    adapter_path = Path(adapter).expanduser() if adapter is not None else None
    tokenizer = _tokenizer(model_path, adapter_path)
    ids = _token_ids(tokenizer, source, None if chunks is None else chunks * ctx)
    if ids.size < MIN_ROWS:
        raise UserError(f"{source.name} gives only {ids.size} tokens; llama.cpp's statistics need batches of at least "
                        f"{MIN_ROWS}. Fix: give more text (a few hundred chunks of {ctx} tokens is typical).")
    n_ctx = min(ctx, int(ids.size))
    n_chunk = ids.size // n_ctx if chunks is None else min(ids.size // n_ctx, chunks)
    grid = ids[: n_chunk * n_ctx].reshape(n_chunk, n_ctx).copy()
    bos = _added_bos(tokenizer)
    if bos is not None:
        grid[:, 0] = bos
    if dev.type == "cpu":
        from unsloth_nb import runtime

        n_params = sum(math.prod(t.shape) for t in sources)
        runtime.require_ram("Collecting an importance matrix (the model in float32)", n_params * 4 + (1 << 28))
    net = _load_model(model_path, adapter_path, tokenizer, dev)
    try:
        hooks = _Hooks(net, targets)
        try:
            _run(net, hooks, grid, dev, progress)
        finally:
            hooks.remove()
    except (UserError, KeyboardInterrupt) as exc:
        # without the frames that hold the model: a notebook keeps the last traceback, and with it the model
        raise exc.with_traceback(None) from None
    finally:
        del net
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # give its GPU memory back for what comes next (quantizing)
    entries = hooks.entries()
    chunk_count = int(max((int(c.max()) for _, c in entries.values()), default=0) // n_ctx)
    return Imatrix(entries, [source.name], chunk_count, n_ctx)


def calibrate(model_dir: str | os.PathLike[str], data: str | os.PathLike[str] | Iterable[Mapping],
              out: str | os.PathLike[str], *, adapter: str | os.PathLike[str] | None = None,
              device: str | None = None, ctx: int = 512, chunks: int | None = None, progress: bool = True) -> Path:
    """The notebooks' step: :func:`collect` and save to ``out`` (GGUF), unless ``out`` already holds the file made
    from these same inputs (a re-run returns it at once). A file at ``out`` that unsloth_nb did not write is left
    alone (a UserError says so). Returns the path, for ``convert(..., imatrix=...)``."""
    import hashlib
    import json

    from unsloth_nb import checkpoint, manifest

    final = Path(out).expanduser().absolute()
    files = checkpoint.weight_files(checkpoint.resolve_model(model_dir))
    if adapter is not None:
        files += [f for f in Path(adapter).expanduser().glob("adapter_*") if f.is_file()]
    rows = None
    if isinstance(data, str | os.PathLike):
        files.append(Path(data).expanduser())
    else:
        data = list(data)
        rows = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    inputs = manifest.fingerprint([f for f in files if f.exists()], step="imatrix", ctx=ctx, chunks=chunks,
                                  rows=rows)
    state = manifest.status(final.parent, final.name, inputs)
    if state == "complete":
        return final
    if state == "foreign":
        raise UserError(f"{final} already exists and unsloth_nb did not write it, so it is left as it is. Fix: "
                        "pass another out= file name, or move that file away.")
    result = collect(model_dir, data, adapter=adapter, device=device, ctx=ctx, chunks=chunks, progress=progress)
    path = result.save(final, overwrite=state == "ours")
    manifest.record(final.parent, {final.name: (path.stat().st_size, manifest.sha256_file(path))}, inputs)
    return path


def _run(net: Any, hooks: _Hooks, grid: np.ndarray, dev: Any, progress: bool) -> None:
    """Forward every chunk (rows of ``grid``), several per pass; a pass that runs out of GPU memory is retried
    with half as many chunks, and counts nothing."""
    import torch
    from tqdm.auto import tqdm

    n_chunk, n_ctx = grid.shape
    per_pass = max(1, (CUDA_TOKENS_PER_FORWARD if dev.type == "cuda" else TOKENS_PER_FORWARD) // n_ctx)
    start = 0
    with torch.inference_mode(), tqdm(total=n_chunk, desc="imatrix", unit="chunk", disable=not progress) as bar:
        while start < n_chunk:
            batch = torch.from_numpy(grid[start:start + per_pass].astype(np.int64)).to(dev)
            try:
                net(input_ids=batch, use_cache=False, logits_to_keep=1)
            except torch.cuda.OutOfMemoryError:
                hooks.discard()
                del batch
                torch.cuda.empty_cache()
                if per_pass == 1:
                    raise UserError(f"One chunk of {n_ctx} tokens does not fit in the GPU's memory next to the "
                                    "model. Fix: pass a smaller --ctx, or collect on the CPU (--device cpu).") from None
                per_pass //= 2
                continue
            hooks.commit()
            start += batch.shape[0]
            bar.update(batch.shape[0])


def token_ids(model_dir: str | os.PathLike[str], data: str | os.PathLike[str] | Iterable[Mapping], *,
              adapter: str | os.PathLike[str] | None = None) -> np.ndarray:
    """The token ids :func:`collect` reads from ``data``, joined, before they are cut into chunks (int32): to
    check what the model will see, or to feed llama-imatrix the same text."""
    from unsloth_nb import checkpoint

    tokenizer = _tokenizer(checkpoint.resolve_model(model_dir), Path(adapter).expanduser() if adapter else None)
    return _token_ids(tokenizer, _read_data(data), None)


def _positive(value: Any, what: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        example = 512 if what == "ctx" else 100
        raise UserError(f"{what} must be a whole number of at least {least}, not {value!r}. Fix: pass e.g. "
                        f"--{what} {example} ({what}={example} in Python).")
    return value


def _device(device: str | None) -> Any:
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise UserError(f"Unknown device {device!r}. Fix: use 'cpu' or 'cuda'.")
    if device != "cpu" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU here. Fix: use --device cpu, or "
                        "a machine (or a torch build) with CUDA.")
    return torch.device(device)


def _targets(sources: Iterable[Any]) -> dict[str, list[tuple[str, int]]]:
    """HF module name -> [(GGUF name, input columns)] for every ``blk.*`` matrix the converter writes."""
    targets: dict[str, list[tuple[str, int]]] = {}
    for t in sources:
        if t.name.startswith("blk.") and t.hf_name and t.hf_name.endswith(".weight") and len(t.shape) == 2:
            targets.setdefault(t.hf_name[: -len(".weight")], []).append((t.name, int(t.shape[-1])))
    if not targets:
        raise UserError("The model has no blk.* weight matrices that llama.cpp would multiply, so there is "
                        "nothing to collect. Fix: pass the folder of a supported causal language model.")
    return targets


def _tokenizer(model_path: Path, adapter_path: Path | None) -> Any:
    from transformers import AutoTokenizer

    from unsloth_nb import checkpoint

    folder = model_path
    if adapter_path is not None and any((adapter_path / f).is_file() for f in checkpoint.TOKENIZER_FILES):
        folder = adapter_path
    return AutoTokenizer.from_pretrained(folder)


def _added_bos(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer puts one in front of a text (llama.cpp's add_bos_token), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    plain = tokenizer("a", add_special_tokens=False).input_ids
    special = tokenizer("a", add_special_tokens=True).input_ids
    return bos if special[:1] == [bos] and plain[:1] != [bos] else None


@dataclass(frozen=True)
class _Data:
    """The user's data, read and checked before any model is loaded: a .txt file's text, or normalised rows."""

    name: str
    """What imatrix.datasets records: the path as given, or how many in-memory rows."""
    text: str | None = None
    items: list[Any] | None = None
    """Chat messages (list of dicts) or plain strings, one per row."""


def _read_data(data: Any) -> _Data:
    """Read ``data`` (see :func:`collect`); every problem is a UserError naming the file."""
    from unsloth_nb import dataset

    if isinstance(data, (str, os.PathLike)) and Path(data).suffix.lower() == ".txt":
        return _Data(str(data), text=_read_text(Path(data).expanduser()))
    rows = dataset.load_rows(data)
    name = str(data) if isinstance(data, (str, os.PathLike)) else \
        f"{len(rows)} in-memory row{'' if len(rows) == 1 else 's'}"
    try:
        return _Data(name, items=[dataset.normalize(row, number) for number, row in enumerate(rows, 1)])
    except UserError as exc:
        raise UserError(f"{name}: {exc}") from None


def _read_text(path: Path) -> str:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"The data file {path} {what}. Fix: pass a .txt file (or .jsonl, .json, .csv, .parquet) "
                        "with text like the model will see.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"The data file {path} is not UTF-8 text (byte {exc.start}). Fix: save it as UTF-8.") from None
    except OSError as exc:
        raise UserError(f"Cannot read the data file {path} ({exc.strerror}). Fix: check its permissions.") from None
    if not text.strip():
        raise UserError(f"The data file {path} holds no text. Fix: fill it with text like the model will see "
                        "(a few hundred kB is typical).")
    return text


def _token_ids(tokenizer: Any, data: _Data, limit: int | None) -> np.ndarray:
    """All token ids of ``data`` joined (int32; at most about ``limit`` when given)."""
    if data.text is not None:
        return _text_ids(tokenizer, data.text, limit)
    parts, total = [], 0
    eos = tokenizer.eos_token_id
    for number, item in enumerate(data.items or [], 1):
        if isinstance(item, str):  # as training sees a text row: BOS (when the tokenizer adds one) and EOS
            ids = tokenizer(item, add_special_tokens=True).input_ids
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
        else:
            try:
                text = tokenizer.apply_chat_template(item, tokenize=False)
            except (ValueError, TypeError) as exc:
                raise UserError(f"Row {number} of {data.name} is a conversation, but the tokenizer's chat template "
                                f"cannot render it ({exc}). Fix: use a tokenizer with a chat template (save one "
                                "with the adapter), or give plain text rows or a .txt file.") from None
            ids = tokenizer(text, add_special_tokens=False).input_ids
        parts.append(np.asarray(ids, dtype=np.int32))
        total += len(ids)
        if limit is not None and total >= limit:
            break
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _text_ids(tokenizer: Any, text: str, limit: int | None) -> np.ndarray:
    """A text as llama-imatrix tokenizes its -f file: one text, BOS in front when the model adds one,
    special-token text kept as text (llama-imatrix's default, without --parse-special)."""
    bos = _added_bos(tokenizer)
    parts, total, pos = [np.asarray([] if bos is None else [bos], dtype=np.int32)], 0, 0
    while pos < len(text) and (limit is None or total < limit):
        end = len(text) if len(text) - pos <= TEXT_PIECE else text.find("\n\n", pos + TEXT_PIECE)
        end = len(text) if end < 0 else end + 2
        ids = tokenizer(text[pos:end], add_special_tokens=False, split_special_tokens=True).input_ids
        parts.append(np.asarray(ids, dtype=np.int32))
        total += len(ids)
        pos = end
    return np.concatenate(parts)


def _load_model(model_path: Path, adapter_path: Path | None, tokenizer: Any, dev: Any) -> Any:
    """The causal LM for collection: float32 on the CPU, bf16 (fp16 before compute capability 8.0) on CUDA; an
    adapter is loaded through peft and merged, which gives every base layer the same input as base + LoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    if dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.get_device_capability(dev)[0] >= 8 else torch.float16
    else:
        dtype = torch.float32
    net = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    if adapter_path is not None:
        from peft import PeftModel

        vocab = len(tokenizer)
        if vocab > net.get_input_embeddings().weight.shape[0]:
            net.resize_token_embeddings(vocab, mean_resizing=False)
        net = PeftModel.from_pretrained(net, adapter_path).merge_and_unload()
    if dev.type != "cuda":
        return net.eval()
    try:
        return net.to(dev).eval()
    except torch.cuda.OutOfMemoryError:
        del net
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        raise UserError(f"The model does not fit in the GPU's memory in {str(dtype).removeprefix('torch.')} "
                        f"({free / 1e9:.1f} of {total / 1e9:.1f} GB free). Fix: free the GPU (restart the notebook's "
                        "kernel), or collect on the CPU (--device cpu, needs about 4 bytes of RAM per parameter)."
                        ) from None


def _module_key(name: str) -> str:
    """A module name as the checkpoint names its weight: peft's wrappers removed."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def _square_sums(flat: Any) -> Any:
    """Per column of ``flat`` (rows, columns), the float32 sum of squares over the rows: on CUDA one reduction
    kernel (the norm, squared; the upcast happens inside it), on the CPU a product and a sum (which vectorise
    better there than a norm over the outer dimension)."""
    import torch

    if flat.is_cuda:
        return torch.linalg.vector_norm(flat, dim=0, dtype=torch.float32).square_()
    flat = flat.float()
    return (flat * flat).sum(0)


def _by_tail(by_name: dict[str, Any]) -> dict[str, Any]:
    """Linear layers by the part of their name from ``layers.`` on, for checkpoints whose names have another
    prefix than the built model's (e.g. a multimodal model's ``language_model``); a tail shared by several layers
    (a vision tower's) counts only for the language model's, or not at all."""
    found: dict[str, list[tuple[str, Any]]] = {}
    for name, module in by_name.items():
        if "layers." in name:
            found.setdefault(name[name.rfind("layers."):], []).append((name, module))
    out = {}
    for tail, candidates in found.items():
        if len(candidates) > 1:
            candidates = [(n, m) for n, m in candidates if "language_model" in n or "text_model" in n]
        if len(candidates) == 1:
            out[tail] = candidates[0][1]
    return out


class _Hooks:
    """Forward pre-hooks on the model's linear layers that become ``blk.*`` weights: per input column, the sum of
    x^2 over the rows counted, and the rows counted (batches of at least :data:`MIN_ROWS` rows).

    Layers fed the same tensor one after the other (q, k, v; gate, up) form a group: the sum is computed and
    accumulated once for the group (a float32 accumulator on the layer's device, one add per forward pass), and
    every layer of the group gets it. Groups are found anew in every pass (a layer called with another input
    than its neighbour's starts a group of its own), so nothing depends on the model's call order. A pass is
    added to the totals only when it completed (:meth:`commit`), so a pass that fails part way counts nothing."""

    def __init__(self, net: Any, targets: dict[str, list[tuple[str, int]]]) -> None:
        import torch

        by_name = {_module_key(n): m for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
        by_tail = _by_tail(by_name)
        self.names: dict[str, list[str]] = {}
        """module name -> the GGUF names it becomes."""
        self._sums: dict[tuple[str, ...], Any] = {}
        self._rows: dict[tuple[str, ...], int] = {}
        self._handles: list[Any] = []
        self._x: Any = None
        self._group: list[str] = []
        self._square: Any = None
        self._n = 0
        self._pending: list[tuple[tuple[str, ...], Any, int]] = []
        missing = []
        for module_name, gguf_names in targets.items():
            module = by_name.get(module_name)
            if module is None and "layers." in module_name:
                module = by_tail.get(module_name[module_name.rfind("layers."):])
            if module is None:
                missing.append(module_name)
                continue
            columns = gguf_names[0][1]
            if module.in_features != columns:
                raise UserError(f"The loaded model's {module_name} takes {module.in_features} inputs, but its weight "
                                f"in the checkpoint has {columns} columns. Fix: check that config.json matches the "
                                "weights.")
            self.names[module_name] = [g for g, _ in gguf_names]
            self._handles.append(module.register_forward_pre_hook(self._hook(module_name)))
        if missing:
            self.remove()
            raise UserError(f"The model as transformers builds it has no linear layer for {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''}, which the GGUF conversion writes. Fix: convert "
                            "to GGUF first and run llama-imatrix on it, or report the architecture.")

    def _hook(self, key: str) -> Any:
        def pre_hook(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0]
            if x is self._x:
                self._group.append(key)
                return
            self._close_group()
            columns = x.shape[-1]
            rows = x.numel() // columns
            if rows >= MIN_ROWS:
                self._x, self._group, self._n = x, [key], rows
                self._square = _square_sums(x.reshape(rows, columns))

        return pre_hook

    def _close_group(self) -> None:
        """Set the group being collected aside for the end of the pass, and let go of its input."""
        if self._x is not None:
            self._pending.append((tuple(self._group), self._square, self._n))
        self._x, self._square, self._group = None, None, []

    def commit(self) -> None:
        """End of a forward pass: add its sums and rows to the totals."""
        self._close_group()
        for group, square, n in self._pending:
            if group in self._sums:
                self._sums[group].add_(square)
                self._rows[group] += n
            else:
                self._sums[group], self._rows[group] = square, n
        self._pending = []

    def discard(self) -> None:
        """Forget a forward pass that failed part way (out of memory): nothing of it is counted."""
        self._close_group()
        self._pending = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.discard()

    def entries(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """GGUF name -> (sum2 float32 [1, ne0], counts float32 [1]) for every layer that saw a counted batch."""
        totals: dict[str, np.ndarray] = {}
        rows: dict[str, int] = {}
        for group, acc in self._sums.items():
            values = acc.double().cpu().numpy()
            for key in group:
                totals[key] = totals[key] + values if key in totals else values
                rows[key] = rows.get(key, 0) + self._rows[group]
        out = {}
        for key, total in totals.items():
            if not np.isfinite(total).all():
                raise UserError(f"The activations reaching {key} overflowed (NaN or infinite x^2): the model does not "
                                "run stably in this precision. Fix: collect on the CPU (--device cpu, float32) or on "
                                "a GPU with bf16 (compute capability 8.0 or newer).")
            for name in self.names[key]:
                out[name] = (total.astype(np.float32)[None, :], np.array([rows[key]], dtype=np.float32))
        return out


# ---------------------------------------------------------------------------------------------- command line


@dataclass
class Gain:
    """What the imatrix changes for one method on one model (see :func:`gain`)."""

    method: str
    bits_per_weight: float
    """Of the sampled matrices, as the method stores them (with the imatrix's type mix)."""
    error: float
    """Layer output error on the calibration data without the imatrix: sum over the sampled matrices and rows of
    sum_j E[x_j^2] (w_j - q_j)^2, over the same sum of E[x_j^2] w_j^2 (0 is lossless)."""
    error_with: float
    """The same with the imatrix."""

    @property
    def reduction(self) -> float:
        """The share of the error the imatrix removes (0.3: 30% lower)."""
        return 1.0 - self.error_with / self.error if self.error > 0 else 0.0


def gain(model_dir: str | os.PathLike[str], imatrix: str | os.PathLike[str] | Imatrix, methods: Iterable[str], *,
         device: str | None = None, max_params: int = 8_000_000) -> list[Gain]:
    """Per method, the layer output error of the quantized weights on the data the imatrix was collected from,
    without and with the imatrix: quantized by our quantizers as the GGUF would be (llama.cpp's types), decoded
    again, each column's error weighted by the imatrix's E[x^2] (the expected squared error of that layer's
    outputs on the data, if columns are independent). Measured on evenly spaced matrices up to ``max_params``
    weights, so it takes seconds on a GPU and well under a minute on a CPU for a small model; no file written."""
    import gguf
    import torch

    from unsloth_nb import checkpoint
    from unsloth_nb.gguf import convert, quants, recipes

    stats = imatrix if isinstance(imatrix, Imatrix) else load(imatrix)
    _, sources, shape = convert.tensor_sources(model_dir)
    folder = checkpoint.resolve_model(model_dir)
    infos = checkpoint.model_tensors(folder)
    chosen = [t for t in sources if t.name in stats and t.hf_name in infos and len(t.shape) == 2]
    if not chosen:
        raise UserError(f"The importance matrix has no entry for any weight of {folder}: it was computed for another "
                        "model. Fix: compute it on this model (`python -m unsloth_nb imatrix`).")
    total = sum(math.prod(t.shape) for t in chosen)
    step = max(1, math.ceil(total / max_params))
    chosen = chosen[::step]
    resolved = [m for m in (convert.resolve_method(m) if isinstance(m, str) else m for m in methods)
                if m.quantized and m.name != "q8_0"]  # the rest take no weights: nothing to gain
    sums = {(m.name, w): [0.0, 0.0, 0.0] for m in resolved for w in (False, True)}  # error, norm, bits
    count = sum(math.prod(t.shape) for t in chosen)
    for t in chosen:
        x = checkpoint.load_tensor(infos[t.hf_name]).to(torch.float32)
        col = stats.weights(t.name, int(t.shape[-1]))
        col_t = torch.from_numpy(np.asarray(col, dtype=np.float32))
        norm = float((x.square() * col_t).sum())
        for m in resolved:
            for with_imatrix in (False, True):
                qtype = recipes.tensor_type(m, t.name, t.shape, shape, with_imatrix)
                weights = col if with_imatrix and qtype in quants.IMATRIX_TYPES else None
                data = quants.encode(x, qtype, device, weights=weights)
                back = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32))
                acc = sums[(m.name, with_imatrix)]
                acc[0] += float(((x - back.reshape(x.shape)).square() * col_t).sum())
                acc[1] += norm
                acc[2] += data.nbytes * 8
    return [Gain(m.name, sums[(m.name, True)][2] / count, sums[(m.name, False)][0] / sums[(m.name, False)][1],
                 sums[(m.name, True)][0] / sums[(m.name, True)][1]) for m in resolved]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m unsloth_nb imatrix``, for the CLI's subparser."""
    parser.add_argument("model", metavar="MODEL_DIR", help="HF model folder (the base, with --adapter, or merged)")
    parser.add_argument("--data", required=True,
                        help="text like the model will see: .txt (read whole, as llama-imatrix -f), or .jsonl, "
                             ".json, .csv, .parquet rows (chat rows rendered with the chat template)")
    parser.add_argument("--out", required=True, help="output file, e.g. model.imatrix.gguf (llama-quantize --imatrix)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder applied to MODEL_DIR (through peft)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where the model runs (default: cuda if present; float32 on cpu, bf16/fp16 on cuda)")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per chunk (llama-imatrix -c; default 512)")
    parser.add_argument("--chunks", type=int, default=None, help="use at most this many chunks (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")


def run_cli(args: argparse.Namespace) -> int:
    """``python -m unsloth_nb imatrix MODEL_DIR --data FILE --out FILE``: one line with path, size, chunks, time."""
    from unsloth_nb.gguf import output

    started = time.perf_counter()
    result = collect(args.model, args.data, adapter=args.adapter, device=args.device, ctx=args.ctx,
                     chunks=args.chunks, progress=sys.stderr.isatty())
    path = result.save(args.out, overwrite=args.overwrite)
    print(f"{path}  {output.human(path.stat().st_size)}  {result.chunk_count} chunks of {result.chunk_size} tokens  "
          f"{time.perf_counter() - started:.1f} s")
    return 0
