"""HF folder -> Q4_K_M GGUF on a CUDA GPU, against the time it takes just to read the weights and write the file.

The issue's bar: the whole export within 1.5x of reading the safetensors and writing a file of the GGUF's
size. Also prints K-quant throughput on the GPU for the largest tensor shape.

    python benchmarks/gguf_gpu.py [--shape 1b]

On the GPU machine (no registry), carry the wheels in benchmarks/out/wheels and the tokenizer cache in
benchmarks/out/cache, then:
    pip install --no-index --no-deps --target /tmp/deps benchmarks/out/wheels/gguf-*.whl
    PYTHONPATH=/tmp/deps:. UNSLOTH_NB_CACHE=benchmarks/out/cache python benchmarks/gguf_gpu.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def read_and_write(model: Path, out: Path, size: int) -> float:
    """Seconds to read every safetensors byte and write ``size`` bytes (the I/O floor of an export)."""
    started = time.perf_counter()
    for part in sorted(model.glob("*.safetensors")):
        with open(part, "rb") as f:
            while f.read(64 << 20):
                pass
    chunk = bytes(64 << 20)
    with open(out, "wb") as f:
        left = size
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    out.unlink()
    return seconds


def main() -> None:
    import gguf
    import torch

    from unsloth_nb import fixtures
    from unsloth_nb.gguf import convert, quants

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1b")
    args = parser.parse_args()
    model = fixtures.build_model("llama3", args.shape)
    print(f"GPU: {torch.cuda.get_device_name(0)}; model {model}")

    x = torch.randn(8192, 2048, dtype=torch.bfloat16, device="cuda") * 0.02
    for qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K):
        quants.quantize(x, qtype, device="cuda")
        torch.cuda.synchronize()
        started = time.perf_counter()
        quants.quantize(x, qtype, device="cuda")
        seconds = time.perf_counter() - started
        print(f"{qtype.name}: 8192x2048 in {seconds * 1000:.0f} ms ({x.numel() / seconds / 1e6:.0f} M weights/s, "
              "including the copy back to the host)")

    with tempfile.TemporaryDirectory() as tmp:
        convert.convert(model, ["q4_k_m"], Path(tmp) / "warm", device="cuda", progress=False)
        started = time.perf_counter()
        result = convert.convert(model, ["q4_k_m"], Path(tmp) / "out", device="cuda", progress=False)[0]
        export = time.perf_counter() - started
        floor = read_and_write(model, Path(tmp) / "io.bin", result.size)
    print(f"Q4_K_M export: {export:.1f} s for {result.size / 1e9:.2f} GB; read + write floor {floor:.1f} s; "
          f"ratio {export / floor:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
