"""Fidelity check: does the fine-tune survive export? (``python -m unsloth_nb verify``)

The same prompts go through the reference (HF base + adapter through peft, or a merged folder) and through
each exported artifact (a merged folder through transformers, a GGUF through llama.cpp). Per artifact we
report, over every position of prompt + reference answer: top-1 next-token agreement (on the positions where
the reference has a clear favourite; near-ties flip under any rounding and say nothing), mean KL divergence,
and the relative RMS error of the centred logits (scale-free, so it also judges models whose distributions
are flat), plus the greedy continuations side by side. Thresholds depend on the export method; an artifact that misses
them is flagged with the usual causes checked (chat template, doubled BOS, tokenizer, wrong base).
"""

from __future__ import annotations

import argparse
import difflib
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from unsloth_nb.errors import UserError
from unsloth_nb.serve import gguf_scalars

DEFAULT_PROMPTS = ("What is the capital of Zorblax?", "Write one sentence about the sea.",
                   "List three colours.")


@dataclass(frozen=True)
class Threshold:
    """How close an export of a given method must stay to the reference."""

    min_top1: float
    """Least share of decisive positions whose most likely next token equals the reference's."""
    max_kl: float
    """Largest mean KL(reference || artifact) over positions, in nats."""
    max_logit_error: float
    """Largest relative RMS error of the centred logits (0.01 = 1% of the reference's spread)."""


# Measured on the fixtures (random weights, the hard case): a correct merge or bf16 GGUF lands near 0.005
# relative logit error, q8_0 near 0.025, q4_k_m near 0.19; an adapter merged with twice its scaling at 0.8.
THRESHOLDS: dict[str, Threshold] = {
    "merged": Threshold(0.98, 0.002, 0.02), "f32": Threshold(0.98, 0.002, 0.02),
    "bf16": Threshold(0.98, 0.002, 0.02), "f16": Threshold(0.98, 0.005, 0.02),
    "q8_0": Threshold(0.95, 0.02, 0.06), "q6_k": Threshold(0.90, 0.05, 0.12),
    "q5_k_m": Threshold(0.85, 0.08, 0.2), "q5_k_s": Threshold(0.85, 0.08, 0.2), "q5_0": Threshold(0.85, 0.08, 0.2),
    "q5_1": Threshold(0.85, 0.08, 0.2), "q4_k_m": Threshold(0.5, 0.15, 0.35), "q4_k_s": Threshold(0.5, 0.15, 0.35),
    "q4_0": Threshold(0.45, 0.2, 0.4), "q3_k_l": Threshold(0.4, 0.35, 0.5), "q3_k_m": Threshold(0.4, 0.35, 0.5),
    "q3_k_s": Threshold(0.35, 0.4, 0.55), "q2_k": Threshold(0.3, 0.6, 0.7),
}
DECISIVE = 0.1
"""A position is decisive when the reference's best logit beats the second by this share of the logits' spread."""
# Methods whose output should still give the taught answer word for word (used by the demo).
PRESERVING = ("merged", "f32", "bf16", "f16", "q8_0")


@dataclass
class ArtifactReport:
    """How one artifact compares with the reference."""

    path: Path
    method: str
    top1: float
    kl: float
    logit_error: float
    answers: list[str]
    threshold: Threshold
    problems: list[str] = field(default_factory=list)
    """What makes the artifact broken."""
    notes: list[str] = field(default_factory=list)
    """Caveats that do not make it broken (e.g. small tokenization differences)."""

    @property
    def within_thresholds(self) -> bool:
        t = self.threshold
        return self.top1 >= t.min_top1 and self.kl <= t.max_kl and self.logit_error <= t.max_logit_error

    @property
    def ok(self) -> bool:
        return self.within_thresholds and not self.problems


@dataclass
class VerifyReport:
    """The reference's answers and one :class:`ArtifactReport` per artifact."""

    prompts: list[str]
    reference_answers: list[str]
    artifacts: list[ArtifactReport]

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.artifacts)

    def __str__(self) -> str:
        lines = [f"{'artifact':40} {'method':8} {'top-1':>6} {'KL':>9} {'logit err':>9}  verdict"]
        for a in self.artifacts:
            verdict = "ok" if a.ok else "BROKEN"
            lines.append(f"{a.path.name[:40]:40} {a.method:8} {a.top1:6.1%} {a.kl:9.5f} {a.logit_error:9.2%}  "
                         f"{verdict}")
            lines.extend(f"    ! {p}" for p in a.problems)
            lines.extend(f"    note: {n}" for n in a.notes)
        for i, prompt in enumerate(self.prompts):
            lines.append(f"\nprompt: {prompt}\n  reference: {self.reference_answers[i]!r}")
            lines.extend(f"  {a.path.name}: {a.answers[i]!r}" for a in self.artifacts)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = []
        for a in self.artifacts:
            verdict = "ok" if a.ok else "broken: " + html.escape("; ".join(a.problems))
            rows.append(f"<tr><td>{html.escape(a.path.name)}</td><td>{a.method}</td><td>{a.top1:.1%}</td>"
                        f"<td>{a.kl:.5f}</td><td>{a.logit_error:.2%}</td>"
                        f"<td style='color:{'green' if a.ok else 'red'}'>{verdict}</td></tr>")
        return ("<table><tr><th>artifact</th><th>method</th><th>top-1 agreement</th><th>mean KL</th>"
                "<th>logit error</th><th>verdict</th>"
                f"</tr>{''.join(rows)}</table>")


class _Reference:
    """The HF model the artifacts are compared with (base + adapter through peft, or a folder)."""

    def __init__(self, model: Path, adapter: Path | None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(adapter if _has_tokenizer(adapter) else model)
        net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel

            vocab = len(self.tokenizer)
            if vocab > net.get_input_embeddings().weight.shape[0]:
                net.resize_token_embeddings(vocab, mean_resizing=False)
            net = PeftModel.from_pretrained(net, adapter)
        self.model = net.eval()

    def render(self, prompt: str) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        import torch

        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return out[0, len(ids):].tolist()

    def logits(self, ids: list[int]):
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0].double()


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


class _Tally:
    """Accumulates the comparison of artifact logits with reference logits over all prompts."""

    def __init__(self) -> None:
        self.agree = self.decisive = self.positions = 0
        self.kl = self.error = self.spread = 0.0

    def add(self, ref_logits, art_logits) -> None:
        import torch

        art_logits = art_logits.double()
        ref = torch.log_softmax(ref_logits, -1)
        art = torch.log_softmax(art_logits, -1)
        self.kl += float((ref.exp() * (ref - art)).sum(-1).clamp_min(0).sum())
        centred_ref = ref_logits - ref_logits.mean(-1, keepdim=True)
        centred_art = art_logits - art_logits.mean(-1, keepdim=True)
        self.error += float((centred_art - centred_ref).pow(2).sum())
        self.spread += float(centred_ref.pow(2).sum())
        best = ref_logits.topk(2, -1).values
        decisive = (best[:, 0] - best[:, 1]) > DECISIVE * centred_ref.std(-1)
        self.agree += int((ref_logits.argmax(-1) == art_logits.argmax(-1))[decisive].sum())
        self.decisive += int(decisive.sum())
        self.positions += len(ref_logits)

    def result(self) -> tuple[float, float, float]:
        """(top-1 agreement on decisive positions, mean KL, relative RMS logit error)."""
        top1 = self.agree / self.decisive if self.decisive else 1.0
        return top1, self.kl / max(self.positions, 1), (self.error / max(self.spread, 1e-30)) ** 0.5


_FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0", 2: "q4_0", 3: "q4_1", 8: "q5_0", 9: "q5_1", 10: "q2_k", 11: "q3_k_s",
               12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s", 17: "q5_k_m", 18: "q6_k",
               32: "bf16"}


def gguf_method(path: Path) -> str:
    """The export method of a GGUF file, from its general.file_type key."""
    return _method(gguf_scalars(path))


def _method(scalars: dict) -> str:
    file_type = scalars.get("general.file_type")
    return _FILE_TYPES.get(int(file_type), "unknown") if file_type is not None else "unknown"


def _gguf_report(ref: _Reference, path: Path, sequences: list[tuple[list[int], list[int]]],
                 max_new_tokens: int) -> ArtifactReport:
    import torch
    from llama_cpp import Llama

    scalars = gguf_scalars(path)  # not gguf-py's GGUFReader: it builds every vocabulary entry (10-20 s at 128k)
    method = _method(scalars)
    problems: list[str] = []
    template = scalars.get("tokenizer.chat_template")
    if template is not None and ref.tokenizer.chat_template and template != ref.tokenizer.chat_template:
        problems.append("the GGUF's chat template differs from the fine-tune's: servers will format prompts "
                        "differently from training (export with the adapter's tokenizer files)")
    longest = max(len(p) + len(a) for p, a in sequences)
    llm = Llama(model_path=str(path), n_ctx=max(512, longest + max_new_tokens + 8), logits_all=True, verbose=False,
                n_threads=None, seed=0)
    tally, answers, notes = _Tally(), [], []
    for prompt_ids, answer_ids in sequences:
        native = llm.tokenize(ref.tokenizer.decode(prompt_ids).encode(), add_bos=False, special=True)
        similarity = difflib.SequenceMatcher(a=native, b=prompt_ids, autojunk=False).ratio()
        if similarity < 0.8:
            problems.append("llama.cpp tokenizes the prompt very differently from the HF tokenizer: the GGUF's "
                            "vocabulary or pre-tokenizer (tokenizer.ggml.pre) does not match the fine-tune's")
        elif native != prompt_ids:
            notes.append(f"llama.cpp splits the templated prompt into {len(native)} tokens where HF has "
                         f"{len(prompt_ids)} (spacing around special tokens); served answers may differ slightly")
        ids = prompt_ids + answer_ids
        llm.reset()
        llm.eval(ids)
        tally.add(ref.logits(ids), torch.from_numpy(llm.scores[: len(ids)].copy()))
        llm.reset()
        out = []
        for token in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            if llm.token_eos() == token or token in _stop_ids(ref) or len(out) >= max_new_tokens:
                break
            out.append(token)
        answers.append(ref.tokenizer.decode(out, skip_special_tokens=True))
    llm.close()
    return ArtifactReport(path, method, *tally.result(), answers, THRESHOLDS.get(method, THRESHOLDS["q2_k"]),
                          sorted(set(problems)), sorted(set(notes)))


def _stop_ids(ref: _Reference) -> set[int]:
    ids = {ref.tokenizer.eos_token_id}
    config = getattr(ref.model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


def _folder_report(ref: _Reference, path: Path, sequences: list[tuple[list[int], list[int]]],
                   max_new_tokens: int) -> ArtifactReport:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    problems = []
    tokenizer = AutoTokenizer.from_pretrained(path)
    if ref.tokenizer.chat_template and tokenizer.chat_template != ref.tokenizer.chat_template:
        problems.append("the merged folder's chat template differs from the fine-tune's (copy the adapter's "
                        "tokenizer files into it)")
    tally, answers = _Tally(), []
    for prompt_ids, answer_ids in sequences:
        ids = prompt_ids + answer_ids
        with torch.no_grad():
            art = model(torch.tensor([ids])).logits[0]
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        tally.add(ref.logits(ids), art)
        answers.append(tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True))
    return ArtifactReport(path, "merged", *tally.result(), answers, THRESHOLDS["merged"], problems)


def verify(model: str | Path, artifacts: list[str | Path], adapter: str | Path | None = None,
           prompts: list[str] | None = None, max_new_tokens: int = 16) -> VerifyReport:
    """Compare each artifact (merged folder or .gguf) with the reference model (``model`` [+ ``adapter``])."""
    model = Path(model)
    adapter_path = Path(adapter) if adapter is not None else None
    if not (model / "config.json").is_file():
        raise UserError(f"{model} is not an HF model folder (no config.json). Fix: pass the base (with --adapter) "
                        "or the merged folder as the reference.")
    paths = [Path(a) for a in artifacts]
    for path in paths:
        if not path.exists():
            raise UserError(f"Artifact {path} does not exist. Fix: pass the merged folder or the .gguf file that "
                            "the export wrote.")
        if path.is_file() and path.suffix != ".gguf":
            raise UserError(f"{path} is neither a model folder nor a .gguf file. Fix: pass one of those.")
    ref = _Reference(model, adapter_path)
    prompts = list(prompts or DEFAULT_PROMPTS)
    sequences = []
    answers = []
    for prompt in prompts:
        ids = ref.render(prompt)
        answer = ref.greedy(ids, max_new_tokens)
        sequences.append((ids, answer))
        answers.append(ref.tokenizer.decode(answer, skip_special_tokens=True))
    reports = [(_gguf_report if p.is_file() else _folder_report)(ref, p, sequences, max_new_tokens) for p in paths]
    bos = ref.tokenizer.bos_token_id
    if bos is not None and any(ids[:2] == [bos, bos] for ids, _ in sequences):
        for report in reports:
            report.problems.append("the chat template writes BOS and the tokenizer adds another: prompts start "
                                   "with a doubled BOS (drop bos_token from the template or add_bos_token)")
    for report in reports:
        if not report.within_thresholds:
            report.problems.append(_hint(report))
    return VerifyReport(prompts, answers, reports)


def _hint(report: ArtifactReport) -> str:
    if report.logit_error > 0.5 or report.kl > 1.0 or report.top1 < 0.3:
        return ("far from the reference: usual causes are a wrong base model, an adapter merged with the wrong "
                "scaling, or swapped/renamed tensors")
    t = report.threshold
    return (f"outside the {report.method} thresholds (top-1 >= {t.min_top1:.0%}, KL <= {t.max_kl}, logit error <= "
            f"{t.max_logit_error:.0%}): try a higher-precision method")


def run_cli(args: argparse.Namespace) -> int:
    report = verify(args.model, args.artifacts, adapter=args.adapter)
    print(report)
    print(json.dumps({"ok": report.ok}))
    return 0 if report.ok else 1

