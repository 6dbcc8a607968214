"""On a CUDA machine: the imatrix-weighted quantizers on CUDA against the CPU path (which CI proves byte-identical
to llama.cpp), block by block, and their throughput with and without weights on an 8192x4096 bf16 tensor.

    PYTHONPATH=. python benchmarks/imatrix_cuda.py
"""
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from unsloth_nb.gguf import quants

torch.manual_seed(0)
types = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
x = (torch.randn(512, 4096) * 0.02).to(torch.bfloat16)
w = (torch.rand(4096) ** 4 * 10 + 1e-3).numpy().astype(np.float32)
big = (torch.randn(8192, 4096) * 0.02).to(torch.bfloat16).cuda()
for t in types:
    cpu = quants.quantize(x, t, "cpu", weights=w)
    gpu = quants.quantize(x.cuda(), t, "cuda", weights=w)
    size = cpu.shape[-1] // (4096 // (32 if t == T.IQ4_NL else 256))  # bytes per block
    same = float((cpu.reshape(-1, size) == gpu.reshape(-1, size)).all(axis=1).mean())
    rates = []
    for weights in (None, w):
        quants.quantize(big, t, "cuda", weights=weights)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            quants.quantize(big, t, "cuda", weights=weights)
        torch.cuda.synchronize()
        rates.append(3 * big.numel() / (time.perf_counter() - t0) / 1e6)
    print(f"{t.name:7} cuda==cpu blocks {same:.4%}  plain {rates[0]:8.0f} M weights/s  "
          f"imatrix {rates[1]:8.0f} M weights/s")
