"""QLoRA's peak GPU memory against the planner's estimate (``plan.train_vram``), on CUDA.

Each shape trains in its own process (its peak is its own): the llama3 fixture of that shape (random weights,
which are fine for memory; ``8b`` is Llama-3.1-8B's dimensions, a 16 GB folder built on first use) loaded in
4 bits by ``unsloth_nb.train``, a few steps of batches as long as ``--seq-len``, then the peak allocated and
reserved memory against the estimate for the same batch (batch x longest row, as the plan counts it).

    python benchmarks/train_vram_vs_plan.py [--shapes 1b,8b] [--steps 6] [--batch 2] [--seq-len 2048]
        [--checkpointing | --no-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_tokens_per_s import synthetic_rows


def child(args: argparse.Namespace) -> None:
    import torch

    from unsloth_nb import fixtures
    from unsloth_nb import plan as planner
    from unsloth_nb import train as T

    started = time.perf_counter()
    model = fixtures.build_model("llama3", args.child)
    built = time.perf_counter() - started
    rows = synthetic_rows(args.steps * args.batch, reply_words=args.seq_len)
    settings = T.TrainSettings(max_steps=args.steps, batch_size=args.batch, grad_accumulation=1,
                               max_seq_len=args.seq_len, save_steps=10**6, warmup_steps=1, load_in_4bit=True,
                               gradient_checkpointing=args.checkpointing, plan=False)
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        result = T.train(model, rows, Path(tmp) / "adapter", lora=T.LoraSettings(), settings=settings,
                         progress=False)
    peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    tokenizer = T.load_tokenizer(model, settings)
    longest = max(len(x["input_ids"]) for x in T.prepare(tokenizer, rows, settings.max_seq_len))
    lora = T.LoraSettings()
    estimate = planner.train_vram(planner.size_model(model), r=lora.r, targets=lora.target_modules,
                                  tokens=settings.batch_size * longest, load_in_4bit=True,
                                  gradient_checkpointing=result.settings["gradient_checkpointing"])
    print("RESULT " + json.dumps({
        "shape": args.child, "peak": peak, "reserved": reserved, "estimate": estimate, "longest": longest,
        "checkpointing": result.settings["gradient_checkpointing"], "padding_free": result.settings["padding_free"],
        "losses": result.loss_history, "build_s": built, "wall_s": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="gradient checkpointing (default: unsloth_nb's choice for this GPU)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("This benchmark needs a CUDA GPU.")
    print(f"{torch.cuda.get_device_name(0)}; QLoRA (NF4), r=16 on all projections, batch {args.batch}, up to "
          f"{args.seq_len} tokens, {args.steps} steps", flush=True)
    print("| shape | longest row | checkpointing | planned | peak allocated | peak reserved | planned / peak "
          "| planned / reserved | losses first -> last |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for shape in (s for s in args.shapes.split(",") if s):
        cmd = [sys.executable, __file__, "--child", shape, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq-len", str(args.seq_len)]
        if args.checkpointing is not None:
            cmd.append("--checkpointing" if args.checkpointing else "--no-checkpointing")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{shape} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        r = json.loads(line[len("RESULT "):])
        gib = 2**30
        print(f"| {shape} | {r['longest']} | {'on' if r['checkpointing'] else 'off'} | {r['estimate'] / gib:.2f} GiB "
              f"| {r['peak'] / gib:.2f} GiB | {r['reserved'] / gib:.2f} GiB | {r['estimate'] / r['peak']:.2f} "
              f"| {r['estimate'] / r['reserved']:.2f} | {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |", flush=True)
        print(f"  (fixture ready in {r['build_s']:.0f} s, whole run {r['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
