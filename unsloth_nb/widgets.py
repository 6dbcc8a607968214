"""Notebook panels on top of the stage modules: quantization picker, step panel, live loss plot, chat box.

Every panel is a thin layer over plain objects that work without ipywidgets (papermill, Kaggle's "Save & Run
All", a terminal): ``QuantPicker.selected`` is a Python list, ``StepPanel.run()`` runs the step, ``LossPlot``
keeps the points, ``ChatBox.send(text)`` asks the server. ipywidgets is imported only when a widget is built,
and only its common API (ipywidgets 7.7 as Colab ships it and 8.x) is used.
"""

from __future__ import annotations

import functools
import html
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unsloth_nb.errors import UserError
from unsloth_nb.runtime import Runtime, detect, gb

FIXTURE_PREFIX = "fixture:"
"""``MODEL = "fixture:llama3"`` builds the tiny offline test model of that kind (see unsloth_nb.fixtures)."""

HUB_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt")
"""Files fetched from the Hugging Face Hub for a model: config, weights, tokenizer, chat template."""

GREEN, RED = "#080", "#b00"


def _ipywidgets() -> Any:
    """ipywidgets, imported on first use so that the package imports without it."""
    try:
        import ipywidgets
    except ImportError as exc:
        raise UserError("The notebook panels need ipywidgets. Fix: `pip install ipywidgets`, or use the plain "
                        "functions (picker.selected, panel.run(), server.chat) without widgets.") from exc
    return ipywidgets


def _display(obj: Any) -> None:
    """Show ``obj`` in a notebook; print its text form elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        print(obj)
        return
    if get_ipython() is None:
        print(obj)
    else:
        display(obj)


# ----------------------------------------------------------------------------------------------- models


def model_folder(model: str | os.PathLike) -> Path:
    """A local folder for ``model``: itself when it is a folder, the tiny offline model for
    ``"fixture:<kind>"``, else a Hub id downloaded (config, safetensors, tokenizer only) to the HF cache."""
    text = str(model)
    if text.startswith(FIXTURE_PREFIX):
        from unsloth_nb import fixtures

        return fixtures.build_model(text[len(FIXTURE_PREFIX):])
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise UserError(f"Model {text!r} is neither a folder nor a Hub id like 'unsloth/Llama-3.2-1B-Instruct'. "
                        f"Fix: set MODEL to one of those.")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(text, allow_patterns=list(HUB_PATTERNS)))


# ------------------------------------------------------------------------------------ quantization picker


@dataclass(frozen=True)
class QuantRow:
    """One quantization method as the picker shows it for one model and one target folder."""

    name: str
    """Method name, e.g. "q4_k_m"."""
    description: str
    """One sentence on its size/quality trade-off (from the recipes)."""
    size: int
    """Bytes of this model's GGUF file for the method."""
    exact: bool
    """True when ``size`` is the converter's exact layout, False for an estimate."""
    fits: bool
    """Whether this file alone (plus the merged copy when one is needed) fits the folder's free space."""


@functools.lru_cache(maxsize=8)
def _all_gguf_sizes(model_dir: Path, stamp: tuple) -> dict[str, tuple[int, bool]]:
    """(bytes, exact) of every method's GGUF file for ``model_dir``; cached while its files are unchanged
    (``stamp``), so re-running a picker cell does not re-read the tokenizer."""
    from unsloth_nb import plan
    from unsloth_nb.gguf import recipes

    return plan.gguf_sizes(plan.size_model(model_dir), list(recipes.METHODS))


def _stamp(folder: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))


LOW_BIT_METHODS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "iq4_nl", "iq4_xs", "q4_k_s", "q4_k_m")
"""Methods of 4 bits or fewer per weight, where an importance matrix matters most (it is on by default)."""


class QuantPicker:
    """Choose GGUF methods for one model with each file's size and whether it fits ``out_dir``.

    ``selected`` is a plain list of method names for the next cell. With an ``adapter``, the merged 16-bit
    copy counts against the disk unless ``fused`` is on (GGUF straight from base + adapter); the fused path
    is switched on by default when the merged copy and the selection do not fit but the selection alone does.

    With an ``imatrix`` file (computed from the training data), ``use_imatrix`` says whether the quantized files
    are calibrated with it; it starts on when a method of 4 bits or fewer is selected, where it matters most, and
    ``imatrix`` is then the file to pass on (else None).
    """

    def __init__(self, model: str | os.PathLike, out_dir: str | os.PathLike, selected: Iterable[str] = ("q4_k_m",),
                 *, adapter: str | os.PathLike | None = None, runtime: Runtime | None = None,
                 imatrix: str | os.PathLike | None = None) -> None:
        from unsloth_nb import plan
        from unsloth_nb.gguf import recipes

        self.runtime = runtime or detect()
        self.out_dir = Path(os.path.abspath(out_dir))
        self.adapter = Path(adapter) if adapter else None
        size = plan.size_model(model)
        self.model_dir = size.path
        self.sizes = _all_gguf_sizes(size.path, _stamp(size.path))
        self.descriptions = {name: m.description for name, m in recipes.METHODS.items()}
        if self.adapter:
            plan.size_adapter(self.adapter)  # a UserError now when it is not an adapter folder
        self.merged_bytes = size.bytes_16bit + size.extra_bytes if self.adapter else 0
        self.free = self.runtime.free_disk(self.out_dir)
        self.selected: list[str] = plan.parse_methods(list(selected))
        self.fused = bool(self.adapter) and not self._fits(self.selected, False) and self._fits(self.selected, True)
        self.imatrix_file = Path(imatrix) if imatrix else None
        self.use_imatrix = self.imatrix_file is not None and any(m in LOW_BIT_METHODS for m in self.selected)
        self._widget: Any = None
        self._syncing = False

    @property
    def imatrix(self) -> Path | None:
        """The importance matrix to quantize with (``convert(..., imatrix=picker.imatrix)``), or None."""
        return self.imatrix_file if self.use_imatrix else None

    def _fits(self, methods: list[str], fused: bool) -> bool:
        extra = 0 if fused else self.merged_bytes
        return sum(self.sizes[m][0] for m in methods) + extra <= self.free

    @property
    def rows(self) -> list[QuantRow]:
        """Every method in display order, with this model's size and the fit flag."""
        extra = 0 if self.fused else self.merged_bytes
        return [QuantRow(name, self.descriptions[name], size, exact, size + extra <= self.free)
                for name, (size, exact) in self.sizes.items()]

    @property
    def total(self) -> int:
        """Bytes the selection writes (with the merged copy unless fused)."""
        return sum(self.sizes[m][0] for m in self.selected) + (0 if self.fused else self.merged_bytes)

    @property
    def fits(self) -> bool:
        """Whether everything selected fits the folder's free space."""
        return self.total <= self.free

    def set_selected(self, methods: Iterable[str]) -> None:
        """Select exactly ``methods`` (keeps the checkboxes in step when the widget exists)."""
        from unsloth_nb import plan

        chosen = plan.parse_methods(list(methods))
        if self._widget is not None:
            self._syncing = True
            try:
                for name, box in self.checkboxes.items():
                    box.value = name in chosen
            finally:
                self._syncing = False
        self.selected = chosen
        self._refresh()

    def summary(self) -> str:
        """One line: the selection, its total and whether it fits."""
        names = ", ".join(self.selected) or "nothing"
        merged = "" if self.fused or not self.adapter else f" (with the {gb(self.merged_bytes)} merged copy)"
        verdict = "fits" if self.fits else f"does NOT fit ({gb(self.total - self.free)} short)"
        return f"selected: {names}; total {gb(self.total)}{merged}; {gb(self.free)} free in {self.out_dir}: {verdict}"

    def advice(self) -> str:
        """What to do when the selection does not fit (empty when it fits)."""
        if self.fits:
            return ""
        if self.adapter and not self.fused and self._fits(self.selected, True):
            return ("The merged 16-bit copy is what does not fit: tick 'fused' to write the GGUF straight from the "
                    "base model and the adapter, with no merged copy.")
        return "Pick fewer or smaller methods, or choose a folder with more free space (OUT_DIR)."

    def __str__(self) -> str:
        lines = [f"GGUF methods for {self.model_dir.name} -> {self.out_dir}"]
        for r in self.rows:
            mark = "x" if r.name in self.selected else " "
            size = gb(r.size) if r.exact else f"~{gb(r.size)}"
            lines.append(f"[{mark}] {r.name:<7} {size:>9}  {'fits' if r.fits else 'too big'}  {r.description}")
        if self.adapter:
            lines.append(f"fused (no merged copy): {'yes' if self.fused else 'no'}")
        if self.imatrix_file is not None:
            lines.append(f"calibrated with the importance matrix {self.imatrix_file.name}: "
                         f"{'yes' if self.use_imatrix else 'no'}")
        lines.append(self.summary())
        if self.advice():
            lines.append(self.advice())
        return "\n".join(lines)

    # -- widget ----------------------------------------------------------------------------------------------

    @property
    def widget(self) -> Any:
        """The ipywidgets view (built on first use): one checkbox per method, the total, the fused switch."""
        if self._widget is None:
            self._build()
        return self._widget

    def _build(self) -> None:
        w = _ipywidgets()
        self.checkboxes: dict[str, Any] = {}
        self.size_labels: dict[str, Any] = {}
        rows = []
        for r in self.rows:
            box = w.Checkbox(value=r.name in self.selected, description=r.name)
            box.observe(self._on_change, names="value")
            self.checkboxes[r.name] = box
            self.size_labels[r.name] = w.HTML()
            rows.append(w.HBox([box, self.size_labels[r.name], w.HTML(html.escape(r.description))]))
        self.fused_box = w.Checkbox(value=self.fused, description="fused: GGUF straight from base + adapter")
        self.fused_box.observe(self._on_change, names="value")
        self.imatrix_box = w.Checkbox(value=self.use_imatrix,
                                      description="calibrate the quantized files with your data's importance matrix")
        self.imatrix_box.observe(self._on_change, names="value")
        self.total_label = w.HTML()
        header = w.HTML(f"<b>GGUF methods for {html.escape(self.model_dir.name)}</b> &rarr; "
                        f"{html.escape(str(self.out_dir))} ({gb(self.free)} free)")
        parts = ([header, *rows] + ([self.fused_box] if self.adapter else [])
                 + ([self.imatrix_box] if self.imatrix_file is not None else []) + [self.total_label])
        self._widget = w.VBox(parts)
        self._refresh()

    def _on_change(self, change: dict) -> None:
        if self._syncing:
            return
        self.selected = [name for name, box in self.checkboxes.items() if box.value]
        self.fused = bool(self.adapter) and self.fused_box.value
        self.use_imatrix = self.imatrix_file is not None and self.imatrix_box.value
        self._refresh()

    def _refresh(self) -> None:
        if self._widget is None:
            return
        for r in self.rows:
            size = gb(r.size) if r.exact else f"~{gb(r.size)}"
            color, word = (GREEN, "fits") if r.fits else (RED, "too big")
            self.size_labels[r.name].value = f"<span style='color:{color}'>{size} &middot; {word}</span>"
        color = GREEN if self.fits else RED
        advice = f"<br>{html.escape(self.advice())}" if self.advice() else ""
        self.total_label.value = f"<span style='color:{color}'><b>{html.escape(self.summary())}</b>{advice}</span>"

    def _ipython_display_(self) -> None:
        try:
            widget = self.widget
        except UserError:
            print(self)
            return
        from IPython.display import display

        display(widget)


# ------------------------------------------------------------------------------------------------ step panel


class StepPanel:
    """One step in a box: its plan, a Run button, a progress bar, the step's log, and a result line.

    ``run()`` does the step without any widget (batch runs); the button calls the same ``run()``.
    """

    def __init__(self, title: str, step: Callable[[], Any], *, plan: Any = None,
                 summary: Callable[[Any], str] = str) -> None:
        self.title = title
        self.step = step
        self.plan = plan
        self.summarize = summary
        self.result: Any = None
        self.error: BaseException | None = None
        self.runs = 0
        self._widget: Any = None

    @property
    def widget(self) -> Any:
        """The ipywidgets view, built on first use."""
        if self._widget is None:
            w = _ipywidgets()
            plan_html = self.plan._repr_html_() if hasattr(self.plan, "_repr_html_") else (
                f"<pre>{html.escape(str(self.plan))}</pre>" if self.plan is not None else "")
            self.button = w.Button(description=f"Run {self.title}")
            self.button.on_click(lambda _button: self.run())
            self.progress = w.IntProgress(value=0, min=0, max=1)
            self.log = w.Output()
            self.result_label = w.HTML()
            self._widget = w.VBox([w.HTML(f"<b>{html.escape(self.title)}</b>{plan_html}"),
                                   w.HBox([self.button, self.progress]), self.log, self.result_label])
        return self._widget

    def run(self) -> Any:
        """Run the step (once more on each call); returns its result, raises its error."""
        self.runs += 1
        if self._widget is None:
            print(f"[{self.title}] running ...")
            self.result = self.step()
            print(f"[{self.title}] {self.summarize(self.result)}")
            return self.result
        self.button.disabled = True
        self.progress.value, self.progress.bar_style = 0, "info"
        started = time.perf_counter()
        try:
            with self.log:
                self.result = self.step()
            self.error = None
            self.progress.value, self.progress.bar_style = 1, "success"
            self.result_label.value = (f"<span style='color:{GREEN}'>done in {time.perf_counter() - started:.1f} s: "
                                       f"{html.escape(self.summarize(self.result))}</span>")
            return self.result
        except BaseException as exc:
            self.error = exc
            self.progress.bar_style = "danger"
            self.result_label.value = f"<span style='color:{RED}'>{html.escape(str(exc))}</span>"
            raise
        finally:
            self.button.disabled = False

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def run_step(title: str, step: Callable[[], Any], *, plan: Any = None, summary: Callable[[Any], str] = str) -> Any:
    """Show a :class:`StepPanel` (a plain log without ipywidgets) and run it now, so that "Run all" and batch
    runs do the step; the panel's button runs it again. Returns the step's result."""
    panel = StepPanel(title, step, plan=plan, summary=summary)
    try:
        _display(panel.widget)
    except UserError:
        if plan is not None:
            print(plan)
    return panel.run()


# ------------------------------------------------------------------------------------------------ loss plot


class LossPlot:
    """The training loss, redrawn in an Output widget at every logging step.

    Give ``callback()`` to a transformers Trainer (``callbacks=[...]``), or call ``add(step, loss)``.
    Without ipywidgets the points are kept and ``draw()`` shows the final figure.
    """

    def __init__(self, title: str = "training loss") -> None:
        self.title = title
        self.steps: list[int] = []
        self.losses: list[float] = []
        try:
            self.output: Any = _ipywidgets().Output()
        except UserError:
            self.output = None

    def add(self, step: int, loss: float) -> None:
        """Record one point and redraw the live plot."""
        self.steps.append(int(step))
        self.losses.append(float(loss))
        if self.output is not None:
            with self.output:
                from IPython.display import clear_output

                clear_output(wait=True)
                self.draw()

    def draw(self) -> Any:
        """Draw the curve with matplotlib (shown inline in a notebook); returns the figure."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(self.steps, self.losses, marker="o" if len(self.steps) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.title)
        fig.tight_layout()
        _display(fig)
        plt.close(fig)
        return fig

    def callback(self) -> Any:
        """A ``transformers.TrainerCallback`` that feeds this plot."""
        from transformers import TrainerCallback

        plot = self

        class _LossCallback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    plot.add(state.global_step, logs["loss"])

        return _LossCallback()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if self.output is not None:
            display(self.output)


def train_with_plot(model: str | os.PathLike, data: Any, out_dir: str | os.PathLike, **kwargs: Any) -> Any:
    """``train.train(...)`` with a live loss plot under the cell (when the adapter was already finished, the
    plot shows its saved loss history). Keyword arguments go to ``train.train``; returns the TrainResult."""
    from unsloth_nb import train

    plot = LossPlot()
    _display(plot)
    kwargs["callbacks"] = [*kwargs.get("callbacks", ()), plot.callback()]
    result = train.train(model, data, out_dir, **kwargs)
    if not plot.steps and result.loss_steps:
        plot.steps, plot.losses = list(result.loss_steps), list(result.loss_history)
        if plot.output is not None:
            with plot.output:
                plot.draw()
        else:
            plot.draw()
    return result


# ------------------------------------------------------------------------------------------------- chat box


class ChatBox:
    """A text box and a Send button that ask a running server (``serve.Server``) and show the answers.

    When the server serves more than one model (a base and its LoRA adapters: ``server.models``), a dropdown
    picks the one asked; ``model`` is the one picked (default: the base), and ``send(text, model=...)`` asks
    another without a widget.
    """

    def __init__(self, server: Any, *, max_tokens: int = 128, model: str | None = None) -> None:
        self.server = server
        self.max_tokens = max_tokens
        self.models: list[str] = list(getattr(server, "models", None) or [server.model])
        if model is not None and model not in self.models:
            raise UserError(f"The server does not serve a model called {model!r}; it serves "
                            f"{', '.join(map(repr, self.models))}. Fix: pass one of those as model=.")
        self.model: str = model or self.models[0]
        """The model the box asks (the dropdown's choice when there is one)."""
        self.history: list[tuple[str, str]] = []
        self.asked: list[str] = []
        """The model each entry of ``history`` was asked."""
        self._widget: Any = None

    def send(self, text: str, model: str | None = None) -> str:
        """Ask the server (one user message) with ``model`` (default: :attr:`model`); returns the answer and
        shows it in the widget when built."""
        model = model or self.model
        answer = self.server.chat(text, max_tokens=self.max_tokens, model=model)
        self.history.append((text, answer))
        self.asked.append(model)
        if self._widget is not None:
            with self.output:
                print(f"you: {text}\n{model if len(self.models) > 1 else 'model'}: {answer}\n")
        return answer

    @property
    def widget(self) -> Any:
        """The ipywidgets view, built on first use (with a model dropdown when there is a choice)."""
        if self._widget is None:
            w = _ipywidgets()
            self.text = w.Text(placeholder="Ask the model something")
            self.button = w.Button(description="Send")
            self.output = w.Output()
            self.button.on_click(lambda _button: self._send_box())
            row = [self.text, self.button]
            self.picker: Any = None
            if len(self.models) > 1:
                self.picker = w.Dropdown(options=self.models, value=self.model, description="model")
                self.picker.observe(self._on_pick, names="value")
                row.insert(0, self.picker)
            self._widget = w.VBox([w.HBox(row), self.output])
        return self._widget

    def _on_pick(self, change: dict) -> None:
        self.model = change["new"]

    def _send_box(self) -> None:
        text = self.text.value.strip()
        if not text:
            return
        self.text.value = ""
        try:
            self.send(text)
        except UserError as exc:
            with self.output:
                print(f"error: {exc}")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


# ------------------------------------------------------------------------------------------ sharing results


def compare_adapters(model_dir: str | os.PathLike, out_dir: str | os.PathLike, question: str, *,
                     engine: str = "vllm", max_tokens: int = 48, runtime: Runtime | None = None) -> dict[str, str]:
    """Serve the base model with every adapter found under ``out_dir`` (``serve.find_adapters``) as adapters, on
    one server with no merged copy, ask each model (the base too) ``question``, print the answers side by side and
    stop the server; returns model name -> answer.

    vLLM serves the base's HF folder; llama.cpp needs a base GGUF, so a Q8_0 of the base is written (once) under
    ``out_dir/base-gguf`` and each adapter is converted to a LoRA GGUF next to the server's log."""
    from unsloth_nb import serve

    out = Path(out_dir)
    adapters = serve.find_adapters(out)
    if not adapters:
        raise UserError(f"No LoRA adapter folder under {out}. Fix: train one first (the train step writes "
                        f"{out / 'adapter'}).")
    base: Path = Path(model_dir)
    if engine == "llama.cpp":
        from unsloth_nb.gguf import convert

        base = convert.convert(model_dir, ["q8_0"], out / "base-gguf", progress=False)[0].path
    server = serve.serve(base, engine=engine, adapters=adapters, base=model_dir if engine == "llama.cpp" else None,
                         log_dir=out, runtime=runtime, show_log=False)
    try:
        answers = {name: server.chat(question, max_tokens=max_tokens, model=name) for name in server.models}
    finally:
        server.stop()
    width = max(len(n) for n in answers)
    print(f"Q: {question}")
    for name, answer in answers.items():
        print(f"{name:<{width}}  {' '.join(answer.split())}")
    return answers


def imatrix_gain(gains: Iterable[Any]) -> Any:
    """Plot, per method, the layer output error on your data against bits per weight, without and with the
    importance matrix (``imatrix.gain``), and print the numbers; returns the figure."""
    import matplotlib.pyplot as plt

    gains = list(gains)
    for g in gains:
        print(f"{g.method:<7} {g.bits_per_weight:4.2f} bits/weight  error {g.error:.2e} -> {g.error_with:.2e} "
              f"with the imatrix ({g.reduction:.0%} lower)")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [g.bits_per_weight for g in gains]
    ax.plot(x, [g.error for g in gains], "o", color=RED, label="without imatrix")
    ax.plot(x, [g.error_with for g in gains], "o", color=GREEN, label="with your data's imatrix")
    for g in gains:
        ax.annotate(g.method, (g.bits_per_weight, g.error), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("layer output error on your data")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    return fig


def share_hints(files: Iterable[Any], repo: str = "", runtime: Runtime | None = None) -> list[str]:
    """How to get the GGUF files off this machine (printed); uploads them to the Hub repo ``repo`` when given
    (needs a Hugging Face token with write access). Returns the printed lines."""
    rt = runtime or detect()
    paths = [Path(getattr(f, "path", f)) for f in files]
    lines = [f"{p} ({gb(p.stat().st_size)})" for p in paths]
    if rt.platform == "colab":
        lines.append("download: from google.colab import files; files.download(PATH)  (or copy to Google Drive)")
    elif rt.platform == "kaggle":
        lines.append("download: files under /kaggle/working appear in the notebook's Output tab after "
                     "'Save Version'; files under /tmp are gone when the session ends")
    else:
        lines.append("the files are on this machine's disk: copy them where you need them")
    if repo:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        for p in paths:
            api.upload_file(path_or_fileobj=str(p), path_in_repo=p.name, repo_id=repo)
        lines.append(f"uploaded {len(paths)} file(s) to https://huggingface.co/{repo}")
    else:
        lines.append("upload: set HF_REPO = 'your-name/model-GGUF' (and log in with huggingface_hub.login()) "
                     "and re-run this cell")
    for line in lines:
        print(line)
    return lines


def files_summary(results: Iterable[Any]) -> str:
    """One line per written file (``convert.convert`` results or paths): name and size."""
    parts = []
    for r in results:
        path = Path(getattr(r, "path", r))
        parts.append(f"{path.name} ({gb(path.stat().st_size)})")
    return ", ".join(parts) or "no files"
