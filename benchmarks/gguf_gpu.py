"""HF folder -> Q4_K_M GGUF on a CUDA GPU, against the time it takes just to read the weights and write the file.

The issue's bar: the whole export within 1.5x of reading the safetensors and writing a file of the GGUF's
size. Also prints K-quant throughput on the GPU for the largest tensor shape.

    python benchmarks/gguf_gpu.py [--shape 1b]
    python benchmarks/gguf_gpu.py --export-only --repeat 3 [--after-training] [--prepared]

``--export-only`` times only the export: the first one in the process, then ``--repeat`` more, each followed
by a floor run. ``--after-training`` first does what a notebook has done by the time it exports (transformers
has read the model's config, CUDA is started); ``--prepared`` calls ``convert.prepare`` and waits for it, as
the notebooks' training cells do. With an empty ``TRITON_CACHE_DIR`` the first export is a fresh machine's.

On the GPU machine (no registry), carry the wheels in benchmarks/out/wheels, the tokenizer cache in
benchmarks/out/cache and, for the llama.cpp comparison, a copy of the installed ``llama_cpp`` package (pure
Python plus its shared libraries) and ``diskcache`` in benchmarks/out/pylib, then:
    pip install --no-index --no-deps --target /tmp/deps benchmarks/out/wheels/gguf-*.whl
    PYTHONPATH=/tmp/deps:benchmarks/out/pylib:. UNSLOTH_NB_CACHE=benchmarks/out/cache python benchmarks/gguf_gpu.py
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


def parity_and_speed(shape: tuple[int, int]) -> dict:
    """CUDA kernels against the CPU, whose bytes equal llama.cpp's C (tests/test_quants.py): identical blocks
    per type, and throughput with the weights already on the GPU and with them in host memory (the copy to
    the GPU included); the copy back to the host is included in both. Returns {type: host-input M weights/s}."""
    import gguf
    import torch

    from unsloth_nb.gguf import quants

    torch.manual_seed(0)
    x = (torch.randn(*shape) * 0.02).to(torch.bfloat16)
    x[::97, ::13] *= 40  # outliers
    x[:4] = 0  # all-zero blocks
    x[4:8] = 0.5  # constant blocks
    gpu = x.cuda()
    rates = {}
    for qtype in quants.K_QUANTS:
        reference = quants.quantize(x[:1024], qtype, device="cpu")
        quants.quantize(gpu, qtype, device="cuda")  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = quants.quantize(gpu, qtype, device="cuda")
        on_gpu = x.numel() / (time.perf_counter() - started) / 1e6
        started = time.perf_counter()
        quants.quantize(x, qtype, device="cuda")
        rates[qtype] = from_host = x.numel() / (time.perf_counter() - started) / 1e6
        block = gguf.GGML_QUANT_SIZES[qtype][1]
        same = (out[:1024].reshape(-1, block) == reference.reshape(-1, block)).all(axis=1).mean()
        print(f"{qtype.name}: {on_gpu:.0f} M weights/s from GPU memory, {from_host:.0f} from host memory; blocks "
              f"identical to the CPU/C bytes: {same * 100:.3f}%", flush=True)
    return rates


def identical_tensors(a: Path, b: Path) -> str:
    """How many tensors of two GGUF files have the same name, type and bytes ("n of m")."""
    import gguf
    import numpy as np

    theirs = {t.name: t for t in gguf.GGUFReader(b).tensors}
    ours = gguf.GGUFReader(a).tensors
    same = sum(t.name in theirs and t.tensor_type == theirs[t.name].tensor_type
               and np.array_equal(t.data, theirs[t.name].data) for t in ours)
    return f"{same} of {len(ours)}"


def llamacpp_quantize(src: Path, dst: Path) -> float:
    """Seconds for llama.cpp's llama_model_quantize (Q4_K_M) on every host core."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count()
    started = time.perf_counter()
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    return time.perf_counter() - started


def _timed_stages(undo: bool = False) -> dict[str, float]:
    """Wall seconds spent in the export's main-thread stages (metadata, serialization, data, read-back check);
    the data stage runs from the first byte written to the last."""
    from unsloth_nb import manifest
    from unsloth_nb.gguf import convert, layout

    stages = {"metadata": (convert, "_add_metadata"), "serialize": (layout, "serialize"),
              "data": (convert, "_write"), "final fsync": (manifest.HashingFile, "close"),
              "check": (layout, "validate")}
    if undo:
        for module, name in stages.values():
            setattr(module, name, getattr(module, name).__wrapped__)
        return {}
    seconds = dict.fromkeys(stages, 0.0)

    def timed(stage: str, fn):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[stage] += time.perf_counter() - started
        run.__wrapped__ = fn
        return run

    for stage, (module, name) in stages.items():
        setattr(module, name, timed(stage, getattr(module, name)))
    return seconds


def _configure(workers: int | None, writeback_mb: int | None) -> None:
    """Set the GPU worker count and the background flush interval for the next export (None: as shipped)."""
    from unsloth_nb import manifest
    from unsloth_nb.gguf import layout

    if workers is not None:
        layout.GPU_WORKERS, layout.GPU_IN_FLIGHT = workers, workers + 1
    if writeback_mb is not None:
        manifest.HashingFile.WRITEBACK_BYTES = writeback_mb << 20


def _describe(workers: int | None, writeback_mb: int | None) -> str:
    parts = [f"{workers} GPU workers" if workers is not None else "",
             f"flush every {writeback_mb} MiB" if writeback_mb else "fsync at the end" if writeback_mb == 0 else ""]
    return ", ".join(p for p in parts if p) or "as shipped"


def main() -> None:
    import numpy as np
    import torch

    from unsloth_nb import fixtures
    from unsloth_nb.gguf import convert, requantize

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--export-only", action="store_true", help="only the export against its I/O floor")
    parser.add_argument("--repeat", type=int, default=1, help="timed exports, each followed by a floor run")
    parser.add_argument("--after-training", action="store_true",
                        help="before the first export, load the model's config with transformers and start CUDA, "
                             "as a notebook has done by the time it exports (training, merging)")
    parser.add_argument("--prepared", action="store_true",
                        help="call convert.prepare before the first export and wait for it, as the notebooks do "
                             "before training")
    parser.add_argument("--picker", action="store_true",
                        help="before the first export, show the exact file sizes as the notebooks' quant picker does "
                             "(plan.gguf_sizes on the model), timed on its own")
    parser.add_argument("--workers", default="",
                        help="comma-separated GPU worker counts (layout.GPU_WORKERS) the timed exports cycle through")
    parser.add_argument("--writeback-mb", default="",
                        help="comma-separated manifest.HashingFile.WRITEBACK_BYTES values in MiB (0: fsync only at "
                             "the end) the timed exports cycle through, crossed with --workers")
    args = parser.parse_args()
    configs = [(w, mb) for w in ([int(v) for v in args.workers.split(",")] if args.workers else [None])
               for mb in ([int(v) for v in args.writeback_mb.split(",")] if args.writeback_mb else [None])]
    model = fixtures.build_model("llama3", args.shape)
    if args.prepared:
        started = time.perf_counter()
        thread = convert.prepare(["q4_k_m"], "cuda")
        thread.join()
        print(f"convert.prepare (kernels built in the background): {time.perf_counter() - started:.1f} s", flush=True)
    if args.after_training:
        from transformers import AutoConfig

        started = time.perf_counter()
        AutoConfig.from_pretrained(model)
        torch.zeros(1, device="cuda")
        print(f"transformers config and CUDA started beforehand: {time.perf_counter() - started:.1f} s", flush=True)
    if args.picker:
        from unsloth_nb import plan

        started = time.perf_counter()
        plan.gguf_sizes(plan.size_model(model), ["q4_k_m"])
        print(f"the picker's exact sizes beforehand: {time.perf_counter() - started:.1f} s", flush=True)
    print(f"GPU: {torch.cuda.get_device_name(0)}; {os.cpu_count()} host cores; model {model}", flush=True)
    rates = {} if args.export_only else parity_and_speed((8192, 2048))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.export_only:  # with --export-only the first export starts cold (nothing parsed yet)
            started = time.perf_counter()
            convert.file_layout(model, "q4_k_m")
            print(f"metadata and layout alone: {time.perf_counter() - started:.1f} s", flush=True)
        stages = _timed_stages()
        first = time.perf_counter()
        result = convert.convert(model, ["q4_k_m"], work / "warm", device="cuda", progress=False)[0]
        first = time.perf_counter() - first
        print(f"first export in this process (Triton start included): {first:.1f} s for {result.size / 1e9:.2f} GB; "
              "stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()), flush=True)
        _timed_stages(undo=True)
        floors, ratios = [], {}
        for run in range(args.repeat * len(configs)):
            config = configs[run % len(configs)]
            _configure(*config)
            stages = _timed_stages()
            started = time.perf_counter()
            result = convert.convert(model, ["q4_k_m"], work / f"out{run}", device="cuda", progress=False)[0]
            export = time.perf_counter() - started
            floor = read_and_write(model, work / "io.bin", result.size)
            floors.append(floor)
            ratios.setdefault(config, []).append(export / floor)
            print(f"Q4_K_M export ({_describe(*config)}): {export:.1f} s for {result.size / 1e9:.2f} GB; "
                  f"read + write floor {floor:.1f} s; "
                  f"ratio {export / floor:.2f} (target <= 1.5); stages: "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()), flush=True)
            _timed_stages(undo=True)
        for config, values in ratios.items():
            print(f"{_describe(*config)}: median ratio {np.median(values):.2f} over {len(values)} exports "
                  f"(min {min(values):.2f}, max {max(values):.2f})", flush=True)
        if floors:  # a floor run right after an export can be much faster than the others: take the median
            floor = float(np.median(floors))
            print(f"first export against the median floor ({floor:.1f} s): ratio {first / floor:.2f}", flush=True)
        if args.export_only:
            return
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama_cpp not importable here: no llama.cpp comparison")
            return
        bf16 = convert.convert(model, ["bf16"], work / "bf16", progress=False)[0].path
        ours = requantize.requantize(bf16, ["q4_k_m"], work / "ours", device="cuda", progress=False)[0]
        (work / "ours").joinpath(ours.path.name).unlink()
        started = time.perf_counter()
        ours = requantize.requantize(bf16, ["q4_k_m"], work / "ours", device="cuda", progress=False)[0]
        ours_s = time.perf_counter() - started
        theirs_s = llamacpp_quantize(bf16, work / "llama.q4_k_m.gguf")
        same = identical_tensors(ours.path, work / "llama.q4_k_m.gguf")
        print(f"BF16 GGUF -> Q4_K_M: llama.cpp on {os.cpu_count()} cores {theirs_s:.1f} s; unsloth_nb on the GPU "
              f"{ours_s:.1f} s; ratio {theirs_s / ours_s:.1f}x; tensors with identical type and bytes: {same}",
              flush=True)
        # Quantization throughput on this model's Q4_K_M type mix, from host memory, against llama.cpp's.
        counts: dict = {}
        for t in convert.file_layout(model, "q4_k_m").tensors:
            counts[t.qtype] = counts.get(t.qtype, 0) + int(np.prod(t.shape))
        total = sum(counts.values())
        mix = total / sum(n / rates.get(q, float("inf")) for q, n in counts.items()) if rates else 0.0
        print(f"Q4_K_M quantization throughput: unsloth_nb kernels {mix:.0f} M weights/s (K-quant tensors, from host "
              f"memory), llama.cpp {total / theirs_s / 1e6:.0f} M weights/s (whole quantize step): "
              f"{mix / (total / theirs_s / 1e6):.1f}x (target >= 10x)", flush=True)


if __name__ == "__main__":
    main()
