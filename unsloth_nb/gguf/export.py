"""``python -m unsloth_nb gguf INPUT --quant ... --out DIR``: the one command for every kind of GGUF export.

What the input is says what is written: an HF model folder (``convert``, with ``--adapter`` fused in), a 16/32-bit
GGUF (``requantize``), or a LoRA adapter folder (``lora``: an adapter GGUF for llama.cpp's ``--lora`` and Ollama's
``ADAPTER``). This module only chooses; the stages below it never import it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unsloth_nb import checkpoint, runtime
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import convert, lora, output, requantize


def run_cli(args: argparse.Namespace) -> int:
    """``python -m unsloth_nb gguf MODEL_DIR --quant q8_0,bf16 --out DIR``: one line per file written."""
    methods = [m for m in (s.strip() for s in args.quant.split(",")) if m]
    split = (runtime.parse_size(args.split_max_size, "--split-max-size")
             if getattr(args, "split_max_size", None) else None)
    imatrix = getattr(args, "imatrix", None)
    if checkpoint.is_adapter(Path(args.model)):
        if imatrix:
            raise UserError(f"{args.model} is a LoRA adapter: its GGUF is written in 16 bits or Q8_0, which use no "
                            "importance matrix. Fix: drop --imatrix (it is for quantizing a model folder or GGUF).")
        if args.adapter or split or getattr(args, "backend", "native") != "native":
            raise UserError(f"{args.model} is a LoRA adapter, written as an adapter GGUF as it is: --adapter, "
                            "--split-max-size and --backend apply to model folders only. Fix: drop them (or pass "
                            "the base model with --adapter to write a fused GGUF instead).")
        results = lora.convert_adapter(args.model, methods, args.out, base=getattr(args, "base", None),
                                       overwrite=getattr(args, "overwrite", False), progress=sys.stderr.isatty())
    elif Path(args.model).suffix == ".gguf" and Path(args.model).is_file():
        if args.adapter or split or getattr(args, "backend", "native") != "native":
            raise UserError("A GGUF source is re-quantized as it is: --adapter, --split-max-size and --backend "
                            "apply to HF folders only. Fix: drop them, or convert the HF folder instead.")
        results = requantize.requantize(args.model, methods, args.out, device=args.device, imatrix=imatrix,
                                        progress=sys.stderr.isatty(), overwrite=getattr(args, "overwrite", False))
    elif getattr(args, "backend", "native") == "llama.cpp":
        if args.adapter or split or imatrix:
            raise UserError("--adapter, --split-max-size and --imatrix work only with the native backend. Fix: "
                            "drop --backend llama.cpp, or merge first and convert the merged folder.")
        results = convert.convert_with_llamacpp(args.model, methods, args.out)
    else:
        results = convert.convert(args.model, methods, args.out, adapter=args.adapter, device=args.device,
                                  split_max_size=split, progress=sys.stderr.isatty(), imatrix=imatrix,
                                  overwrite=getattr(args, "overwrite", False))
    for r in results:
        for path in r.shards or (r.path,):
            took = "complete from an earlier run, kept" if r.reused else f"{r.seconds:.1f} s"
            print(f"{path}  {output.human(path.stat().st_size)}  {took}")
    return 0
