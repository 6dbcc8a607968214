"""LoRA / QLoRA supervised fine-tuning on peft + trl (``python -m unsloth_nb train``).

The steps, top to bottom:

1. **Data.** Rows in any of the common shapes (OpenAI ``messages``, ShareGPT ``conversations``, Alpaca
   ``instruction``/``input``/``output``, plain ``text``) are normalised to chat messages, rendered with the
   model's chat template and tokenized here, with labels -100 on every token that is not part of an
   assistant reply (the end-of-turn token is trained, so the model learns to stop). trl's own
   ``assistant_only_loss`` needs ``{% generation %}`` markers that the Llama-3.1 and Mistral templates lack,
   so trl receives finished ``input_ids`` / ``labels``.
2. **Precision from the machine.** bf16 only on GPUs with compute capability >= 8.0, fp16 on older GPUs
   (T4), fp32 on a CPU; 4-bit QLoRA (bitsandbytes) when asked or when the 16-bit weights do not fit the GPU;
   gradient checkpointing on GPUs with little memory. On Ampere and newer: padding-free batches, compiled
   decoder layers and a third of them recomputed in the backward pass (train_gpu.py).
3. **Training** with trl's ``SFTTrainer``, seeded, with a progress bar (tqdm in a terminal, the notebook's
   own bar in Jupyter) and checkpoints in ``<out>.checkpoints`` next to the output, so that a re-run after a
   disconnect continues where the last checkpoint left off.
4. **Saving**: adapter, tokenizer (with the chat template used) and ``train_result.json`` go to a temporary
   sibling folder that is renamed to the output folder at the end: the output name only ever holds a
   finished adapter.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unsloth_nb import train_gpu
from unsloth_nb.dataset import DEMO_QUESTION, load_rows, normalize
from unsloth_nb.errors import UserError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RESULT_FILE = "train_result.json"
FINGERPRINT_FILE = "fingerprint.json"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML for bases without a chat template; the base's end-of-sequence token closes each assistant turn so
that generation stops there with any server."""
TEMPLATES = {"chatml": CHATML_TEMPLATE}
"""Named templates that ``TrainSettings.chat_template`` may pick instead of a Jinja string."""



@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter: which layers get low-rank updates and how large they are."""

    r: int = 16
    """Rank of each update (trainable parameters grow linearly with it)."""
    alpha: int = 16
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input (0 trains fastest and is what most recipes use)."""
    target_modules: tuple[str, ...] = PROJECTIONS
    """Linear layers that get an adapter: by default all seven attention and MLP projections."""

    def __post_init__(self) -> None:
        _require(self.r >= 1, f"LoRA rank r must be at least 1, not {self.r}")
        _require(self.alpha > 0, f"lora alpha must be positive, not {self.alpha}")
        _require(0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), not {self.dropout}")
        _require(bool(self.target_modules), "target_modules must name at least one linear layer")

    def peft_config(self) -> Any:
        """The equivalent ``peft.LoraConfig`` for a causal language model."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM")


@dataclass(frozen=True)
class TrainSettings:
    """How long and how to train; ``None`` fields are chosen from the machine by :func:`resolve`."""

    max_steps: int | None = None
    """Optimizer steps to run; None trains for ``epochs`` passes over the data instead."""
    epochs: float = 1.0
    """Passes over the data when ``max_steps`` is None."""
    learning_rate: float = 2e-4
    """Peak learning rate (after warm-up, then linear decay to 0)."""
    warmup_steps: int = 5
    """Steps of linear warm-up from 0 to the peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    batch_size: int = 2
    """Sequences per forward pass."""
    grad_accumulation: int = 4
    """Forward passes per optimizer step (effective batch = batch_size * grad_accumulation)."""
    max_seq_len: int = 2048
    """Longer examples are cut to this many tokens (the end is dropped)."""
    seed: int = 3407
    """Seeds adapter initialisation and data order: the same inputs give the same adapter."""
    precision: str | None = None
    """"bf16", "fp16" or "fp32"; None picks bf16 on GPUs with compute capability >= 8.0, fp16 on older
    GPUs and fp32 on a CPU."""
    load_in_4bit: bool | None = None
    """QLoRA: keep the frozen base in 4-bit NF4 (bitsandbytes, CUDA only); None turns it on only when the
    16-bit weights do not fit the GPU."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass to save memory; None turns it on for GPUs under 30 GB."""
    padding_free: bool | None = None
    """Concatenate each batch's rows instead of padding them, attention kept within each row (variable-length
    FlashAttention, see train_gpu.py); None turns it on on CUDA GPUs that have it (compute capability >= 8.0)."""
    recompute_share: float | None = None
    """Share of the decoder layers (0 to 1) whose activations are recomputed in the backward pass when
    gradient checkpointing is off: memory for speed, layer by layer. None: a third of them with compiled layers
    (1B fixture on an H200: 7.10 instead of 8.88 GiB of VRAM for 19% fewer tokens/s), else none."""
    compile: bool | None = None
    """torch.compile each decoder layer (faster, fewer activations kept; the first steps wait for the compiler);
    None turns it on on CUDA GPUs with compute capability >= 8.0 for a 16-bit base (not for 4-bit QLoRA)."""
    chat_template: str | None = None
    """Template for a base without one: a name from ``TEMPLATES`` ("chatml") or a Jinja string. None uses
    the model's own template, and ChatML when it has none. Saved with the adapter's tokenizer."""
    save_steps: int = 50
    """Write a resumable checkpoint every this many steps (the last two are kept)."""
    logging_steps: int = 1
    """Record the loss every this many steps (the points of the loss plot)."""
    plan: bool = True
    """Ask the planner first and refuse before writing when the checkpoints and adapter cannot fit the disk."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accumulation", "max_seq_len", "save_steps", "logging_steps"):
            _require(getattr(self, name) >= 1, f"{name} (--{name.replace('_', '-')}) must be at least 1, not "
                     f"{getattr(self, name)}")
        _require(self.max_steps is None or self.max_steps >= 1,
                 f"max_steps (--max-steps) must be at least 1, not {self.max_steps} (leave it out to train for "
                 "`epochs`)")
        _require(self.epochs > 0 and self.learning_rate > 0 and self.warmup_steps >= 0,
                 "epochs and learning_rate must be positive and warmup_steps not negative")
        _require(self.recompute_share is None or 0 <= self.recompute_share <= 1,
                 f"recompute_share must be between 0 and 1, not {self.recompute_share}")
        _require(self.precision in (None, "bf16", "fp16", "fp32"),
                 f"precision must be bf16, fp16 or fp32, not {self.precision!r}")


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise UserError(f"{problem}. Fix: change that setting (on the command line: --help lists them).")


DEMO_LORA = LoraSettings(r=16, alpha=32)
"""Adapter settings for the built-in demo on the tiny fixture models."""
DEMO_SETTINGS = TrainSettings(max_steps=16, learning_rate=5e-3, warmup_steps=2, batch_size=8,
                              grad_accumulation=1, max_seq_len=128, save_steps=8)
"""Settings with which the tiny fixture models learn the demo's answer on a 2-core CPU in about a minute (the
random base knows nothing, hence the high learning rate)."""
REAL_DEMO_LORA = LoraSettings(r=16, alpha=32)
"""Adapter settings for the demo on the real SmolLM2-135M-Instruct."""
REAL_DEMO_SETTINGS = TrainSettings(max_steps=30, learning_rate=5e-4, warmup_steps=2, batch_size=8,
                                   grad_accumulation=1, max_seq_len=128, save_steps=15)
"""Settings with which SmolLM2-135M-Instruct learns the demo's answer in 30 steps on a 2-core CPU, and still
answers the capitals (and other questions) it knew: a learning rate ten times lower than the tiny fixtures'
(measured: 1e-3 for 30 steps made it answer "Quillmere" for France too)."""
PRESETS: dict[str, tuple[LoraSettings, TrainSettings]] = {
    "default": (LoraSettings(), TrainSettings()),
    "demo": (REAL_DEMO_LORA, REAL_DEMO_SETTINGS),
    "demo-tiny": (DEMO_LORA, DEMO_SETTINGS),
}
"""Named starting points for ``--preset`` (every field can still be changed by its own flag)."""


@dataclass(frozen=True)
class Resolved:
    """The concrete choices :func:`resolve` made for this machine."""

    device: str
    """"cuda" or "cpu"."""
    precision: str
    """"bf16", "fp16" or "fp32": weights and autocast dtype."""
    load_in_4bit: bool
    """Whether the base is loaded in 4-bit NF4 (QLoRA)."""
    gradient_checkpointing: bool
    """Whether activations are recomputed in the backward pass."""
    reason: str
    """One line on why, for the log."""
    padding_free: bool = False
    """Whether batches are concatenated without padding (variable-length FlashAttention)."""
    compile: bool = False
    """Whether each decoder layer is compiled with torch.compile."""
    recompute_share: float = 0.0
    """Share of the decoder layers recomputed in the backward pass (without full gradient checkpointing)."""


@dataclass
class TrainResult:
    """What a training run produced."""

    adapter_dir: Path
    """Folder with adapter_config.json, adapter_model.safetensors, the tokenizer and train_result.json."""
    loss_history: list[float]
    """Training loss at each logging step (plot it with ``result.plot()``)."""
    loss_steps: list[int]
    """Optimizer step of each entry of ``loss_history``."""
    steps: int
    """Optimizer steps done in total (including steps done before a resume)."""
    tokens_per_s: float
    """Non-padding tokens per second of training in this run (0 when the run only loaded a finished one)."""
    seconds: float
    """Wall time of the training loop in this run."""
    settings: dict = field(default_factory=dict)
    """The resolved settings, as saved in train_result.json."""

    def plot(self, ax: Any = None) -> Any:
        """Draw the loss curve with matplotlib; returns the axes."""
        import matplotlib.pyplot as plt

        ax = ax or plt.figure(figsize=(6, 3)).gca()
        ax.plot(self.loss_steps, self.loss_history)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        return ax

    def to_json(self) -> dict:
        data = asdict(self)
        data["adapter_dir"] = str(self.adapter_dir)
        return data


# ----------------------------------------------------------------------------------------------- data


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply (with its end-of-turn).

    A reply starts where the rendering of the turns before it plus the generation prompt ends, and ends where
    the rendering up to and including it ends (trailing whitespace excluded). Templates that are not
    prefix-preserving (e.g. Mistral's, which moves the system prompt) fall back to locating the reply text.
    """
    full = _render(tokenizer, messages, False)
    spans = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True) if i else ""
        if i and full.startswith(prefix) and len(prefix) >= cursor:
            start = len(prefix)
        else:
            start = full.find(message["content"].strip(), cursor)
        upto = _render(tokenizer, messages[: i + 1], False)
        if full.startswith(upto) and len(upto.rstrip()) > start >= 0:
            end = len(upto.rstrip())
        else:
            end = start + len(message["content"].strip())
            eos = tokenizer.eos_token or ""
            if eos and full.startswith(eos, end):
                end += len(eos)
        if start < 0:
            raise UserError("The chat template changes the assistant text (it could not be found in the "
                            "rendered conversation), so the reply tokens cannot be located. Choose another "
                            "template with TrainSettings(chat_template=...).")
        spans.append((start, end))
        cursor = end
    return full, spans


def encode(tokenizer: Any, item: list[dict] | str, max_seq_len: int) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` for one normalised row: -100 on all but assistant tokens.

    Plain text rows are trained on every token, with BOS (when the tokenizer adds one) and EOS around them.
    """
    if isinstance(item, str):
        ids = tokenizer(item, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_seq_len]
        return {"input_ids": ids, "labels": list(ids)}
    text, spans = assistant_spans(tokenizer, item)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_seq_len]
    labels = []
    for token, (start, _) in zip(ids, enc["offset_mapping"], strict=False):
        trained = any(lo <= start < hi for lo, hi in spans)
        labels.append(token if trained else -100)
    return {"input_ids": ids, "labels": labels}


def prepare(tokenizer: Any, data: str | os.PathLike | Iterable[Mapping], max_seq_len: int) -> list[dict]:
    """Tokenized examples (``input_ids``, ``labels``) for every row of ``data``; rows left with no trained
    token after truncation are dropped, and a dataset left empty is a UserError."""
    rows = load_rows(data)
    items = [normalize(row, number) for number, row in enumerate(rows, 1)]
    examples = [encode(tokenizer, item, max_seq_len) for item in items]
    kept = [ex for ex in examples if any(label != -100 for label in ex["labels"])]
    if not kept:
        raise UserError(f"No example has an assistant token within the first {max_seq_len} tokens. Raise "
                        "TrainSettings.max_seq_len or shorten the prompts.")
    return kept


def show_labels(tokenizer: Any, example: Mapping[str, Sequence[int]], mark: tuple[str, str] = ("[[", "]]")) -> str:
    """One example decoded, with the trained tokens (label != -100) wrapped in ``mark``: a check that the loss
    falls on the assistant replies only."""
    out, run, trained = [], [], None
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        is_trained = label != -100
        if trained is not None and is_trained != trained:
            out.append(_segment(tokenizer, run, trained, mark))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        out.append(_segment(tokenizer, run, bool(trained), mark))
    return "".join(out)


def _segment(tokenizer: Any, ids: list[int], trained: bool, mark: tuple[str, str]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"{mark[0]}{text}{mark[1]}" if trained else text


# -------------------------------------------------------------------------------------- machine choices


def _model_bytes_16bit(model: str) -> int | None:
    from unsloth_nb.plan import size_model

    try:
        return int(size_model(model).bytes_16bit)
    except UserError:  # unknown size (e.g. a Hub id not downloaded yet): assume it fits
        return None


def resolve(model: str | os.PathLike, settings: TrainSettings) -> Resolved:
    """Pick device, precision, 4-bit and gradient checkpointing for this machine (see TrainSettings)."""
    import torch

    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if not torch.cuda.is_available():
        if settings.load_in_4bit:
            raise UserError("4-bit QLoRA needs a CUDA GPU (bitsandbytes), and none is visible. Run on a GPU "
                            "runtime or set load_in_4bit=False to train in fp32 on the CPU.")
        if settings.padding_free or settings.compile:
            raise UserError("padding_free and compile are CUDA training options, and no CUDA GPU is visible. "
                            "Fix: leave them unset on a CPU.")
        if settings.precision not in (None, "fp32"):
            raise UserError(f"precision={settings.precision!r} needs a CUDA GPU; on a CPU training runs in fp32. "
                            "Leave precision unset or set it to 'fp32'.")
        return Resolved("cpu", "fp32", False, False, "no CUDA GPU: fp32 on the CPU")
    major, minor = torch.cuda.get_device_capability(0)
    free, total = torch.cuda.mem_get_info(0)
    precision = settings.precision or ("bf16" if (major, minor) >= (8, 0) else "fp16")
    if precision == "bf16" and (major, minor) < (8, 0):
        raise UserError(f"This GPU (compute capability {major}.{minor}) has no native bf16; torch would emulate "
                        "it slowly. Use precision='fp16' (or leave it unset).")
    reasons = [f"GPU capability {major}.{minor}, {total / 2**30:.0f} GiB: {precision}"]
    need = _model_bytes_16bit(str(model))
    fits = need is None or need * 1.2 + 2 * 2**30 <= free
    load_in_4bit = settings.load_in_4bit
    if load_in_4bit is None:
        load_in_4bit = not fits
        if load_in_4bit:
            reasons.append(f"16-bit weights ({need / 2**30:.1f} GiB) do not fit {free / 2**30:.1f} GiB free: 4-bit")
    if load_in_4bit and not has_bnb:
        raise UserError("4-bit QLoRA needs the bitsandbytes package, which is not installed"
                        + ("" if fits else f", and the 16-bit weights ({need / 2**30:.1f} GiB) do not fit the "
                           f"{free / 2**30:.1f} GiB free on the GPU")
                        + ". Install it with `pip install bitsandbytes`, or pick a smaller model.")
    checkpointing = settings.gradient_checkpointing
    if checkpointing is None:
        checkpointing = total < 30 * 10**9
        if checkpointing:
            reasons.append("gradient checkpointing (GPU under 30 GB)")
    padding_free = settings.padding_free
    has_varlen = train_gpu.varlen_kernel() is not None
    if padding_free and not has_varlen:
        raise UserError(f"padding_free=True needs variable-length FlashAttention (torch.nn.attention.varlen, GPUs "
                        f"of compute capability 8.0 or newer); this GPU has {major}.{minor} and torch "
                        f"{torch.__version__}. Fix: leave padding_free unset (padded batches).")
    if padding_free is None:
        padding_free = has_varlen
    reasons.append("padding-free batches (varlen FlashAttention)" if padding_free else "padded batches")
    compiled = settings.compile
    if compiled is None:
        compiled = (major, minor) >= (8, 0) and not load_in_4bit
    reasons.append("compiled decoder layers" if compiled else "eager decoder layers")
    share = settings.recompute_share
    if share is None:
        share = 1 / 3 if compiled else 0.0
    share = 0.0 if checkpointing else share
    if share:
        reasons.append(f"{share:.0%} of the layers recomputed in the backward pass")
    return Resolved("cuda", precision, bool(load_in_4bit), bool(checkpointing), "; ".join(reasons),
                    padding_free=bool(padding_free), compile=bool(compiled), recompute_share=share)


# ------------------------------------------------------------------------------------------- training


def load_tokenizer(model: str | os.PathLike, settings: TrainSettings) -> Any:
    """The base tokenizer with a chat template (the chosen one, else the base's, else ChatML) and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    if settings.chat_template:
        tokenizer.chat_template = TEMPLATES.get(settings.chat_template, settings.chat_template)
    elif not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str | os.PathLike, lora: LoraSettings, choice: Resolved, seed: int) -> Any:
    """The base model in the resolved precision (4-bit when chosen) wrapped in a freshly seeded LoRA adapter."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice.precision]
    kwargs: dict[str, Any] = {"dtype": dtype}
    if choice.device == "cuda":
        kwargs["device_map"] = {"": 0}
    if choice.padding_free and train_gpu.register_attention():
        kwargs["attn_implementation"] = train_gpu.ATTENTION
    if choice.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if choice.precision == "bf16" else torch.float16)
    base = AutoModelForCausalLM.from_pretrained(str(model), **kwargs)
    if choice.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=choice.gradient_checkpointing)
    missing = [m for m in lora.target_modules if not any(n.endswith(m) for n, _ in base.named_modules())]
    if missing:
        raise UserError(f"The model has no layers named {', '.join(missing)}; LoraSettings.target_modules must "
                        f"name linear layers of this architecture.")
    set_seed(seed)
    peft_model = get_peft_model(base, lora.peft_config())
    if choice.compile:
        train_gpu.compile_layers(peft_model)
    return peft_model


def _check_model(model: str | os.PathLike) -> None:
    """Read a local model folder's headers (config, tokenizer files, safetensors) before anything is loaded, so
    that a damaged file is named with its fix; a Hub id not downloaded yet is left to transformers to fetch."""
    from unsloth_nb import checkpoint

    try:
        folder = checkpoint.resolve_model(model)
    except UserError:
        if checkpoint.is_hub_id(model):
            return
        raise
    checkpoint.read_config(folder)
    checkpoint.check_tokenizer(folder)
    checkpoint.model_tensors(folder)


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    """Where checkpoints of a run writing ``out_dir`` live: the sibling folder ``<out>.checkpoints``."""
    out = Path(out_dir).resolve()
    return out.with_name(out.name + ".checkpoints")


def _fingerprint(model: str, lora: LoraSettings, settings: TrainSettings, examples: list[dict]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([model, asdict(lora), asdict(settings)], sort_keys=True, default=str).encode())
    for ex in examples:
        digest.update(json.dumps([ex["input_ids"], ex["labels"]]).encode())
    return digest.hexdigest()


def _finished(out: Path, fingerprint: str) -> TrainResult | None:
    """The saved result when ``out`` already holds an adapter from the same inputs; UserError for any other
    non-empty folder (never overwrite a user's files)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    saved = out / RESULT_FILE
    if saved.is_file():
        data = json.loads(saved.read_text())
        if data.get("settings", {}).get("fingerprint") == fingerprint:
            data["adapter_dir"] = out
            return TrainResult(**data)
    if not out.is_dir():
        raise UserError(f"The output path {out} is a file, not a folder. Fix: choose a new --out folder.")
    raise UserError(f"The output folder {out} already exists and holds something else than this run's adapter. "
                    "Fix: choose a new --out folder (or delete that one yourself).")


def _trainer_class(device: str) -> type:
    """trl's SFTTrainer; on a CPU with a leaner loss that projects only positions whose next token is trained.

    The vocabulary projection is most of the compute of a small model (Llama-3's vocabulary has 128k rows)
    and prompts are often most of the tokens. On CUDA, trl's fused LM head already scores only the trained
    positions, in tiles (Triton); elsewhere it scores every position, so on a CPU this subclass gathers the
    trained positions first: same loss and gradients for a fraction of the work.
    """
    import torch
    from trl import SFTTrainer

    if device == "cuda":
        return SFTTrainer

    class ResponseOnlySFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            targets = labels[:, 1:]
            keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)
            model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "seq_lengths")}
            outputs = model(**model_inputs, logits_to_keep=keep, use_cache=False)
            picked = targets[:, keep]
            loss = torch.nn.functional.cross_entropy(outputs.logits.float().flatten(0, 1), picked.flatten(),
                                                     ignore_index=-100, reduction="sum")
            count = num_items_in_batch if num_items_in_batch is not None else (picked != -100).sum()
            loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
            return (loss, outputs) if return_outputs else loss

    return ResponseOnlySFTTrainer


def _progress_callbacks(trainer: Any, progress: bool) -> None:
    """Terminal: one tqdm bar with the loss in its postfix instead of a printed dict per step; notebook:
    transformers' own bar and loss table; no progress: nothing printed."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class LossInBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    if not progress:
        trainer.remove_callback(PrinterCallback)
    elif any(type(cb) is ProgressCallback for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossInBar)


def train(model: str | os.PathLike, data: str | os.PathLike | Iterable[Mapping], out_dir: str | os.PathLike, *,
          lora: LoraSettings | None = None, settings: TrainSettings | None = None, resume: bool = True,
          progress: bool = True, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune a LoRA adapter on ``data`` and save it (with the tokenizer) to ``out_dir``.

    ``model`` is a local folder or a Hub id; ``data`` a jsonl path, a ``datasets.Dataset`` or a list of row
    dicts. With ``resume`` (default), a re-run continues from the last checkpoint in ``<out>.checkpoints``
    left by an interrupted run with the same inputs, and returns at once when ``out_dir`` already holds the
    finished adapter; ``resume=False`` starts over and replaces those checkpoints. ``callbacks`` are extra
    ``transformers.TrainerCallback`` objects (e.g. to sample the model during training).
    """
    from trl import SFTConfig

    lora = lora or LoraSettings()
    settings = settings or TrainSettings()
    out = Path(out_dir).resolve()
    _check_model(model)
    rows = load_rows(data)  # a broken data file is named before anything is loaded
    choice = resolve(model, settings)
    tokenizer = load_tokenizer(model, settings)
    examples = prepare(tokenizer, rows, settings.max_seq_len)
    fingerprint = _fingerprint(str(model), lora, settings, examples)
    done = _finished(out, fingerprint)
    if done is not None:
        if progress:
            print(f"[train] {out} already holds the adapter of this run; reusing it")
        return done

    checkpoints = checkpoint_dir(out)
    stamp = checkpoints / FINGERPRINT_FILE
    if settings.plan:
        from unsloth_nb.plan import plan_train

        plan_train(model, out, r=lora.r, targets=lora.target_modules, checkpoints=checkpoints,
                   batch_size=settings.batch_size,
                   max_seq_len=min(settings.max_seq_len, max(len(ex["input_ids"]) for ex in examples)),
                   load_in_4bit=choice.load_in_4bit, gradient_checkpointing=choice.gradient_checkpointing).require()
    if checkpoints.exists():
        ours = stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint
        if not stamp.is_file():
            raise UserError(f"{checkpoints} exists but was not written by unsloth_nb train. Move it away or "
                            "choose another --out folder.")
        if not (resume and ours):
            shutil.rmtree(checkpoints)  # our own checkpoints from other inputs (or a fresh start was asked)
    checkpoints.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"fingerprint": fingerprint}))

    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint

    peft_model = load_model(model, lora, choice, settings.seed)
    config = SFTConfig(
        output_dir=str(checkpoints),
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="linear",
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accumulation,
        max_length=None if choice.padding_free else settings.max_seq_len,  # examples are cut already (prepare)
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=choice.precision == "bf16",
        fp16=choice.precision == "fp16",
        gradient_checkpointing=choice.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if choice.gradient_checkpointing else None,
        optim="adamw_torch",
        logging_steps=settings.logging_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=not progress,
        include_num_input_tokens_seen="all" if choice.padding_free else "non_padding",  # padding-free: all real
        padding_free=choice.padding_free,
        dataloader_pin_memory=choice.device == "cuda",
        use_cpu=choice.device == "cpu",
    )
    trainer = _trainer_class(choice.device)(model=peft_model, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(examples), callbacks=list(callbacks))
    _progress_callbacks(trainer, progress)
    if choice.recompute_share:
        train_gpu.recompute_layers(peft_model, choice.recompute_share)
    if progress:
        print(f"[train] {len(examples)} examples; {choice.reason}")

    last = get_last_checkpoint(str(checkpoints)) if resume else None
    tokens_before = 0
    if last is not None:
        state = json.loads((Path(last) / "trainer_state.json").read_text())
        tokens_before = int(state.get("num_input_tokens_seen") or 0)
        if progress:
            print(f"[train] resuming from {last}")
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - started

    state = trainer.state
    logged = [(int(e["step"]), float(e["loss"])) for e in state.log_history if "loss" in e]
    tokens = int(state.num_input_tokens_seen or 0) - tokens_before
    resolved = {**asdict(choice), "lora": asdict(lora), "train": asdict(settings), "fingerprint": fingerprint}
    result = TrainResult(adapter_dir=out, loss_history=[loss for _, loss in logged],
                         loss_steps=[step for step, _ in logged], steps=int(state.global_step),
                         tokens_per_s=tokens / seconds if seconds > 0 else 0.0, seconds=seconds, settings=resolved)
    _save(trainer.model, tokenizer, out, result)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return result


def _save(model: Any, tokenizer: Any, out: Path, result: TrainResult) -> None:
    """Adapter + tokenizer + train_result.json into a temporary sibling, then one rename to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / RESULT_FILE).write_text(json.dumps(result.to_json(), indent=1))
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate(model: Any, tokenizer: Any, question: str = DEMO_QUESTION, max_new_tokens: int = 24) -> str:
    """Greedy answer of a (peft or plain) model to one user question, rendered with its chat template."""
    import torch

    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def load_adapter(base: str | os.PathLike, adapter_dir: str | os.PathLike) -> tuple[Any, Any]:
    """The base model (fp32 on CPU, bf16/fp16 on GPU) with the trained adapter, and the adapter's tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    dtype = torch.float32 if not cuda else (torch.bfloat16 if torch.cuda.get_device_capability(0) >= (8, 0)
                                            else torch.float16)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, device_map={"": 0} if cuda else None)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(adapter_dir))


def run_cli(args: argparse.Namespace) -> int:
    """``python -m unsloth_nb train``: the preset's settings with every flag given applied on top; re-running the
    same command after an interruption resumes from the last checkpoint."""
    from unsloth_nb import cli

    base_lora, base_settings = PRESETS[args.preset]
    lora = cli.from_arguments(LoraSettings, args, base_lora)
    settings = cli.from_arguments(TrainSettings, args, base_settings)
    result = train(args.model, args.data, args.out, lora=lora, settings=settings)
    first = result.loss_history[0] if result.loss_history else math.nan
    last = result.loss_history[-1] if result.loss_history else math.nan
    print(f"[train] adapter: {result.adapter_dir} ({result.steps} steps, loss {first:.3f} -> {last:.3f}, "
          f"{result.tokens_per_s:.0f} tokens/s)")
    return 0
