"""The command line: the same steps as the notebooks (``python -m unsloth_nb --help``).

Each subcommand is handled by ``run_cli(args) -> int`` in the module of its stage. Exit status: 0 on
success, 1 with a one-paragraph reason on bad input or a plan that cannot fit, 2 for usage errors
(and for a step whose module is not built yet).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from unsloth_nb.errors import UserError

# command -> (module that implements it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("unsloth_nb.plan", "print what each step needs (RAM, disk) and where outputs go; exit 1 if it cannot fit"),
    "train": ("unsloth_nb.train", "LoRA / QLoRA fine-tune on a jsonl dataset (peft + trl)"),
    "merge": ("unsloth_nb.merge", "streaming merge of a LoRA adapter into the 16-bit base"),
    "gguf": ("unsloth_nb.gguf.export", "write GGUF files (16-bit, q8_0, K-quants, IQ4) from an HF folder, a 16-bit "
             "GGUF or a LoRA adapter"),
    "imatrix": ("unsloth_nb.gguf.imatrix", "importance matrix from your data (PyTorch), for gguf --imatrix"),
    "serve": ("unsloth_nb.serve", "start an OpenAI-compatible server (vLLM or llama.cpp)"),
    "verify": ("unsloth_nb.verify", "check that exported artifacts still behave like the fine-tune"),
    "demo": ("unsloth_nb.demo", "offline end to end on a real chat model (SmolLM2-135M-Instruct from PyPI)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unsloth_nb",
        description="From a fine-tune to a served model: train -> merge -> GGUF -> serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plan", help=COMMANDS["plan"][1])
    p.add_argument("model", metavar="MODEL", help="model folder or Hub id")
    p.add_argument("--quant", default="q4_k_m", help="comma-separated GGUF methods, e.g. q4_k_m,q8_0")
    p.add_argument("--out", default=None, help="output folder (default: chosen by the plan)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (plans merge / fused GGUF)")

    from unsloth_nb import cli, merge, runtime, train

    p = sub.add_parser("train", help=COMMANDS["train"][1])
    p.add_argument("--model", required=True, help="base model folder or Hub id")
    p.add_argument("--data", required=True, help="dataset: .jsonl (or .json, .csv, .parquet, .txt)")
    p.add_argument("--out", required=True, help="adapter output folder")
    p.add_argument("--preset", choices=sorted(train.PRESETS), default="default",
                   help="starting settings: default, demo (the real demo model), demo-tiny (the tiny fixtures)")
    cli.add_arguments(p, train.TrainSettings)
    cli.add_arguments(p, train.LoraSettings)

    p = sub.add_parser("merge", help=COMMANDS["merge"][1])
    p.add_argument("--base", required=True, help="base model folder or Hub id")
    p.add_argument("--adapter", required=True, help="LoRA adapter folder")
    p.add_argument("--out", required=True, help="merged model output folder")
    cli.add_arguments(p, merge.MergeSettings,
                      types={"max_shard_size": lambda text: runtime.parse_size(text, "--max-shard-size")})

    p = sub.add_parser("gguf", help=COMMANDS["gguf"][1])
    p.add_argument("model", metavar="MODEL_DIR",
                   help="HF model folder (safetensors + config.json), an f16/bf16/f32 .gguf to re-quantize, or a LoRA "
                        "adapter folder (f16/bf16/f32/q8_0 adapter GGUF for llama.cpp --lora and Ollama ADAPTER)")
    p.add_argument("--quant", required=True, help="comma-separated methods, e.g. q4_k_m,q8_0,bf16")
    p.add_argument("--out", required=True, help="output folder for DIR/<name>.<QUANT>.gguf")
    p.add_argument("--adapter", default=None, help="LoRA adapter: fuse it while converting (no merged copy)")
    p.add_argument("--base", default=None,
                   help="when MODEL_DIR is a LoRA adapter folder (written as an adapter GGUF): its base model folder, "
                        "where adapter_config.json's base is not a local folder")
    p.add_argument("--imatrix", default=None, metavar="FILE",
                   help="importance matrix (from the imatrix command, or llama-imatrix's .gguf/.dat) weighting the "
                        "quantizers as llama-quantize --imatrix does")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to quantize (default: cuda if present)")
    p.add_argument("--backend", choices=["native", "llama.cpp"], default="native", help="writer to use")
    p.add_argument("--split-max-size", default=None, help="split files larger than this (e.g. 2G)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace same-named files that unsloth_nb did not write (never done unasked)")

    from unsloth_nb.gguf import imatrix

    imatrix.add_arguments(sub.add_parser("imatrix", help=COMMANDS["imatrix"][1]))

    p = sub.add_parser("serve", help=COMMANDS["serve"][1])
    p.add_argument("model", metavar="MODEL_DIR_OR_GGUF",
                   help="merged folder or .gguf file (the base, with --adapter)")
    p.add_argument("--engine", choices=["vllm", "llama.cpp"], default=None,
                   help="default: vllm for folders, llama.cpp for GGUF")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--api-key", default=None, help="require this key from clients (Authorization: Bearer KEY)")
    p.add_argument("--tokenizer", default=None,
                   help="merged HF folder for tokenizer and config (vLLM serving a GGUF on CUDA; experimental)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter over MODEL as model NAME (repeatable): an adapter folder (vLLM, "
                        "llama.cpp) or a LoRA .gguf (llama.cpp); no merged copy")
    p.add_argument("--base", default=None, metavar="BASE_HF_DIR",
                   help="llama.cpp with adapter folders: the base's HF folder they are converted with, where "
                        "adapter_config.json's base is not a local folder")

    p = sub.add_parser("verify", help=COMMANDS["verify"][1])
    p.add_argument("model", metavar="MODEL_DIR", help="reference: the base (with --adapter) or a merged folder")
    p.add_argument("artifacts", metavar="ARTIFACT", nargs="+", help="merged folders and/or .gguf files to check")
    p.add_argument("--adapter", default=None, help="LoRA adapter applied to MODEL_DIR for the reference")

    p = sub.add_parser("demo", help=COMMANDS["demo"][1])
    p.add_argument("--dir", default="unsloth_nb_demo", help="folder the demo writes into")
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing finished steps")
    p.add_argument("--tiny", action="store_true", help="run on the tiny random fixture instead of the real model")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UserError as exc:  # a flag's value that its parser refused with the fix (sizes, settings)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command is None:
        parser.print_help()
        return 2
    module_name, _ = COMMANDS[args.command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        module = None
    handler = getattr(module, "run_cli", None)
    if handler is None:
        print(f"`{args.command}` is not built yet in this version of unsloth_nb.", file=sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was left under a final name; re-run to continue.", file=sys.stderr)
        return 130
    except Exception:
        print(BUG_HEADER, file=sys.stderr)
        raise


BUG_HEADER = ("This is a bug in unsloth_nb, not a problem with your files: please report it with the traceback "
              "below at https://github.com/unsloth-nb/unsloth_nb/issues")
"""Printed above the traceback of anything but a UserError: our own bugs keep their traceback."""


if __name__ == "__main__":
    sys.exit(main())
