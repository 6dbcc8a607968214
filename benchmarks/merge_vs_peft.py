"""Streaming merge vs peft (load, merge_and_unload, save_pretrained) on the Llama-3.2-1B-shaped fixture.

Run: ``.venv/bin/python benchmarks/merge_vs_peft.py`` (CPU; each side in its own fresh process).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MAKE_ADAPTER, measure, table  # noqa: E402

from unsloth_nb import fixtures  # noqa: E402

PEFT = """
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, {adapter!r}).merge_and_unload()
merged.save_pretrained({out!r})
"""

OURS = """
from unsloth_nb.merge import MergeSettings, merge
merge({base!r}, {adapter!r}, {out!r}, MergeSettings(progress=False))
"""


def main() -> None:
    base = str(fixtures.build_model("llama3", "1b"))
    work = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        adapter = str(work / "adapter")
        measure("make adapter", MAKE_ADAPTER.format(base=base, adapter=adapter))
        env = {"CUDA_VISIBLE_DEVICES": ""}
        reference = measure("peft merge_and_unload + save_pretrained",
                            PEFT.format(base=base, adapter=adapter, out=str(work / "peft")), env)
        ours = measure("unsloth_nb streaming merge", OURS.format(base=base, adapter=adapter, out=str(work / "ours")),
                       env)
        print(table("LoRA merge, Llama-3.2-1B shape, rank 16 on all projections (CPU)", [reference, ours],
                    reference, ours))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
