"""A peft LoRA adapter as a GGUF LoRA adapter for llama.cpp (``--lora``), written natively: for an ordinary
adapter, the bytes of llama.cpp's ``convert_lora_to_gguf.py`` for the same adapter and base.

Such a file holds only the low-rank factors of the base tensors the adapter changes, named after the base
GGUF's tensor: ``<name>.lora_a`` (peft's lora_A, r x in) and ``<name>.lora_b`` (lora_B, out x r). llama.cpp adds
``alpha / r * B @ (A @ x)`` to every product with that tensor, where alpha is ``adapter.lora.alpha`` and r is
lora_b's column count. The base's layout applies to the factors: Llama's q/k row permutation permutes lora_b's
rows (A is left as it is); the token embeddings' lora_a is stored transposed (vocab x r), the way llama.cpp's
embedding lookup reads it. There is no vocabulary, no hyper-parameter and no ``general.file_type``: those
belong to the base GGUF.

Key/values, in the reference's order: general.architecture, general.type = "adapter", adapter.type = "lora",
the naming keys gguf-py derives from the adapter folder (its name and peft's README model card),
adapter.lora.alpha (float32), adapter.alora.invocation_tokens for an activated LoRA, general.quantization_version.
Tensors come in the order of the adapter file's data, lora_a before lora_b. Each has the method's type, except
that a q8_0 file keeps rows Q8_0 cannot hold (lora_b's r columns when r is not a multiple of 32) in F16, as the
reference falls back.

Where the reference's file would not behave like peft, this module differs or refuses:

* llama.cpp scales every module by alpha / r; peft's scale is its own (rsLoRA: alpha / sqrt(r); alpha_pattern per
  module). The alpha written is the effective one (scale * r) most modules share, which is the config's
  lora_alpha for a plain adapter (the reference's file); the lora_b of a module whose effective alpha differs is
  multiplied by the ratio, in float32, before it is stored.
* Whole-tensor copies (modules_to_save: resized embeddings, a trained lm_head), trainable token rows, LoRA
  biases, DoRA, an lm_head LoRA where llama.cpp has no separate output tensor, and an embedding LoRA on a base with
  tied embeddings (llama.cpp would apply it to the output projection too) are refused with a UserError whose fix
  is the fused conversion (``python -m unsloth_nb gguf BASE --adapter ADAPTER``), which handles all of them.
* LoRA factors of vision or audio towers are left out, as the reference leaves them out: a text GGUF has no
  such tensors.

The output folder, temporary names, read-back check, manifest and rename are ``output``'s; the header bytes are
``layout``'s; which HF tensor becomes which GGUF tensor, and its layout, is ``convert``'s.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch

from unsloth_nb import checkpoint, manifest
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import arch as archs
from unsloth_nb.gguf import header, layout, output, quants, recipes
from unsloth_nb.gguf.convert import SourceTensor, tensor_sources, to_gguf_layout
from unsloth_nb.gguf.output import ConvertResult

logger = logging.getLogger(__name__)

T = gguf.GGMLQuantizationType

LORA_METHODS = ("f32", "f16", "bf16", "q8_0")
"""The methods a LoRA GGUF can be written in: the reference's output types (the factors are small next to the
base, which carries the quantization)."""

FUSED_FIX = ("Fix: fuse the adapter while converting the base instead (`python -m unsloth_nb gguf BASE --adapter "
             "ADAPTER`, or merge it first with `python -m unsloth_nb merge`), which handles every kind of adapter.")
"""The way out for every adapter a LoRA GGUF cannot carry."""


@dataclass(frozen=True)
class LoraTensor:
    """One tensor of a LoRA GGUF: which adapter tensor it is and how it is laid out."""

    name: str
    """GGUF name: the base GGUF tensor's name + ".lora_a" or ".lora_b"."""
    shape: tuple[int, ...]
    """Shape in torch order, as written."""
    role: Literal["a", "b"]
    """Which factor: lora_a (peft's lora_A) or lora_b (lora_B)."""
    source: checkpoint.TensorInfo
    """The adapter's tensor."""
    target: SourceTensor
    """The base GGUF tensor it changes (its q/k permutation applies to lora_b's rows)."""
    transpose: bool = False
    """True for the token embeddings' lora_a, which llama.cpp reads as (vocab, r)."""
    factor: float = 1.0
    """lora_b is multiplied by this (1: stored as it is): the part of peft's scale that alpha / r cannot say."""


@dataclass(frozen=True)
class AdapterPlan:
    """Everything a LoRA GGUF is written from: the adapter, its base, the alpha and the tensors in file order."""

    adapter: checkpoint.Adapter
    base_dir: Path
    """The base model folder (only its config and tensor headers are read)."""
    arch: archs.Arch
    alpha: float
    """adapter.lora.alpha: llama.cpp scales each module by alpha / r."""
    tensors: tuple[LoraTensor, ...]
    invocation_tokens: tuple[int, ...] = ()
    """An activated LoRA's invocation sequence (adapter.alora.invocation_tokens), empty for a plain one."""

    @property
    def name(self) -> str:
        """Base of the output file names: the adapter folder's name."""
        return self.adapter.path.resolve().name

    def data(self, t: LoraTensor) -> torch.Tensor:
        """One tensor as the file holds it (in its stored dtype unless rescaled): lora_a transposed for the
        embeddings, lora_b in the base tensor's GGUF row layout and times its factor."""
        x = checkpoint.load_tensor(t.source)
        if t.transpose:
            x = x.T
        if t.role == "b":
            x = to_gguf_layout(self.arch, t.target, x)
            if t.factor != 1.0:
                x = x.to(torch.float32) * t.factor
        return x.contiguous()

    def input_files(self) -> list[Path]:
        """Every file the output depends on: the adapter's weights, config and model card (the naming keys come
        from it), and the base's config and weight files (their headers give names, shapes and permutation)."""
        side = [self.adapter.path / n for n in ("adapter_config.json", "adapter_model.safetensors", "README.md",
                                                "generation_config.json")]
        side.append(self.base_dir / "config.json")
        return [p for p in side if p.is_file()] + checkpoint.weight_files(self.base_dir)


# ------------------------------------------------------------------------------------------- the plan


def adapter_tensors(adapter_dir: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> AdapterPlan:
    """Read and check an adapter against its base, and lay out its LoRA GGUF (no factor is loaded).

    ``base`` is the base model folder (or a Hub id in the local cache); without it, the adapter's
    ``base_model_name_or_path`` is used when that is a local folder or cached. Whatever llama.cpp could not
    apply as a LoRA GGUF is a UserError (see the module's docstring), and so is an adapter for another base."""
    path = Path(adapter_dir).expanduser()
    if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise UserError(f"{path} is a model folder (config.json and weights), not a LoRA adapter. Fix: convert it "
                        f"with `python -m unsloth_nb gguf {path}`, or pass the adapter folder (the one with "
                        "adapter_config.json and adapter_model.safetensors).")
    adapter = checkpoint.read_adapter(path)
    check_loadable(adapter)
    base_dir = base_model_dir(adapter, base)
    arch, sources, _ = tensor_sources(base_dir)
    mapping = adapter.config.get("auto_mapping")
    trained_on = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    family = archs.ARCHITECTURES.get(trained_on) if isinstance(trained_on, str) else None
    if family is not None and family.name != arch.name:  # shapes alone can agree across families
        raise UserError(f"The adapter {adapter.path} was trained on a {trained_on}, but the base {base_dir} is a "
                        f"{arch.name} model. Fix: pass the base model the adapter was trained on (--base).")
    by_hf = {s.hf_name: s for s in sources if s.hf_name is not None}
    tied = "output.weight" not in {s.name for s in sources}
    for target, pair in adapter.pairs.items():
        if target == "lm_head.weight" and target not in by_hf:
            raise UserError(f"The adapter {adapter.path} trains a LoRA on lm_head, but llama.cpp's {arch.name} model "
                            f"{base_dir.name} has no output tensor of its own (it reuses the token embeddings), so "
                            f"no LoRA GGUF can apply it. {FUSED_FIX}")
        if pair.embedding and tied and target in by_hf:
            raise UserError(f"The adapter {adapter.path} trains a LoRA on the token embeddings of {base_dir.name}, "
                            "whose output projection is the same tensor; llama.cpp would apply the factors to the "
                            f"output too and abort. {FUSED_FIX}")
    checkpoint.MergedModel(base_dir, adapter.path, "cpu")  # the factors' shapes against the base's tensors
    targets = [t for t in adapter.pairs if archs.is_text_tensor(t)]
    skipped = sorted(set(adapter.pairs) - set(targets))
    if skipped:
        logger.warning("%d LoRA modules of the vision/audio tower (e.g. %s) are left out: a text GGUF has no such "
                       "tensors", len(skipped), skipped[0])
    if not targets:
        raise UserError(f"The adapter {adapter.path} changes no tensor of the text model, so its LoRA GGUF would be "
                        "empty. Fix: pass an adapter trained on the language model's layers.")
    alpha, factors = choose_alpha(adapter, targets)
    tensors: list[LoraTensor] = []
    for target in file_order(adapter, targets):
        pair, dest = adapter.pairs[target], by_hf[target]
        a, b = adapter.tensors[pair.a], adapter.tensors[pair.b]
        if pair.embedding and a.shape[1] != dest.shape[0]:
            raise UserError(f"The adapter's embedding LoRA covers {a.shape[1]} tokens, but llama.cpp's {arch.name} "
                            f"GGUF keeps {dest.shape[0]} rows of the embeddings (the tokenizer's), so the factors "
                            f"would not fit. {FUSED_FIX}")
        a_shape = (a.shape[1], a.shape[0]) if pair.embedding else a.shape
        tensors.append(LoraTensor(f"{dest.name}.lora_a", a_shape, "a", a, dest, transpose=pair.embedding))
        tensors.append(LoraTensor(f"{dest.name}.lora_b", b.shape, "b", b, dest, factor=factors[target]))
    return AdapterPlan(adapter, base_dir, arch, alpha, tuple(tensors), invocation_tokens(adapter, base_dir))


def check_loadable(adapter: checkpoint.Adapter) -> None:
    """Refuse what a LoRA GGUF cannot carry: llama.cpp applies low-rank pairs to 2-D weights and nothing else.
    (DoRA is refused by ``checkpoint.read_adapter``; peft's saved copies of base layers are ignored, as the
    reference ignores them.)"""
    problems = []
    copies = sorted(k for k in adapter.replacements if ".base_layer." not in k)
    if copies:
        problems.append(f"whole trained copies of {', '.join(copies[:3])} (modules_to_save: resized embeddings, a "
                        "trained lm_head or norms)")
    if adapter.token_deltas:
        problems.append(f"trainable token rows of {', '.join(sorted(adapter.token_deltas))} "
                        "(trainable_token_indices)")
    biases = sorted(t for t, p in adapter.pairs.items() if p.bias)
    if biases:
        problems.append(f"LoRA biases (lora_bias, e.g. for {biases[0]})")
    if adapter.config.get("fan_in_fan_out"):
        problems.append("transposed factors (fan_in_fan_out)")
    if adapter.config.get("layer_replication"):
        problems.append("replicated layers (layer_replication)")
    if problems:
        raise UserError(f"The adapter {adapter.path} holds {'; '.join(problems)}. A LoRA GGUF holds only low-rank "
                        f"factor pairs, so llama.cpp could not apply that. {FUSED_FIX}")


def base_model_dir(adapter: checkpoint.Adapter, base: str | os.PathLike[str] | None = None) -> Path:
    """The base model folder: ``base`` when given, else the adapter's base_model_name_or_path if that is a local
    folder or a Hub id in the local Hugging Face cache (nothing is downloaded)."""
    if base is not None:
        return checkpoint.resolve_model(base)
    config = adapter.path / "adapter_config.json"
    named = adapter.base_model
    if named is None:
        raise UserError(f"{config} does not name its base model (no base_model_name_or_path), and the LoRA GGUF needs "
                        "the base's config and tensor names. Fix: pass the base model folder with --base (base=...), "
                        "the model the adapter was trained on.")
    if Path(named).expanduser().is_dir():
        return Path(named).expanduser()
    if checkpoint.is_hub_id(named):
        try:
            return checkpoint.resolve_model(named)
        except UserError:
            pass
    raise UserError(f"The adapter's base model {named!r} (base_model_name_or_path in {config}) is neither a local "
                    "folder nor in the local Hugging Face cache, and unsloth_nb does not download models. Fix: pass "
                    "the base model folder with --base (base=...), the model the adapter was trained on.")


def choose_alpha(adapter: checkpoint.Adapter, targets: Sequence[str]) -> tuple[float, dict[str, float]]:
    """The adapter.lora.alpha to write and each target's lora_b factor, so that llama.cpp's alpha / r times the
    factor is peft's scale for every module. The effective alpha of a module is its scale times its rank; the one
    most modules share is written (for a plain adapter the config's lora_alpha: every factor is 1)."""
    configured = float(adapter.config.get("lora_alpha", 8))
    wanted = {}
    for target in targets:
        pair = adapter.pairs[target]
        effective = pair.scaling * adapter.tensors[pair.a].shape[0]
        wanted[target] = configured if math.isclose(effective, configured, rel_tol=1e-9) else effective
    alpha = Counter(wanted.values()).most_common(1)[0][0] if wanted else configured
    return alpha, {t: 1.0 if math.isclose(v, alpha, rel_tol=1e-9) else v / alpha for t, v in wanted.items()}


def file_order(adapter: checkpoint.Adapter, targets: Sequence[str]) -> list[str]:
    """Targets in the reference's order: by the first of their two tensors in the adapter file's data (the
    order safetensors loads a file in)."""
    first: dict[str, int] = {}
    for target in targets:
        pair = adapter.pairs[target]
        first[target] = min(adapter.tensors[pair.a].start, adapter.tensors[pair.b].start)
    return sorted(targets, key=first.__getitem__)


def invocation_tokens(adapter: checkpoint.Adapter, base_dir: Path) -> tuple[int, ...]:
    """An activated LoRA's invocation tokens: alora_invocation_tokens, or the tokens of invocation_string without
    the tokenizer's first (older aLoRAs were trained to start after it, as the reference reads them)."""
    tokens: Any = adapter.config.get("alora_invocation_tokens")
    text = adapter.config.get("invocation_string")
    if not tokens and isinstance(text, str) and text:
        from transformers import AutoTokenizer

        tokens = AutoTokenizer.from_pretrained(base_dir)(text)["input_ids"][1:]
    if not tokens:
        return ()
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32
                                               for t in tokens):
        raise UserError(f"{adapter.path / 'adapter_config.json'}: alora_invocation_tokens must be a list of token "
                        f"ids, not {tokens!r}. Fix: re-save the adapter with peft's save_pretrained.")
    return tuple(tokens)


def tensor_type(method: recipes.Method, shape: Sequence[int]) -> T:
    """A factor's type: the method's, or F16 for a row the method's blocks cannot hold (the reference's fallback)."""
    qtype = method.base_type
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


def resolve_methods(methods: str | Sequence[str | recipes.Method]) -> list[recipes.Method]:
    """The requested methods (a list, or one comma-separated string), deduplicated; anything but f32, f16, bf16
    and q8_0 is a UserError."""
    if isinstance(methods, str):
        methods = [m for m in (part.strip() for part in methods.split(",")) if m]
    if not methods:
        raise UserError("No GGUF method given. Fix: pass at least one, e.g. --quant f16.")
    resolved = [recipes.resolve(m) if isinstance(m, str) else m for m in methods]
    bad = [m.name for m in resolved if m.name not in LORA_METHODS]
    if bad:
        raise UserError(f"A LoRA GGUF is written as f32, f16, bf16 or q8_0 (llama.cpp applies the factors as they "
                        f"are stored), not {', '.join(bad)}. Fix: use f16 (the base GGUF can still be any "
                        "quantization), or fuse the adapter into a quantized model with `python -m unsloth_nb gguf "
                        "BASE --adapter ADAPTER`.")
    return list({m.name: m for m in resolved}.values())


# ------------------------------------------------------------------------------------------- the files


def header_writer(plan: AdapterPlan, method: recipes.Method) -> tuple[gguf.GGUFWriter, list[T]]:
    """A GGUFWriter with every tensor info and key/value of the method's file, in the reference's order, and the
    type of every tensor."""
    types = [tensor_type(method, t.shape) for t in plan.tensors]
    w = gguf.GGUFWriter(None, plan.arch.name)
    for t, qtype in zip(plan.tensors, types, strict=True):
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), layout.nbytes(t.shape, qtype), raw_dtype=qtype)
    total, *_ = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, plan.adapter.path, None, total)
    generation = gguf.Metadata.load_generation_config(plan.adapter.path)
    if "penalty_repeat" not in generation and "repetition_penalty" in generation:
        meta.sampling_penalty_repeat = generation["repetition_penalty"]  # newer gguf-py reads both
    if meta.name is None:
        meta.name = plan.base_dir.name
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    meta.set_gguf_meta_model(w)
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
    if plan.invocation_tokens:
        w.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, list(plan.invocation_tokens),
                        gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return w, types


def convert_adapter(adapter_dir: str | os.PathLike[str], methods: str | Sequence[str | recipes.Method],
                    out_dir: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
                    overwrite: bool = False, progress: bool = True) -> list[ConvertResult]:
    """Write ``out_dir/<adapter folder name>.<METHOD>.gguf`` (e.g. ``adapter.F16.gguf``) for every method, a LoRA
    GGUF to load on top of the base's GGUF (llama.cpp ``--lora``, ``llama_cpp.Llama(lora_path=...)``).

    ``base`` is the base model folder, needed when the adapter's base_model_name_or_path is not a local folder
    (or cached Hub id). Files appear as ``convert`` writes them: under a temporary name, read back and checked,
    recorded in the folder's manifest, then renamed; a re-run keeps files complete for the same inputs, and a file
    of the same name unsloth_nb did not write is refused unless ``overwrite``."""
    resolved = resolve_methods(methods)
    plan = adapter_tensors(adapter_dir, base)
    out = Path(out_dir).expanduser()
    created = output.check_out_dir(out)
    try:
        return _write_all(plan, resolved, out, overwrite, progress)
    except BaseException:
        output.remove_if_empty(out, created)
        raise


def file_layout(plan: AdapterPlan, method: recipes.Method,
                file_name: str) -> tuple[list[T], list[bytes], layout.GGUFLayout]:
    """One method's file before it is written: every tensor's type, the serialized header, the exact layout."""
    w, types = header_writer(plan, method)
    heads = layout.serialize(w)
    placed = [(t.name, t.shape, qtype, 0) for t, qtype in zip(plan.tensors, types, strict=True)]
    return types, heads, layout.measure(method.name, [file_name], placed, heads)


def _write_all(plan: AdapterPlan, methods: list[recipes.Method], out: Path, overwrite: bool,
               progress: bool) -> list[ConvertResult]:
    """The files of every method not already complete for these inputs, written in one pass over the tensors."""
    started = time.perf_counter()
    finals = [out / f"{plan.name}.{m.label}.gguf" for m in methods]
    files_in = plan.input_files()
    inputs = [manifest.fingerprint(files_in, method=m.name, kind="lora", base=str(plan.base_dir.resolve()))
              for m in methods]
    done = output.reusable([[f] for f in finals], inputs, out, overwrite)
    todo = [i for i in range(len(methods)) if not done[i]]
    if todo:
        files = {i: file_layout(plan, methods[i], finals[i].name) for i in todo}
        temps = {i: output.temporary(finals[i]) for i in todo}
        output.remove_stale(out, [finals[i] for i in todo])
        need = sum(files[i][2].size for i in todo)
        output.check_space(out, need)
        free_before = shutil.disk_usage(out).free
        try:
            digests = _write(plan, [files[i][0] for i in todo], [files[i][1] for i in todo],
                             [temps[i] for i in todo], progress)
            for i, digest in zip(todo, digests, strict=True):
                output.commit(out, [finals[i]], [temps[i]], files[i][2], files[i][1], digest, inputs[i])
        except OSError as exc:
            raise output.write_error(exc, out, need, free_before) from exc
        finally:
            for temp in temps.values():
                temp.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    return [ConvertResult(m.name, f, f.stat().st_size, 0.0 if done[i] else seconds, len(plan.tensors), (f,),
                          reused=done[i]) for i, (m, f) in enumerate(zip(methods, finals, strict=True))]


def _write(plan: AdapterPlan, types: list[list[T]], heads: list[list[bytes]], temps: list[Path],
           progress: bool) -> list[list[str]]:
    """Every file's header, then each tensor loaded once and encoded for every file; the files' sha256."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.tensors), unit="tensor", desc=f"LoRA GGUF {plan.name}", leave=False)
    files = output.Files([[t] for t in temps], heads)
    try:
        for j, t in enumerate(plan.tensors):
            x = plan.data(t)
            files.begin_tensor([0] * len(temps))
            for k, file_types in enumerate(types):
                data = np.ascontiguousarray(quants.encode(x, file_types[j], "cpu"))
                files.write(k, 0, memoryview(data).cast("B"))
            if bar is not None:
                bar.update(1)
        return files.close()
    finally:
        if bar is not None:
            bar.close()
        files.abort()


def gguf_problems(base: header.Header, tensors: Sequence[tuple[str, tuple[int, ...]]]) -> list[str]:
    """Why llama.cpp would refuse LoRA tensors (GGUF name, torch-order shape) over the base GGUF ``base``, in
    the words of its checks (llama-adapter.cpp ``llama_adapter_lora_init_impl``): every name a base tensor's
    plus ``.lora_a``/``.lora_b``, both halves present, A (r, in) and B (out, r) of its shape (out, in); for the
    token embeddings A is (vocab, r) and B (dim, r)."""
    shapes = {t.name: t.shape for t in base.tensors}
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    problems = []
    for name, shape in tensors:
        if name.endswith(("lora_a", "lora_b")):
            pairs.setdefault(name[:-7], {})[name[-1]] = tuple(shape)
        elif not name.endswith("_norm.weight"):  # llama.cpp skips norm vectors
            problems.append(f"tensor {name} is not a LoRA factor (.lora_a/.lora_b)")
    for target, pair in pairs.items():
        a, b = pair.get("a"), pair.get("b")
        if a is None or b is None:
            problems.append(f"the LoRA pair of {target} lacks its {'lora_a' if a is None else 'lora_b'}")
        elif target not in shapes:
            problems.append(f"it changes {target}, which the base GGUF does not have")
        elif len(a) != 2 or len(b) != 2 or len(shapes[target]) != 2:
            problems.append(f"the factors of {target} are not matrices ({a}, {b})")
        elif target.endswith("token_embd.weight"):
            if (a[0], b[0]) != shapes[target]:
                problems.append(f"the factors of {target} ({a}, {b}) do not fit its shape {shapes[target]}")
        elif (b[0], a[1]) != shapes[target] or a[0] != b[1]:
            problems.append(f"the factors of {target} ({a}, {b}) do not fit its shape {shapes[target]}")
    return problems


def check_gguf(adapter_gguf: str | os.PathLike[str], base_gguf: str | os.PathLike[str],
                       name: str | None = None) -> None:
    """Refuse a LoRA GGUF that llama.cpp would not load over ``base_gguf`` (it would fail only on the adapter's
    first request): not an adapter GGUF (``general.type``, ``adapter.type``), another architecture, or factors
    that do not fit the base's tensors (:func:`gguf_problems`)."""
    path = Path(adapter_gguf).expanduser()
    head, base = header.require(path), header.require(base_gguf)
    label = f"The adapter {name!r} ({path})" if name else f"The LoRA GGUF {path}"
    fix = (f"Fix: pass the LoRA GGUF made for the base of {Path(base_gguf).name} (`python -m unsloth_nb gguf "
           "ADAPTER_DIR --quant f16 --out DIR --base BASE_HF_DIR`, or give the adapter folder with --base), or the "
           "base GGUF the adapter was trained on.")
    kind, lora_kind = head.values.get("general.type"), head.values.get("adapter.type")
    if kind != "adapter" or lora_kind != "lora":
        raise UserError(f"{label} is not a LoRA adapter GGUF (general.type {kind!r}, adapter.type {lora_kind!r}); "
                        "llama.cpp loads only 'adapter'/'lora' files over a base. Fix: pass a LoRA GGUF (`python -m "
                        "unsloth_nb gguf ADAPTER_DIR --quant f16 --out DIR`), or serve a model GGUF on its own.")
    arch, base_arch = head.values.get("general.architecture"), base.values.get("general.architecture")
    if arch != base_arch:
        raise UserError(f"{label} is for a {arch!r} model, but the base GGUF {Path(base_gguf).name} is "
                        f"{base_arch!r}. {fix}")
    if not isinstance(head.values.get("adapter.lora.alpha"), int | float):
        raise UserError(f"{label} has no adapter.lora.alpha, which llama.cpp needs. {fix}")
    problems = gguf_problems(base, [(t.name, t.shape) for t in head.tensors])
    if problems:
        raise UserError(f"{label} does not fit the base GGUF {Path(base_gguf).name}: {'; '.join(problems[:3])}. "
                        f"{fix}")
