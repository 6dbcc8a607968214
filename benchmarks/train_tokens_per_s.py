"""LoRA training throughput and memory on a CUDA GPU: ``unsloth_nb.train`` defaults against plain trl.

Every configuration trains the same LoRA adapter (r=16, alpha=16, all 7 projections, seed 3407) on the same
tokenized examples (``train.prepare``: reply-only labels, so every side learns the same thing) with the same
batch, sequence length, learning rate, precision and gradient checkpointing. Each run is its own process (its
peak VRAM, ``torch.cuda.max_memory_allocated``, is its own), configurations alternate, and the timed window
runs from the end of the warm-up steps to the last step, so compiling is not in it (its cost is shown apart).

Configurations (``--configs``):
- ``ours``: ``unsloth_nb.train`` with its defaults for this GPU (padding-free batches, compiled layers, a
  third of them recomputed in the backward pass); ``ours-keep``: the same with no layer recomputed;
- ``ours-eager``: the same, layers not compiled; ``ours-padded``: padded batches, not compiled (the defaults
  before padding-free and compiling);
- ``trl``: a plain trl script (``SFTTrainer`` with ``peft_config``, padded batches, SDPA attention);
- ``trl-liger``: the same with ``use_liger_kernel=True`` (needs liger-kernel).

    python benchmarks/train_tokens_per_s.py [--model DIR | --real] [--steps 60] [--warmup 10] [--batch 8]
        [--seq-len 1024] [--repeats 3] [--configs ours,trl,trl-liger] [--warm-round]

Tokens/s counts non-padding input tokens (the Trainer's ``num_input_tokens_seen``); the spread is
(max - min) / median over the repeats of one configuration.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("alpha beta gamma delta river mountain cloud signal vector matrix token layer model answer "
         "question garden window music paper stone light quick slow bright dark north south east west").split()
CONFIGS = ("ours", "ours-keep", "ours-eager", "ours-padded", "trl", "trl-liger")
LORA = {"r": 16, "alpha": 16}


def synthetic_rows(n: int, reply_words: int, seed: int = 0) -> list[dict]:
    """Chat rows with a short question and a long reply (the shape of a typical SFT set)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = " ".join(rng.choices(WORDS, k=24)) + "?"
        reply = " ".join(rng.choices(WORDS, k=rng.randint(reply_words // 2, reply_words))) + "."
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]})
    return rows


def meter(warmup: int):
    """A callback that records tokens and time between the end of warm-up and the end of training."""
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self) -> None:
            self.begin = time.perf_counter()
            self.start = self.tokens = self.seconds = self.warmup_seconds = None

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            if state.global_step == warmup:
                self.start = (time.perf_counter(), state.num_input_tokens_seen)
                self.warmup_seconds = self.start[0] - self.begin
            elif state.global_step == state.max_steps and self.start:
                self.seconds = time.perf_counter() - self.start[0]
                self.tokens = state.num_input_tokens_seen - self.start[1]

    return Meter()


def run_ours(model: str, rows: list[dict], args: argparse.Namespace, out: Path, variant: str) -> dict:
    from unsloth_nb import train as T

    extra = {"ours": {}, "ours-keep": {"recompute_share": 0.0}, "ours-eager": {"compile": False},
             "ours-padded": {"compile": False, "padding_free": False}}[variant]
    settings = T.TrainSettings(max_steps=args.steps, batch_size=args.batch, grad_accumulation=1,
                               max_seq_len=args.seq_len, save_steps=10**6, learning_rate=2e-4, warmup_steps=5,
                               gradient_checkpointing=args.checkpointing, plan=False, **extra)
    m = meter(args.warmup)
    result = T.train(model, rows, out / "ours", lora=T.LoraSettings(**LORA), settings=settings, progress=False,
                     callbacks=[m])
    s = result.settings
    return {"m": m, "losses": result.loss_history, "precision": s["precision"],
            "checkpointing": s["gradient_checkpointing"], "padding_free": s["padding_free"], "compile": s["compile"],
            "recompute_share": s["recompute_share"]}


def run_trl(model: str, rows: list[dict], args: argparse.Namespace, out: Path, liger: bool) -> dict:
    """What a plain trl script does: load, LoraConfig, SFTConfig, SFTTrainer(...).train(), on the same tokenized
    examples (input_ids and reply-only labels) as unsloth_nb.train."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from unsloth_nb import train as T

    precision = "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"
    tokenizer = T.load_tokenizer(model, T.TrainSettings())
    examples = T.prepare(tokenizer, rows, args.seq_len)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, device_map={"": 0})
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=list(T.PROJECTIONS))
    checkpointing = bool(args.checkpointing)
    config = SFTConfig(output_dir=str(out / "trl"), max_steps=args.steps, per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=1, learning_rate=2e-4, warmup_steps=5, lr_scheduler_type="linear",
                       max_length=args.seq_len, bf16=precision == "bf16", fp16=precision == "fp16", seed=3407,
                       data_seed=3407, gradient_checkpointing=checkpointing,
                       gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
                       optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none",
                       disable_tqdm=True, include_num_input_tokens_seen="non_padding", use_liger_kernel=liger)
    m = meter(args.warmup)
    trainer = SFTTrainer(model=base, args=config, train_dataset=Dataset.from_list(examples),
                         processing_class=tokenizer, peft_config=lora, callbacks=[m])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"m": m, "losses": losses, "precision": precision, "checkpointing": checkpointing}


def child(args: argparse.Namespace) -> None:
    import torch

    rows = synthetic_rows(args.steps * args.batch, args.reply_words)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.child.startswith("ours"):
            stats = run_ours(args.model, rows, args, Path(tmp), args.child)
        else:
            stats = run_trl(args.model, rows, args, Path(tmp), liger=args.child == "trl-liger")
    m = stats.pop("m")
    stats.update(tokens=m.tokens, seconds=m.seconds, warmup_seconds=m.warmup_seconds,
                 wall=time.perf_counter() - started, peak_vram=torch.cuda.max_memory_allocated())
    print("RESULT " + json.dumps(stats))


def spawn(args: argparse.Namespace, which: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--model", args.model, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--reply-words", str(args.reply_words)]
    if args.checkpointing is not None:
        cmd.append("--checkpointing" if args.checkpointing else "--no-checkpointing")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            print(f"  {which}: {result['tokens'] / result['seconds']:.0f} tokens/s, "
                  f"{result['peak_vram'] / 2**30:.2f} GiB, loss {result['losses'][-1]:.4f}", flush=True)
            return result
    sys.exit(f"{which} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def report(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    import torch

    first = next(iter(runs.values()))[0]
    print(f"\n{torch.cuda.get_device_name(0)}; {args.model}; batch {args.batch}, up to {args.seq_len} tokens, "
          f"{args.steps} steps ({args.warmup} warm-up, not timed), {first['precision']}, gradient checkpointing "
          f"{'on' if first['checkpointing'] else 'off'}; median of {args.repeats} alternating runs")
    speed = {k: statistics.median(r["tokens"] / r["seconds"] for r in v) for k, v in runs.items()}
    vram = {k: statistics.median(r["peak_vram"] for r in v) for k, v in runs.items()}
    ref = "trl" if "trl" in runs else next(iter(runs))
    print("| run | tokens/s (median) | spread | vs trl | peak VRAM | vs trl | last loss | mean loss, last 10 "
          "| load + warm-up | whole run |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, rs in runs.items():
        speeds = [r["tokens"] / r["seconds"] for r in rs]
        spread = (max(speeds) - min(speeds)) / speed[name]
        last = statistics.median(r["losses"][-1] for r in rs)
        tail = statistics.median(statistics.fmean(r["losses"][-10:]) for r in rs)
        warm = statistics.median(r["warmup_seconds"] for r in rs)
        wall = statistics.median(r["wall"] for r in rs)
        print(f"| {name} | {speed[name]:,.0f} | {100 * spread:.1f}% | {speed[name] / speed[ref]:.2f}x | "
              f"{vram[name] / 2**30:.2f} GiB | {vram[name] / vram[ref]:.2f}x | {last:.4f} | {tail:.4f} | "
              f"{warm:.1f} s | {wall:.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder (default: the 1B llama3 fixture)")
    parser.add_argument("--real", action="store_true", help="train the real SmolLM2-135M-Instruct instead")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--reply-words", type=int, default=600, help="longest synthetic reply, in words")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each configuration")
    parser.add_argument("--configs", default="ours,trl", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--warm-round", action="store_true",
                        help="first run every configuration once, warm-up plus 10 steps (printed, not counted): the "
                             "first process of a session on an idle GPU runs slower than the rest")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="gradient checkpointing for every side (default: unsloth_nb's choice for this GPU)")
    parser.add_argument("--child", choices=CONFIGS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    if not torch.cuda.is_available():
        sys.exit("This benchmark needs a CUDA GPU.")
    from unsloth_nb import fixtures

    if args.real:
        args.model = str(fixtures.build_real_model("smollm2"))
    elif args.model is None:
        args.model = str(fixtures.build_model("llama3", "1b"))
    if args.checkpointing is None:
        from unsloth_nb import train as T

        args.checkpointing = T.resolve(args.model, T.TrainSettings()).gradient_checkpointing
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        sys.exit(f"unknown configurations: {', '.join(sorted(unknown))}")
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    if args.warm_round:
        warm = argparse.Namespace(**{**vars(args), "steps": args.warmup + 10})
        for which in configs:
            r = spawn(warm, which)
            print(f"warm round, not counted: {which} {r['tokens'] / r['seconds']:,.0f} tokens/s", flush=True)
    for repeat in range(args.repeats):  # alternate, so that clocks and caches favour no side
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        for which in configs if repeat % 2 == 0 else reversed(configs):
            runs[which].append(spawn(args, which))
    report(args, runs)


if __name__ == "__main__":
    main()
