"""The notebook panels without a browser: the quantization picker's sizes and fit flags for a faked Kaggle
runtime, its observe callbacks, the step panel's button, the loss plot, the chat box against a real llama.cpp
server, and the install helpers' choices (vLLM pin, torch held) for Colab, Kaggle and CPU machines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from unsloth_nb import install, plan, serve, widgets
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import convert, recipes
from unsloth_nb.runtime import GPU, Runtime

GB = 10**9
T4 = tuple(GPU(i, "Tesla T4", 15 * 2**30, 14 * 2**30, (7, 5)) for i in range(2))
P100 = (GPU(0, "Tesla P100-PCIE-16GB", 16 * 2**30, 16 * 2**30, (6, 0)),)
WORKING = "/kaggle/working"


def kaggle(working_free: int, gpus: tuple[GPU, ...] = T4) -> Runtime:
    """Kaggle as the planner sees it: /kaggle/working with ``working_free`` bytes, a large /tmp."""
    return Runtime("kaggle", 32 * GB, 30 * GB, 4, gpus, Path("/"),
                   disks={WORKING: working_free, "/tmp": 150 * GB, "/": 150 * GB})


@pytest.fixture(scope="module")
def sizes(llama3_dir) -> dict[str, int]:
    """This model's GGUF size per method, as the planner computes it."""
    return {m: size for m, (size, _) in plan.gguf_sizes(plan.size_model(llama3_dir), list(recipes.METHODS)).items()}


@pytest.fixture(scope="module")
def adapter_dir(llama3_dir, tmp_path_factory) -> Path:
    """A PEFT-format LoRA adapter (rank 4 on q_proj and v_proj) for the llama3 fixture."""
    config = json.loads((llama3_dir / "config.json").read_text())
    hidden, kv = config["hidden_size"], config["hidden_size"] // config["num_attention_heads"] * config[
        "num_key_value_heads"]
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        for proj, out in (("q_proj", hidden), ("v_proj", kv)):
            stem = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(4, hidden)
            tensors[f"{stem}.lora_B.weight"] = torch.zeros(out, 4)
    folder = tmp_path_factory.mktemp("adapter")
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q_proj", "v_proj"]}))
    return folder


# ------------------------------------------------------------------------------------------------ picker


def test_picker_lists_every_method_with_its_size_and_fit(llama3_dir, sizes):
    # Room for q4_k_m and q8_0 one at a time, but not both.
    free = max(sizes["q4_k_m"], sizes["q8_0"]) + 1000
    picker = widgets.QuantPicker(llama3_dir, f"{WORKING}/out", ["q4_k_m", "q8_0"], runtime=kaggle(free))
    assert [r.name for r in picker.rows] == list(recipes.METHODS)
    for row in picker.rows:
        assert row.description == recipes.METHODS[row.name].description
        assert row.size == sizes[row.name] and row.exact
        assert row.fits == (sizes[row.name] <= free)
    assert any(r.fits for r in picker.rows) and not all(r.fits for r in picker.rows)
    assert picker.selected == ["q4_k_m", "q8_0"]
    assert picker.total == sizes["q4_k_m"] + sizes["q8_0"] and not picker.fits
    assert "does NOT fit" in picker.summary() and "fewer or smaller" in picker.advice()


def test_picker_size_is_the_written_file_size(llama3_dir, tmp_path):
    picker = widgets.QuantPicker(llama3_dir, tmp_path, ["q8_0"], runtime=kaggle(100 * GB))
    [result] = convert.convert(llama3_dir, picker.selected, tmp_path, progress=False)
    assert result.path.stat().st_size == picker.sizes["q8_0"][0]


def test_checkboxes_show_green_and_red_and_update_the_total(llama3_dir, sizes):
    free = sizes["q4_k_m"] + sizes["q8_0"] + 1000
    picker = widgets.QuantPicker(llama3_dir, f"{WORKING}/out", ["q4_k_m"], runtime=kaggle(free))
    widget = picker.widget
    assert len(picker.checkboxes) == len(recipes.METHODS)
    for row in picker.rows:
        color = widgets.GREEN if row.fits else widgets.RED
        assert color in picker.size_labels[row.name].value
    assert widgets.GREEN in picker.total_label.value
    assert widget.children[-1] is picker.total_label

    picker.checkboxes["q8_0"].value = True  # observe callback: selection and total follow
    assert picker.selected == ["q4_k_m", "q8_0"]
    assert picker.total == sizes["q4_k_m"] + sizes["q8_0"] and picker.fits
    assert widgets.GREEN in picker.total_label.value
    picker.checkboxes["f32"].value = True
    assert "f32" in picker.selected and not picker.fits
    assert widgets.RED in picker.total_label.value and "does NOT fit" in picker.total_label.value
    picker.checkboxes["f32"].value = False
    picker.checkboxes["q4_k_m"].value = False
    assert picker.selected == ["q8_0"] and picker.total == sizes["q8_0"]

    picker.set_selected(["q4_k", "bf16"])  # alias resolved; checkboxes follow
    assert picker.selected == ["q4_k_m", "bf16"]
    assert [n for n, box in picker.checkboxes.items() if box.value] == ["q4_k_m", "bf16"]


def test_fused_path_is_offered_when_the_merged_copy_does_not_fit(llama3_dir, adapter_dir, sizes):
    merged = plan.size_model(llama3_dir)
    merged_bytes = merged.bytes_16bit + merged.extra_bytes
    free = sizes["q4_k_m"] + merged_bytes // 2  # q4_k_m alone fits; with the merged copy it does not
    picker = widgets.QuantPicker(llama3_dir, f"{WORKING}/out", ["q4_k_m"], adapter=adapter_dir,
                                 runtime=kaggle(free))
    assert picker.fused and picker.fits and picker.total == sizes["q4_k_m"]
    picker.widget  # noqa: B018 - builds the widgets
    assert picker.fused_box.value is True
    picker.fused_box.value = False  # merge first: the 16-bit copy now counts against the disk
    assert not picker.fused and not picker.fits
    assert picker.total == sizes["q4_k_m"] + merged_bytes
    assert "fused" in picker.advice() and widgets.RED in picker.total_label.value
    assert not any(r.fits for r in picker.rows if sizes[r.name] + merged_bytes > free)

    roomy = widgets.QuantPicker(llama3_dir, f"{WORKING}/out", ["q4_k_m"], adapter=adapter_dir,
                                runtime=kaggle(100 * GB))
    assert not roomy.fused and roomy.fits  # merging fits: the usual path stays


def test_picker_refuses_what_is_not_an_adapter(llama3_dir, tmp_path):
    with pytest.raises(UserError, match="adapter"):
        widgets.QuantPicker(llama3_dir, tmp_path, ["q8_0"], adapter=tmp_path, runtime=kaggle(100 * GB))


def test_unknown_method_is_a_user_error(llama3_dir, tmp_path):
    with pytest.raises(UserError, match="q4_k_m"):
        widgets.QuantPicker(llama3_dir, tmp_path, ["q4_km"], runtime=kaggle(100 * GB))


def test_package_and_picker_work_without_ipywidgets(llama3_dir, tmp_path):
    code = (
        "import sys; sys.modules['ipywidgets'] = None\n"
        "from pathlib import Path\n"
        "from unsloth_nb import widgets\n"
        "from unsloth_nb.runtime import Runtime\n"
        f"rt = Runtime('local', 10**10, 10**10, 2, (), Path('/'), disks={{'/': 10**11}})\n"
        f"p = widgets.QuantPicker({str(llama3_dir)!r}, {str(tmp_path)!r}, ['q8_0'], runtime=rt)\n"
        "p._ipython_display_()\n"
        "print('selected', p.selected)\n"
        "print('ran', widgets.StepPanel('noop', lambda: 42).run())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "[x] q8_0" in out.stdout and "selected ['q8_0']" in out.stdout and "ran 42" in out.stdout


# -------------------------------------------------------------------------------------------- step panel


def test_step_panel_button_runs_the_step():
    calls = []

    def step():
        calls.append(1)
        print("working")
        return len(calls)

    panel = widgets.StepPanel("count", step, plan="a plan", summary=lambda n: f"{n} call(s)")
    panel.widget  # noqa: B018 - builds the widgets
    assert "a plan" in panel.widget.children[0].value
    panel.button.click()
    assert calls == [1] and panel.result == 1 and panel.runs == 1
    assert panel.progress.value == 1 and panel.progress.bar_style == "success"
    assert "1 call(s)" in panel.result_label.value
    panel.button.click()
    assert panel.result == 2 and "2 call(s)" in panel.result_label.value and not panel.button.disabled


def test_step_panel_shows_a_failure():
    def step():
        raise UserError("the disk is full. Fix: free some space.")

    panel = widgets.StepPanel("fails", step)
    panel.widget  # noqa: B018 - builds the widgets
    with pytest.raises(UserError):
        panel.run()
    assert isinstance(panel.error, UserError)
    assert panel.progress.bar_style == "danger" and "disk is full" in panel.result_label.value
    assert not panel.button.disabled


def test_run_step_runs_at_once_for_batch_runs():
    assert widgets.run_step("now", lambda: "done") == "done"


# --------------------------------------------------------------------------------------------- loss plot


def test_loss_plot_follows_the_trainer_log():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    lossplot = widgets.LossPlot()
    callback = lossplot.callback()
    state, control = TrainerState(), TrainerControl()
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    for step, loss in [(1, 2.5), (2, 2.0), (3, 1.25)]:
        state.global_step = step
        callback.on_log(args, state, control, logs={"loss": loss, "learning_rate": 1e-3})
    callback.on_log(args, state, control, logs={"train_runtime": 1.0})  # end-of-training summary: no point
    assert lossplot.steps == [1, 2, 3] and lossplot.losses == [2.5, 2.0, 1.25]
    figure = lossplot.draw()
    assert list(figure.axes[0].lines[0].get_ydata()) == [2.5, 2.0, 1.25]


# --------------------------------------------------------------------------------------------- chat box


@pytest.fixture(scope="module")
def server(llama3_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    [result] = convert.convert(llama3_dir, ["q8_0"], folder, progress=False)
    running = serve.serve(result.path, engine="llama.cpp", log_dir=folder, show_log=False)
    yield running
    running.stop()


def test_chat_box_asks_the_running_server(server):
    box = widgets.ChatBox(server, max_tokens=8)
    box.widget  # noqa: B018 - builds the widgets
    box.text.value = "Hello there"
    box.button.click()
    assert len(box.history) == 1
    question, answer = box.history[0]
    assert question == "Hello there" and isinstance(answer, str)
    assert box.text.value == ""
    box.text.value = "   "
    box.button.click()  # empty input: nothing sent
    assert len(box.history) == 1
    assert widgets.ChatBox(server, max_tokens=4).send("Hi") == server.chat("Hi", max_tokens=4)


# ------------------------------------------------------------------------------------- install helpers


def test_vllm_choice_follows_torch_gpu_and_driver():
    colab = Runtime("colab", 13 * GB, 12 * GB, 2, T4[:1], Path("/"))
    choice = install.choose_vllm(colab, "2.8.0+cu126", "12.6", "550.54.15")
    assert choice.requirement == "vllm" + install.VLLM_FOR_TORCH["2.8"]
    assert install.choose_vllm(kaggle(20 * GB), "2.9.0+cu128", "12.8", "570.1").requirement == (
        "vllm" + install.VLLM_FOR_TORCH["2.9"])
    assert install.choose_vllm(colab, "3.1.0+cu130", "13.0", "580.2").requirement == "vllm"  # pip decides
    assert install.choose_vllm(kaggle(20 * GB, P100), "2.8.0", "12.6", "550.1").requirement is None
    assert install.choose_vllm(colab, "2.9.0", "13.0", "550.1").requirement is None  # driver too old
    assert install.choose_vllm(colab, "2.9.0", None, "550.1").requirement is None  # CPU-only torch
    laptop = Runtime("local", 16 * GB, 10 * GB, 8, (), Path("/"))
    assert "llama.cpp" in install.choose_vllm(laptop, "2.9.0", None, None).reason


def test_install_commands_hold_torch_and_never_install_it(tmp_path):
    choice = install.VllmChoice("vllm>=0.10.2,<0.11.1", "test")
    commands = install.install_commands("requirements.txt", tmp_path / "c.txt", choice)
    assert len(commands) == 2
    for command in commands:
        assert command[:4] == [sys.executable, "-m", "pip", "install"]
        assert command[command.index("--constraint") + 1] == str(tmp_path / "c.txt")
        assert not any(arg.startswith("torch") or arg in ("-U", "--upgrade", "--force-reinstall") for arg in command)
    assert commands[1][-1] == "vllm>=0.10.2,<0.11.1"
    assert len(install.install_commands("r.txt", "c.txt", install.VllmChoice(None, "no GPU"))) == 1
    requirements = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text()
    assert not [line for line in requirements.splitlines() if line.split("#")[0].strip().startswith("torch")]


def test_detect_torch_reads_the_installed_torch():
    version, _ = install.detect_torch()
    assert version == torch.__version__


def test_model_folder_builds_fixtures_and_keeps_folders(llama3_dir, tmp_path):
    assert widgets.model_folder("fixture:llama3") == llama3_dir
    assert widgets.model_folder(tmp_path) == tmp_path
    with pytest.raises(UserError, match="Hub id"):
        widgets.model_folder("not a model")
