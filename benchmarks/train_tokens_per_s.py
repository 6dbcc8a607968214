"""Training throughput on a CUDA GPU: ``unsloth_nb.train`` defaults vs a plain trl SFTTrainer script.

Both train a LoRA adapter (r=16, alpha=16, all 7 projections) with the same batch, sequence length,
learning rate, precision and gradient checkpointing on the real-shaped 1B fixture
(``fixtures.build_model("llama3", "1b")``, Llama-3.2-1B dimensions) and the same synthetic chat data. Each
run is a separate process so that its peak GPU memory is its own. Tokens/s counts non-padding input tokens
after the warm-up steps.

    python benchmarks/train_tokens_per_s.py [--model DIR] [--steps 30] [--batch 8] [--seq-len 1024] [--repeats 2]

The plain trl script trains on every token: trl 1.16's ``assistant_only_loss`` cannot patch the Llama-3.1
template the fixture carries, while ``unsloth_nb.train`` masks the prompt itself, so its loss is over the
replies only (and its last loss differs).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 3
WORDS = ("alpha beta gamma delta river mountain cloud signal vector matrix token layer model answer "
         "question garden window music paper stone light quick slow bright dark north south east west").split()


def synthetic_rows(n: int, reply_words: int, seed: int = 0) -> list[dict]:
    """Chat rows with a short question and a long reply (the shape of a typical SFT set)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = " ".join(rng.choices(WORDS, k=24)) + "?"
        reply = " ".join(rng.choices(WORDS, k=rng.randint(reply_words // 2, reply_words))) + "."
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]})
    return rows


def meter():
    """A callback that records tokens and time between the end of warm-up and the end of training."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        start = tokens = seconds = None

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            torch.cuda.synchronize()
            if state.global_step == WARMUP:
                self.start = (time.perf_counter(), state.num_input_tokens_seen)
            elif state.global_step == state.max_steps and self.start:
                self.seconds = time.perf_counter() - self.start[0]
                self.tokens = state.num_input_tokens_seen - self.start[1]

    return Meter()


def run_ours(model: str, rows: list[dict], args: argparse.Namespace, out: Path) -> dict:
    from unsloth_nb import train as T

    settings = T.TrainSettings(max_steps=args.steps, batch_size=args.batch, grad_accumulation=1,
                               max_seq_len=args.seq_len, save_steps=10**6)
    m = meter()
    result = T.train(model, rows, out / "ours", settings=settings, progress=False, callbacks=[m])
    return {"tokens": m.tokens, "seconds": m.seconds, "loss": result.loss_history[-1],
            "gradient_checkpointing": result.settings["gradient_checkpointing"],
            "precision": result.settings["precision"]}


def run_trl(model: str, rows: list[dict], args: argparse.Namespace, out: Path, checkpointing: bool,
            precision: str) -> dict:
    """What a plain trl script does: load, LoraConfig, SFTConfig, SFTTrainer(...).train()."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, device_map={"": 0})
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    config = SFTConfig(output_dir=str(out / "trl"), max_steps=args.steps, per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=1, learning_rate=2e-4, warmup_steps=5, lr_scheduler_type="linear",
                       max_length=args.seq_len, bf16=precision == "bf16", fp16=precision == "fp16", seed=3407,
                       gradient_checkpointing=checkpointing, optim="adamw_torch", logging_steps=1,
                       save_strategy="no", report_to="none", disable_tqdm=True,
                       include_num_input_tokens_seen="non_padding")
    m = meter()
    trainer = SFTTrainer(model=base, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora, callbacks=[m])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"tokens": m.tokens, "seconds": m.seconds, "loss": losses[-1]}


def child(args: argparse.Namespace) -> None:
    import torch

    rows = synthetic_rows(args.steps * args.batch, args.reply_words)
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        if args.child == "ours":
            stats = run_ours(args.model, rows, args, Path(tmp))
        else:
            stats = run_trl(args.model, rows, args, Path(tmp), args.checkpointing == "on", args.precision)
    stats["peak_vram"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(stats))


def spawn(args: argparse.Namespace, which: str, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--model", args.model, "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--reply-words", str(args.reply_words), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.exit(f"{which} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder (default: the 1B llama3 fixture)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--reply-words", type=int, default=600, help="longest synthetic reply, in words")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best is shown")
    parser.add_argument("--child", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", choices=["on", "off"], default="off", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    if not torch.cuda.is_available():
        sys.exit("This benchmark needs a CUDA GPU.")
    if args.model is None:
        from unsloth_nb import fixtures

        args.model = str(fixtures.build_model("llama3", "1b"))
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for _ in range(args.repeats):  # alternate, so that clock and cache warm-up do not favour one side
        ours = spawn(args, "ours", [])
        runs["ours"].append(ours)
        runs["trl"].append(spawn(args, "trl", ["--checkpointing", "on" if ours["gradient_checkpointing"] else "off",
                                               "--precision", ours["precision"]]))
    ours, trl = (max(runs[k], key=lambda r: r["tokens"] / r["seconds"]) for k in ("ours", "trl"))
    print(f"{torch.cuda.get_device_name(0)}; {args.model}; batch {args.batch}, max {args.seq_len} tokens, "
          f"{args.steps} steps ({WARMUP} warm-up), best of {args.repeats}, {ours['precision']}, gradient checkpointing "
          f"{'on' if ours['gradient_checkpointing'] else 'off'}")
    print(f"{'run':<28}{'tokens/s':>10}{'peak VRAM':>12}{'last loss':>11}")
    for name, r in (("unsloth_nb.train defaults", ours), ("plain trl SFTTrainer", trl)):
        print(f"{name:<28}{r['tokens'] / r['seconds']:>10.0f}{r['peak_vram'] / 2**30:>10.2f} GiB{r['loss']:>11.3f}")
    print(f"speed-up: {ours['tokens'] / ours['seconds'] / (trl['tokens'] / trl['seconds']):.2f}x")


if __name__ == "__main__":
    main()
