"""HF folder -> GGUF: unsloth_nb's native writer vs llama.cpp's tools, same machine, same run.

bf16 and q8_0: native vs llama.cpp's ``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist).
q4_k_m: native one pass vs llama.cpp's two steps (converter to bf16, then ``llama_model_quantize`` on all cores).
Each run is a fresh process; wall time and peak RSS are its own. Default model: the Llama-3.2-1B-shaped fixture.

Run: ``.venv/bin/python benchmarks/gguf_vs_llamacpp.py [--shape 1b|tiny] [--methods bf16,q8_0,q4_k_m]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Measurement, measure, measure_command  # noqa: E402

from unsloth_nb import fixtures  # noqa: E402
from unsloth_nb.gguf import llamacpp  # noqa: E402

NATIVE = """
from unsloth_nb.gguf import convert
convert.convert({model!r}, [{method!r}], {out!r}, progress=False, device="cpu")
"""

QUANTIZE = """
import llama_cpp, os
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = len(os.sched_getaffinity(0))
assert llama_cpp.llama_model_quantize({src!r}.encode(), {dst!r}.encode(), params) == 0
"""


def reference_convert(model: str, outtype: str, outfile: str) -> Measurement:
    tree = llamacpp.source_tree()
    return measure_command(f"llama.cpp convert_hf_to_gguf --outtype {outtype}",
                           [sys.executable, str(tree / "convert_hf_to_gguf.py"), model, "--outtype", outtype,
                            "--outfile", outfile], env={"PYTHONPATH": str(tree / "gguf-py")})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1b", choices=fixtures.SHAPES)
    parser.add_argument("--methods", default="bf16,q8_0,q4_k_m")
    args = parser.parse_args()
    model = str(fixtures.build_model("llama3", args.shape))
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    print(f"model: {model}; {len(os.sched_getaffinity(0))} CPU cores")
    lines = ["| method | llama.cpp | native | wall ratio (native / llama.cpp) | peak RSS llama.cpp | peak RSS native |",
             "| --- | --- | --- | --- | --- | --- |"]
    try:
        for method in args.methods.split(","):
            ours = measure(f"native {method}", NATIVE.format(model=model, method=method, out=str(work / "native")))
            if method in ("bf16", "q8_0", "f16"):
                ref = reference_convert(model, method, str(work / f"ref.{method}.gguf"))
                ref_seconds, ref_rss = ref.seconds, ref.peak_rss_mb
                how = "convert"
            else:
                step1 = reference_convert(model, "bf16", str(work / "ref.step1.bf16.gguf"))
                step2 = measure("llama_model_quantize Q4_K_M",
                                QUANTIZE.format(src=str(work / "ref.step1.bf16.gguf"), dst=str(work / "ref.q4.gguf")))
                ref_seconds, ref_rss = step1.seconds + step2.seconds, max(step1.peak_rss_mb, step2.peak_rss_mb)
                how = f"convert {step1.seconds:.1f} s + quantize {step2.seconds:.1f} s"
            lines.append(f"| {method} | {ref_seconds:.1f} s ({how}) | {ours.seconds:.1f} s | "
                         f"{ours.seconds / ref_seconds:.2f} | {ref_rss:.0f} MB | {ours.peak_rss_mb:.0f} MB |")
            for leftover in work.glob("*.gguf"):
                leftover.unlink()
            shutil.rmtree(work / "native", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
