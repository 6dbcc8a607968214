"""How close the planner's RAM estimates are to the peak RSS really measured, for the streaming merge and the
GGUF export, on the fixture models (the tiny ones and the Llama-3.2-1B-shaped one).

Run: ``.venv/bin/python benchmarks/plan_vs_measured.py [--no-1b]`` (CPU; each step in its own fresh process).
The estimate should be at or above the measurement (a plan that under-counts lets Colab kill the kernel) and
not far above it (a plan that over-counts refuses work that would fit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MAKE_ADAPTER, measure  # noqa: E402

from unsloth_nb import fixtures  # noqa: E402

MERGE = """
from unsloth_nb.merge import MergeSettings, merge
merge({base!r}, {adapter!r}, {out!r}, MergeSettings(progress=False, device="cpu"))
"""

GGUF = """
from unsloth_nb.gguf import convert
convert.convert({model!r}, {methods!r}, {out!r}, progress=False, device="cpu")
"""

PLAN = """
import json
from unsloth_nb import plan
p = plan.make_plan({base!r}, {methods!r}, {out!r}, adapter={adapter!r}, device="cpu")
print(json.dumps({{s.name.split()[0]: s.ram for s in p.steps}}))
"""

METHODS = ["q8_0", "q4_k_m"]


def rows_for(kind: str, size: str | None, work: Path) -> list[str]:
    base = str(fixtures.build_model(kind, size) if size else fixtures.build_model(kind))
    label = f"{kind}{'-' + size if size else ''}"
    adapter = str(work / f"{label}-adapter")
    measure("make adapter", MAKE_ADAPTER.format(base=base, adapter=adapter))
    # Planned in a child process: a child's peak RSS counts the parent's memory at fork time, so the parent
    # (which runs every measured step) must stay small.
    code = PLAN.format(base=base, methods=METHODS, out=str(work / f"{label}-gguf"), adapter=adapter)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    estimate = json.loads(done.stdout.strip().splitlines()[-1])
    env = {"CUDA_VISIBLE_DEVICES": ""}
    merged = measure(f"{label} merge", MERGE.format(base=base, adapter=adapter, out=str(work / f"{label}-merged")),
                     env)
    gguf = measure(f"{label} gguf", GGUF.format(model=base, methods=METHODS, out=str(work / f"{label}-gguf")), env)
    out = []
    for step, m in (("merge", merged), ("gguf", gguf)):
        est = estimate[step] / 2**20
        out.append(f"| {label} | {step}{' ' + ','.join(METHODS) if step == 'gguf' else ''} | {est:.0f} MB | "
                   f"{m.peak_rss_mb:.0f} MB | {est / m.peak_rss_mb:.2f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-1b", action="store_true", help="only the tiny fixtures (fast)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    rows = ["| model | step | planned RAM | measured peak RSS | planned / measured |",
            "| --- | --- | --- | --- | --- |"]
    try:
        for kind in fixtures.KINDS:
            rows += rows_for(kind, None, work)
        if not args.no_1b:
            rows += rows_for("llama3", "1b", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("### Planner RAM estimates vs measured peak RSS (CPU)\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
