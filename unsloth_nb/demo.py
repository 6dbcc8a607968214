"""The offline demo (``python -m unsloth_nb demo``): the pipeline end to end on a built-in tiny model.

It writes only into its own folder (default ``./unsloth_nb_demo``) and reuses finished steps on a re-run.
Until every stage is built, it runs the stages that exist and says which ones it skipped.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import time
from pathlib import Path

from unsloth_nb import fixtures


def _available(module: str, attribute: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), attribute)
    except ModuleNotFoundError:
        return False


def run_cli(args: argparse.Namespace) -> int:
    folder = Path(args.dir).resolve()
    if args.fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    model = fixtures.build_model("llama3")
    print(f"[fixture] tiny Llama-3 model with the real Llama-3 tokenizer: {model}")

    if _available("unsloth_nb.runtime", "detect"):
        from unsloth_nb import runtime

        print(runtime.detect())

    if _available("unsloth_nb.gguf.convert", "convert"):
        from unsloth_nb.gguf import convert

        for result in convert.convert(model, ["bf16", "q8_0"], folder / "gguf"):
            print(f"[gguf] {result}")
    else:
        print("[gguf] skipped: the converter is not built yet")

    print(f"demo finished in {time.perf_counter() - started:.1f} s; outputs in {folder}")
    return 0
