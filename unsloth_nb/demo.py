"""The offline demo (``python -m unsloth_nb demo``): the whole pipeline on a built-in tiny model, on a CPU.

fixture -> train (teaches a made-up fact) -> merge -> GGUF (bf16, q8_0, q4_k_m) -> verify -> serve the merged
folder with vLLM and the q8_0 GGUF with llama.cpp -> ask the taught question everywhere -> summary table.
It writes only into its own folder (default ``./unsloth_nb_demo``); a re-run reuses the finished steps
(every step's output appears atomically, so what exists is complete) and ``--fresh`` starts over. Exit
status 0 only when the taught answer came back from every artifact whose method is expected to keep it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unsloth_nb import fixtures
from unsloth_nb.errors import UserError

FIXTURE = "llama3"
METHODS = ("bf16", "q8_0", "q4_k_m")
MUST_KEEP = ("hf+adapter", "merged on vLLM", "Q8_0 GGUF on llama.cpp", "BF16 GGUF on llama.cpp")
"""Artifacts whose answer must be the taught one; lossier quantizations are reported, not required."""


@dataclass
class StepRecord:
    """One row of the summary table."""

    step: str
    seconds: float
    peak_rss_mb: float
    note: str = ""


@dataclass
class Demo:
    """The demo's folder and what it has done so far."""

    folder: Path
    records: list[StepRecord] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)

    def step(self, name: str, action: Callable[[], Any], note: Callable[[Any], str] = lambda _: "") -> Any:
        """Run one step while sampling the RSS of this process and its children (servers included)."""
        sampler = _PeakSampler()
        started = time.perf_counter()
        print(f"\n== {name}", flush=True)
        with sampler:
            result = action()
        self.records.append(StepRecord(name, time.perf_counter() - started, sampler.peak / 2**20, note(result)))
        return result

    def summary(self) -> str:
        lines = ["", f"{'step':28} {'time':>8} {'peak RSS':>10}  notes", "-" * 78]
        for r in self.records:
            lines.append(f"{r.step:28} {r.seconds:7.1f}s {r.peak_rss_mb:8.0f}MB  {r.note}")
        total = sum(r.seconds for r in self.records)
        peak = max((r.peak_rss_mb for r in self.records), default=0)
        lines.append("-" * 78)
        lines.append(f"{'total':28} {total:7.1f}s {peak:8.0f}MB")
        return "\n".join(lines)


class _PeakSampler:
    """Samples the summed RSS of this process tree every 50 ms; ``peak`` is the highest seen (bytes)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.05)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _taught(answer: str) -> bool:
    from unsloth_nb.train import DEMO_ANSWER

    return DEMO_ANSWER.lower().rstrip(".") in answer.lower()


def run(folder: str | Path = "unsloth_nb_demo", fresh: bool = False) -> bool:
    """Run the demo; True when every artifact in :data:`MUST_KEEP` gave the taught answer."""
    from unsloth_nb import serve, train, verify
    from unsloth_nb.gguf import convert
    from unsloth_nb.merge import MergeSettings, merge

    root = Path(folder).resolve()
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file; the demo needs a folder of its own. Fix: pass another --dir.")
    if root.is_dir() and any(root.iterdir()) and not (root / ".unsloth_nb_demo").is_file():
        raise UserError(f"{root} already holds files the demo did not make, and the demo never writes among your "
                        "files. Fix: pass a new or empty folder with --dir.")
    if fresh and root.exists():
        if not (root / ".unsloth_nb_demo").is_file():
            raise UserError(f"{root} was not made by the demo, so --fresh will not delete it. Fix: pass another "
                            "--dir, or remove the folder yourself.")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / ".unsloth_nb_demo").write_text("folder made by `python -m unsloth_nb demo`\n")
    demo = Demo(root)
    question = train.DEMO_QUESTION
    print(f"unsloth_nb demo in {root}\nThe fine-tune teaches: {question!r} -> {train.DEMO_ANSWER!r}")

    base = demo.step("fixture model", lambda: fixtures.build_model(FIXTURE),
                     lambda p: f"tiny {FIXTURE} with its real tokenizer")
    adapter_dir = root / "adapter"
    result = demo.step("train (LoRA)", lambda: train.train(base, train.demo_dataset(), adapter_dir,
                                                           lora=train.DEMO_LORA, settings=train.DEMO_SETTINGS),
                       lambda r: f"{r.steps} steps, loss {r.loss_history[0]:.2f} -> {r.loss_history[-1]:.2f}")
    demo.answers["hf+adapter"] = demo.step("ask HF + adapter", lambda: _ask_peft(base, result.adapter_dir,
                                                                                 question),
                                           lambda a: repr(a[:48]))

    merged_dir = root / "merged"
    demo.step("merge (streaming)", lambda: merge(base, result.adapter_dir, merged_dir, MergeSettings()),
              lambda r: "kept from an earlier run" if r.reused else f"{r.total_bytes / 1e6:.0f} MB")
    gguf_dir = root / "gguf"
    written = demo.step("gguf " + ",".join(METHODS), lambda: convert.convert(merged_dir, METHODS, gguf_dir),
                        lambda rs: ", ".join(f"{Path(r.path).name} {r.size / 1e6:.0f} MB"
                                             + (" (kept)" if r.reused else "") for r in rs))
    ggufs = {r.method: Path(r.path) for r in written}

    report = demo.step("verify", lambda: verify.verify(base, [merged_dir, *ggufs.values()],
                                                       adapter=result.adapter_dir, prompts=[question]),
                       lambda r: "all within thresholds" if r.ok else "some artifacts off: see above")
    print(report)
    for method, artifact in zip(METHODS, report.artifacts[1:], strict=True):
        demo.answers[f"{method.upper()} GGUF (in-process llama.cpp)"] = artifact.answers[0]

    with demo.step("serve merged on vLLM", lambda: serve.serve(merged_dir, engine="vllm", show_log=False),
                   lambda s: s.url) as server:
        demo.answers["merged on vLLM"] = demo.step("ask vLLM", lambda: server.chat(question, max_tokens=24),
                                                   lambda a: repr(a[:48]))
    for method in ("q8_0", "bf16"):
        with demo.step(f"serve {method.upper()} on llama.cpp",
                       lambda m=method: serve.serve(ggufs[m], engine="llama.cpp", show_log=False),
                       lambda s: s.url) as server:
            answer = demo.step(f"ask llama.cpp {method.upper()}", lambda: server.chat(question, max_tokens=24),
                               lambda a: repr(a[:48]))
            demo.answers[f"{method.upper()} GGUF on llama.cpp"] = answer

    print(demo.summary())
    print(f"\nAnswers to {question!r}:")
    ok = True
    for name, answer in demo.answers.items():
        required = name in MUST_KEEP
        good = _taught(answer)
        ok &= good or not required
        verdict = "taught answer" if good else ("MISSING (required)" if required else "differs (lossy method)")
        print(f"  {name:40} {verdict:22} {answer.strip()!r}")
    print("\nRequired to keep the taught answer: " + ", ".join(MUST_KEEP) + ".")
    print("demo: OK" if ok else "demo: FAILED: the taught answer did not survive every required export")
    return ok


def _ask_peft(base: Path, adapter: Path, question: str) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_cli(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return 0 if run(args.dir, fresh=args.fresh) else 1
