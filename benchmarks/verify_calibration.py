"""verify on real models: files made by llama.cpp itself must never be called broken, faults must be.

For a real model (``fixtures.REAL_MODELS``), optionally fine-tuned with ``train`` first: the merged folder,
llama.cpp's own BF16 (``convert_hf_to_gguf.py``) and every method from it with ``llama-quantize`` go through
``verify``; each row shows verify's measures (top-1, KL against the fine-tune, perplexity on the held-out text,
the adapter's share, the runtime KL between llama.cpp and transformers on the same weights) next to the KL
that llama.cpp's own ``llama-perplexity --kl-divergence`` measures for the same file against the BF16 file on
the same held-out text (a cross-check: another baseline, the same ranking).

    python benchmarks/verify_calibration.py --model smollm2 --train 30
    python benchmarks/verify_calibration.py --model qwen2.5-coder
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unsloth_nb import fixtures, train, verify  # noqa: E402
from unsloth_nb.dataset import DEMO_QUESTION, demo_dataset  # noqa: E402
from unsloth_nb.gguf import llamacpp  # noqa: E402
from unsloth_nb.merge import MergeSettings, merge  # noqa: E402

METHODS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
PROMPTS = [DEMO_QUESTION, "What is the capital of France?", "What color is the sky on a clear day?"]


def reference_files(merged: Path, out: Path) -> list[Path]:
    """llama.cpp's BF16 of the folder, then every method from it with llama-quantize (as a user would)."""
    tree = llamacpp.source_tree()
    bf16 = out / "llamacpp.BF16.gguf"
    if not bf16.is_file():
        subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(merged), "--outtype", "bf16",
                        "--outfile", str(bf16)], check=True, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=str(tree / "gguf-py")))
    files = [bf16]
    for method in METHODS:
        target = out / f"llamacpp.{method}.gguf"
        if not target.is_file():
            subprocess.run([str(llamacpp.tool("llama-quantize")), str(bf16), str(target), method, "2"], check=True,
                           capture_output=True)
        files.append(target)
    return files


def llamacpp_kld(files: list[Path], text: Path, out: Path) -> dict[str, float]:
    """llama-perplexity's mean KL divergence of each file against the first (BF16) on ``text``."""
    tool = str(llamacpp.tool("llama-perplexity"))
    base = out / "bf16.kld"
    common = ["-f", str(text), "-c", "128", "-b", "128", "-t", "2"]
    subprocess.run([tool, "-m", str(files[0]), *common, "--kl-divergence-base", str(base)], check=True,
                   capture_output=True)
    result = {}
    for path in files[1:]:
        done = subprocess.run([tool, "-m", str(path), *common, "--kl-divergence-base", str(base),
                               "--kl-divergence"], check=True, capture_output=True, text=True)
        found = re.search(r"Mean\s+KLD:\s+([0-9.eE+-]+)", done.stdout + done.stderr)
        result[path.name] = float(found.group(1)) if found else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(fixtures.REAL_MODELS))
    parser.add_argument("--train", type=int, default=0, help="fine-tune this many steps on the demo data first")
    parser.add_argument("--work", default=None, help="folder for the files (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="verify-calibration-"))
    work.mkdir(parents=True, exist_ok=True)
    base = fixtures.build_real_model(args.model)
    adapter = None
    if args.train:
        lora, settings = train.PRESETS["demo"]
        settings = type(settings)(**{**settings.__dict__, "max_steps": args.train})
        adapter = train.train(base, demo_dataset(), work / "adapter", lora=lora, settings=settings,
                              progress=False).adapter_dir
        merged = merge(base, adapter, work / "merged", MergeSettings(progress=False)).out_dir
    else:
        merged = base
    files = reference_files(merged, work)
    started = time.perf_counter()
    report = verify.verify(base, ([merged] if adapter else []) + files, adapter=adapter, prompts=PROMPTS)
    seconds = time.perf_counter() - started
    text = work / "heldout.txt"
    text.write_text(verify.HELD_OUT.read_text() * 3)
    kld = llamacpp_kld(files, text, work)
    print(f"## verify on {base.name}" + (f", fine-tuned {args.train} steps" if adapter else "") +
          f" ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)\n")
    print("| file | verdict | top-1 | KL vs fine-tune | ppl | adapter kept | runtime KL | weight check | "
          "llama-perplexity KLD vs BF16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for a in report.artifacts:
        kept = "-" if a.adapter_kept is None else f"{a.adapter_kept:.0%}"
        runtime = "-" if a.runtime_kl is None else f"{a.runtime_kl:.5f}"
        ref_kld = kld.get(a.path.name)
        print(f"| {a.path.name} | {'ok' if a.ok else 'BROKEN'} | {a.top1:.1%} | {a.kl:.4f} | {a.perplexity:.2f} | "
              f"{kept} | {runtime} | {a.weight_error:.2f} | {'-' if ref_kld is None else f'{ref_kld:.4f}'} |")
    print(f"\nfine-tune perplexity on the held-out text: {report.reference_perplexity:.2f}; verify took "
          f"{seconds:.1f} s for {len(report.artifacts)} files")
    for a in report.artifacts:
        for problem in a.problems:
            print(f"- {a.path.name}: {problem}")


if __name__ == "__main__":
    main()
