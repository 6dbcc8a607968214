"""What an importance matrix buys on a real model: KL to BF16 per method, without one and with ours or llama.cpp's.

On SmolLM2-135M-Instruct fine-tuned with ``train`` (the demo preset, ``--train 30`` steps on the demo chats), or
on the base model (``--train 0``):

1. **Quality**: every method below is written by our ``gguf`` command four ways, without an imatrix, with our
   imatrix of a text, with llama-imatrix's imatrix of the same text (on our BF16 GGUF), and with our imatrix of
   the training data (the fine-tune's own chats, base + adapter). ``llama-perplexity --kl-divergence`` measures
   each file's mean KL to the BF16 GGUF on a text none of the imatrices saw, and on the training chats.

The cost of collecting is measured by ``benchmarks/imatrix_speed.py``.

The texts are llama.cpp's own documentation from the sdist we build it from (English prose with some code):
``docs/build.md`` (first 35 kB) for the imatrix, ``tools/cli/README.md`` (first 28 kB) for the KL.

    python benchmarks/imatrix_quality.py --train 30
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_name  # noqa: E402

from unsloth_nb import dataset, fixtures, train  # noqa: E402
from unsloth_nb.gguf import convert, imatrix, llamacpp  # noqa: E402
from unsloth_nb.merge import MergeSettings, merge  # noqa: E402

METHODS = ("q2_k", "q3_k_m", "q4_k_m", "iq4_xs", "q5_k_m", "q6_k")
CTX = 512


def sdist_text(member: str, limit: int) -> str:
    with tarfile.open(llamacpp.sdist_archive()) as tar:
        name = next(n for n in tar.getnames() if n.endswith(f"vendor/llama.cpp/{member}"))
        return tar.extractfile(name).read().decode("utf-8")[:limit]


def rendered_rows(folder: Path, rows: list[dict]) -> str:
    """The training chats as the model saw them (its chat template), one after another."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    texts = (dataset.normalize(r, i + 1) for i, r in enumerate(rows))
    return "\n".join(t if isinstance(t, str) else tok.apply_chat_template(t, tokenize=False) for t in texts)


def kl(files: dict[str, Path], base: Path, text: Path, work: Path) -> dict[str, float]:
    """llama-perplexity's mean KL divergence of each file against ``base`` on ``text``."""
    tool = str(llamacpp.tool("llama-perplexity"))
    logits = work / f"{text.stem}.kld"
    common = ["-f", str(text), "-c", str(CTX), "-t", str(os.cpu_count() or 2)]
    subprocess.run([tool, "-m", str(base), *common, "--kl-divergence-base", str(logits)], check=True,
                   capture_output=True)
    out = {}
    for label, path in files.items():
        done = subprocess.run([tool, "-m", str(path), *common, "--kl-divergence-base", str(logits),
                               "--kl-divergence"], check=True, capture_output=True, text=True)
        out[label] = float(re.search(r"Mean\s+KLD:\s+([0-9.eE+-]+)", done.stdout + done.stderr).group(1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(fixtures.REAL_MODELS))
    parser.add_argument("--train", type=int, default=30, help="fine-tune steps first (0: the base model)")
    parser.add_argument("--work", default=None, help="folder to keep the files in (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="imatrix-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base = fixtures.build_real_model(args.model)
    rows = dataset.demo_dataset()
    adapter = None
    folder = base
    if args.train:
        lora, settings = train.PRESETS["demo"]
        settings = dataclasses.replace(settings, max_steps=args.train)
        adapter = work / "adapter"
        if not (adapter / "adapter_model.safetensors").is_file():
            train.train(base, rows, adapter, lora=lora, settings=settings, progress=False)
        folder = merge(base, adapter, work / "merged", MergeSettings(progress=False)).out_dir
    bf16 = convert.convert(folder, ["bf16"], work / "bf16", progress=False)[0].path

    calib, heldout, chats = work / "calibration.txt", work / "heldout.txt", work / "training-chats.txt"
    calib.write_text(sdist_text("docs/build.md", 35_000), encoding="utf-8")
    heldout.write_text(sdist_text("tools/cli/README.md", 28_000), encoding="utf-8")
    chats.write_text(rendered_rows(folder, rows), encoding="utf-8")

    started = time.perf_counter()
    imatrices = {"ours (text)": imatrix.collect(folder, calib, ctx=CTX, progress=False).save(
        work / "ours-text.imatrix.gguf", overwrite=True)}
    collect_s = time.perf_counter() - started
    ref = work / "llama-text.imatrix.gguf"
    subprocess.run([str(llamacpp.tool("llama-imatrix")), "-m", str(bf16), "-f", str(calib), "-o", str(ref),
                    "-c", str(CTX), "-t", str(os.cpu_count() or 2), "--no-ppl"], check=True, capture_output=True)
    imatrices["llama-imatrix (text)"] = ref
    train_ctx = 128  # the demo chats are short: a few thousand tokens in all
    imatrices["ours (training data)"] = imatrix.collect(base, rows, adapter=adapter, ctx=train_ctx,
                                                        progress=False).save(work / "ours-train.imatrix.gguf",
                                                                             overwrite=True)
    files: dict[str, dict[str, Path]] = {}
    for label, path in [("none", None), *imatrices.items()]:
        out = work / re.sub(r"\W+", "-", label).strip("-")
        for r in convert.convert(folder, list(METHODS), out, imatrix=path, progress=False):
            files.setdefault(r.method, {})[label] = r.path
    flat = {f"{m} | {label}": p for m, by in files.items() for label, p in by.items()}
    kl_heldout = kl(flat, bf16, heldout, work)
    kl_chats = kl(flat, bf16, chats, work)

    print(f"\n{args.model}{f' fine-tuned {args.train} steps' if args.train else ''}; CPU: {cpu_name()}, "
          f"{os.cpu_count()} threads; collecting our text imatrix took {collect_s:.1f} s")
    labels = ["none", *imatrices]
    print("\nMean KL to BF16 (llama-perplexity --kl-divergence), held-out text / training chats:\n")
    print("| method | size MB | " + " | ".join(labels) + " | ours vs llama-imatrix | training-data imatrix vs none |")
    print("|---" * (len(labels) + 4) + "|")
    results = {}
    for m in METHODS:
        cells, row = [], {}
        for label in labels:
            a, b = kl_heldout[f"{m} | {label}"], kl_chats[f"{m} | {label}"]
            row[label] = {"heldout": a, "chats": b}
            cells.append(f"{a:.4f} / {b:.4f}")
        ours_vs_ref = kl_heldout[f"{m} | ours (text)"] / kl_heldout[f"{m} | llama-imatrix (text)"] - 1
        gain = [1 - kl_heldout[f"{m} | ours (training data)"] / kl_heldout[f"{m} | none"],
                1 - kl_chats[f"{m} | ours (training data)"] / kl_chats[f"{m} | none"]]
        size = files[m]["none"].stat().st_size / 1e6
        print(f"| {m} | {size:.1f} | " + " | ".join(cells) + f" | {ours_vs_ref:+.1%} | "
              f"{gain[0]:.0%} / {gain[1]:.0%} lower |")
        results[m] = {"kl": row, "size_mb": size, "ours_vs_llama_imatrix": ours_vs_ref,
                      "train_imatrix_gain": gain}
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
