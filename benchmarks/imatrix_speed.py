"""What collecting an importance matrix costs: our ``imatrix.collect`` against a plain forward pass of the same
model over the same tokens, and ``llama-imatrix`` on the same text where its build is at hand.

Each run is a fresh process (model load and tokenization included, as a user waits for them), the three
alternate, and the medians are reported with their ratio to the forward pass. The forward pass runs as
``collect`` does: float32 on the CPU, bf16 on CUDA (fp16 before compute capability 8.0), chunks of ``--ctx``
tokens, ``TOKENS_PER_FORWARD`` (CPU) or ``CUDA_TOKENS_PER_FORWARD`` tokens per pass, only the last position's
logits.

    python benchmarks/imatrix_speed.py MODEL_DIR TEXT.txt [--device cuda] [--gguf MODEL.BF16.gguf]
    python benchmarks/imatrix_speed.py --random-1b DIR TEXT.txt --device cuda   # a 1B Llama shape, random weights
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_name  # noqa: E402

PLAIN = """
import sys, time, numpy as np, torch
from transformers import AutoModelForCausalLM
from unsloth_nb.gguf import imatrix
folder, text, ctx, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ids = imatrix.token_ids(folder, text)
dev = torch.device(device)
dtype = torch.float32
if dev.type == "cuda":
    dtype = torch.bfloat16 if torch.cuda.get_device_capability(dev)[0] >= 8 else torch.float16
net = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(dev).eval()
n = ids.size // ctx
grid = torch.from_numpy(ids[: n * ctx].reshape(n, ctx).astype(np.int64))
per = max(1, (imatrix.CUDA_TOKENS_PER_FORWARD if dev.type == "cuda" else imatrix.TOKENS_PER_FORWARD) // ctx)
with torch.inference_mode():
    for i in range(0, n, per):
        net(input_ids=grid[i:i + per].to(dev), use_cache=False, logits_to_keep=1)
if dev.type == "cuda":
    torch.cuda.synchronize()
print(n * ctx)
"""

OURS = """
import sys
from unsloth_nb.gguf import imatrix
m = imatrix.collect(sys.argv[1], sys.argv[2], ctx=int(sys.argv[3]), device=sys.argv[4], progress=False)
print(m.chunk_count * m.chunk_size)
"""


def timed(argv: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, check=True, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    return time.perf_counter() - started, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def random_1b(folder: Path, tokenizer_from: Path) -> Path:
    """A Llama-3.2-1B-shaped model (2048 wide, 16 layers, GQA 32/8) with random bf16 weights and the tokenizer
    of ``tokenizer_from``: the cost of a forward pass does not depend on the weights' values."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="HF model folder (with --random-1b: the folder to build it in)")
    parser.add_argument("text", help="plain text file")
    parser.add_argument("--random-1b", metavar="TOKENIZER_DIR", default=None,
                        help="build a 1B Llama shape with random weights and this folder's tokenizer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gguf", default=None, help="the model's BF16 GGUF, to time llama-imatrix on the same text")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    folder = Path(args.model)
    if args.random_1b:
        folder = random_1b(folder, Path(args.random_1b))
    common = [str(folder), args.text, str(args.ctx), args.device]
    runs: dict[str, list[float]] = {"forward pass": [], "our imatrix": []}
    tokens = {}
    tool = None
    if args.gguf:
        sys.path.insert(0, str(ROOT))
        from unsloth_nb.gguf import llamacpp

        tool = str(llamacpp.tool("llama-imatrix"))
        runs["llama-imatrix"] = []
    for _ in range(args.repeats):
        seconds, tokens["forward pass"] = timed([sys.executable, "-c", PLAIN, *common])
        runs["forward pass"].append(seconds)
        seconds, tokens["our imatrix"] = timed([sys.executable, "-c", OURS, *common])
        runs["our imatrix"].append(seconds)
        if tool:
            out = str(Path(args.text).with_suffix(".speed.imatrix.gguf"))
            seconds, _ = timed([tool, "-m", args.gguf, "-f", args.text, "-o", out, "-c", str(args.ctx),
                                "-t", str(os.cpu_count() or 2), "--no-ppl"])
            runs["llama-imatrix"].append(seconds)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    where = args.device
    if args.device.startswith("cuda"):
        import torch

        where = torch.cuda.get_device_name(0)
    print(f"{folder.name} on {where} (host CPU: {cpu_name()}, {os.cpu_count()} threads), ctx {args.ctx}, "
          f"{tokens['forward pass']} tokens, {args.repeats} alternating repeats, median wall seconds:")
    for k, v in medians.items():
        spread = (max(runs[k]) - min(runs[k])) / v
        print(f"  {k:<13} {v:7.1f} s  {v / medians['forward pass']:.2f}x the forward pass  (spread {spread:.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": medians, "device": where}, indent=1))


if __name__ == "__main__":
    main()
