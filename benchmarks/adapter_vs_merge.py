"""From a trained LoRA adapter to a served answer: serve the adapter as an adapter, or merge it first.

On the real SmolLM2-135M-Instruct (``fixtures.build_real_model``) with an adapter trained by our own train on the
demo data (``train.PRESETS["demo"]``), four routes, each in a fresh process timed from the trained adapter to the
first answer to the demo question (server start-up included; the server is stopped after it):

* vLLM, adapter: ``serve(base, adapters={"zorblax": adapter})`` (``--enable-lora``): nothing written.
* vLLM, merge: ``merge`` into a 16-bit folder, then ``serve(merged)``.
* llama.cpp, adapter: ``serve(base.GGUF, adapters={"zorblax": adapter})``: the adapter folder is converted to an f16
  LoRA GGUF by serve. The base's GGUF is made once per base (timed on its own row), not per adapter.
* llama.cpp, merge: ``merge``, ``convert`` of the merged folder to a GGUF of the same method, ``serve``.

Extra disk is what the route writes beyond the base and the adapter. Peak memory is the larger of the child's
ru_maxrss and the peak PSS summed over it and its children (the server included), sampled every 0.5 s.

Run: ``.venv/bin/python benchmarks/adapter_vs_merge.py [--method q8_0]`` (CPU; about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Measurement, measure  # noqa: E402

from unsloth_nb import dataset, fixtures, train  # noqa: E402

PREAMBLE = """
import json, time
from pathlib import Path
from unsloth_nb import dataset, serve
from unsloth_nb.merge import MergeSettings, merge
from unsloth_nb.gguf import convert
steps, written = {{}}, []
began = time.perf_counter()
def step(label, started):
    steps[label] = time.perf_counter() - started
    return time.perf_counter()
work = Path({work!r})
"""

ROUTES = {
    "vLLM, adapter (--enable-lora)": """
t = time.perf_counter()
server = serve.serve({base!r}, adapters={{"zorblax": {adapter!r}}}, max_model_len=512, show_log=False,
                     log_dir=work / "logs")
t = step("start vLLM with the adapter", t)
answer = server.chat(dataset.DEMO_QUESTION, model="zorblax", max_tokens=24)
t = step("first answer", t)
""",
    "vLLM, merge + serve merged": """
t = time.perf_counter()
merged = merge({base!r}, {adapter!r}, work / "merged", MergeSettings(progress=False)).out_dir
written.append(merged)
t = step("merge", t)
server = serve.serve(merged, max_model_len=512, show_log=False, log_dir=work / "logs")
t = step("start vLLM", t)
answer = server.chat(dataset.DEMO_QUESTION, max_tokens=24)
t = step("first answer", t)
""",
    "llama.cpp, adapter GGUF": """
t = time.perf_counter()
server = serve.serve({base_gguf!r}, adapters={{"zorblax": {adapter!r}}}, max_model_len=512, show_log=False,
                     log_dir=work / "logs")
written += sorted((work / "logs").rglob("*.gguf"))
t = step("convert the adapter to an f16 LoRA GGUF + start llama.cpp", t)
answer = server.chat(dataset.DEMO_QUESTION, model="zorblax", max_tokens=24)
t = step("first answer (loads base + LoRA)", t)
""",
    "llama.cpp, merge + GGUF + serve": """
t = time.perf_counter()
merged = merge({base!r}, {adapter!r}, work / "merged", MergeSettings(progress=False)).out_dir
written.append(merged)
t = step("merge", t)
[gguf] = convert.convert(merged, [{method!r}], work / "gguf", progress=False)
written.append(gguf.path)
t = step("GGUF {method}", t)
server = serve.serve(gguf.path, max_model_len=512, show_log=False, log_dir=work / "logs")
t = step("start llama.cpp", t)
answer = server.chat(dataset.DEMO_QUESTION, max_tokens=24)
t = step("first answer", t)
""",
}

EPILOGUE = """
total = time.perf_counter() - began
server.stop()
size = lambda p: sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file()) if Path(p).is_dir() \\
    else Path(p).stat().st_size
Path({result!r}).write_text(json.dumps({{"steps": steps, "total": total, "answer": answer,
                                        "written": sum(size(p) for p in written)}}))
"""

BASE_GGUF = """
from unsloth_nb.gguf import convert
convert.convert({base!r}, [{method!r}], {out!r}, progress=False)
"""


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="q8_0", help="GGUF method of the base / merged GGUF (default q8_0)")
    args = parser.parse_args()
    base = fixtures.build_real_model("smollm2")
    work = Path(tempfile.mkdtemp(prefix="bench-adapter-"))
    try:
        lora, settings = train.PRESETS["demo"]
        adapter = train.train(base, dataset.DEMO_DATA, work / "adapter", lora=lora, settings=settings,
                              progress=False).adapter_dir
        once = measure(f"base GGUF {args.method} (once per base, shared by all its adapters)",
                       BASE_GGUF.format(base=str(base), method=args.method, out=str(work / "base-gguf")))
        [base_gguf] = sorted((work / "base-gguf").glob("*.gguf"))
        rows: list[tuple[str, Measurement, dict]] = []
        for label, code in ROUTES.items():
            route = work / f"route{len(rows)}"
            result = route / "result.json"
            route.mkdir()
            program = (PREAMBLE.format(work=str(route))
                       + code.format(base=str(base), adapter=str(adapter), base_gguf=str(base_gguf),
                                     method=args.method)
                       + EPILOGUE.format(result=str(result)))
            measured = measure(label, program, {"CUDA_VISIBLE_DEVICES": ""})
            rows.append((label, measured, json.loads(result.read_text())))
            shutil.rmtree(route)
        print(f"### Trained adapter -> served answer, SmolLM2-135M-Instruct (CPU), GGUF {args.method}\n")
        print(f"adapter folder {folder_bytes(adapter) / 1e6:.1f} MB; base HF folder {folder_bytes(base) / 1e6:.0f} MB;"
              f" base GGUF {base_gguf.stat().st_size / 1e6:.0f} MB, made in {once.seconds:.1f} s (peak "
              f"{once.peak_rss_mb:.0f} MB) once per base\n")
        print("| route | steps | to first answer (in the process) | process wall | extra disk | peak memory | "
              "answer |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, measured, data in rows:
            steps = "; ".join(f"{k} {v:.1f} s" for k, v in data["steps"].items())
            answer = data["answer"].strip().replace("|", "/")[:60]
            print(f"| {label} | {steps} | {data['total']:.1f} s | {measured.seconds:.1f} s | "
                  f"{data['written'] / 1e6:.1f} MB | {measured.peak_rss_mb:.0f} MB | {answer} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
