"""The planner: sizes from safetensors headers, GGUF sizes per method, placement and refusals.

Real model shapes (Llama 3.x 1B/3B/8B, Qwen2.5 1.5B/14B) are written as header-only safetensors files: the
real header with every tensor's dtype, shape and offsets, and no data. Runtimes are faked (Colab with 12.7 GB
of RAM and a T4, Kaggle with its 20 GB working folder, a large /tmp and two T4s, a laptop without a GPU),
except in the tmpfs test, which plans against a real, small filesystem.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from unsloth_nb import checkpoint
from unsloth_nb import plan as planner
from unsloth_nb.errors import UserError
from unsloth_nb.gguf import recipes
from unsloth_nb.runtime import GPU, Runtime, free_disk

T4 = [GPU(i, "Tesla T4", 15 * 2**30, 14 * 2**30, (7, 5)) for i in range(2)]
GB = 10**9

# Dimensions of the public releases (config.json of each).
SHAPES = {
    "llama-1b": dict(model_type="llama", hidden=2048, inter=8192, layers=16, heads=32, kv=8, vocab=128256,
                     tied=True, bias=False),
    "llama-3b": dict(model_type="llama", hidden=3072, inter=8192, layers=28, heads=24, kv=8, vocab=128256,
                     tied=True, bias=False),
    "llama-8b": dict(model_type="llama", hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128256,
                     tied=False, bias=False),
    "qwen-1.5b": dict(model_type="qwen2", hidden=1536, inter=8960, layers=28, heads=12, kv=2, vocab=151936,
                      tied=True, bias=True),
    "qwen-14b": dict(model_type="qwen2", hidden=5120, inter=13824, layers=48, heads=40, kv=8, vocab=152064,
                     tied=False, bias=True),
}


def shape_tensors(s: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of a decoder with the given dimensions."""
    h, kv = s["hidden"], s["hidden"] // s["heads"] * s["kv"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab"], h)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (s["inter"], h), p + "mlp.up_proj.weight": (s["inter"], h),
                p + "mlp.down_proj.weight": (h, s["inter"])}
        if s["bias"]:
            out |= {p + "self_attn.q_proj.bias": (h,), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,)}
    out["model.norm.weight"] = (h,)
    if not s["tied"]:
        out["lm_head.weight"] = (s["vocab"], h)
    return out


def write_safetensors_header(path: Path, tensors: dict[str, tuple[int, ...]], dtype: str = "BF16") -> None:
    """A safetensors file with the full header and no data section."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors.items():
        n = checkpoint.DTYPES[dtype][0]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def write_model(folder: Path, name: str, shards: int = 1) -> Path:
    """A header-only model folder (config.json + safetensors headers; sharded through an index if asked)."""
    s = SHAPES[name]
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM" if s["model_type"] == "llama" else "Qwen2ForCausalLM"],
        "model_type": s["model_type"], "hidden_size": s["hidden"], "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"], "num_key_value_heads": s["kv"],
        "vocab_size": s["vocab"], "tie_word_embeddings": s["tied"], "torch_dtype": "bfloat16",
    }
    if s["model_type"] == "llama":
        config["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0}
    (folder / "config.json").write_text(json.dumps(config))
    tensors = list(shape_tensors(s).items())
    if shards == 1:
        write_safetensors_header(folder / "model.safetensors", dict(tensors))
        return folder
    weight_map = {}
    per = -(-len(tensors) // shards)
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = dict(tensors[k * per:(k + 1) * per])
        write_safetensors_header(folder / fname, part)
        weight_map |= {n: fname for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_adapter(folder: Path, model: str, rank: int = 16) -> Path:
    """A header-only PEFT LoRA adapter on every attention and MLP projection."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, shape in shape_tensors(SHAPES[model]).items():
        if name.endswith("_proj.weight"):
            stem = "base_model.model." + name[: -len(".weight")]
            tensors[stem + ".lora_A.weight"] = (rank, shape[1])
            tensors[stem + ".lora_B.weight"] = (shape[0], rank)
    write_safetensors_header(folder / "adapter_model.safetensors", tensors, dtype="F32")
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    out = {name: write_model(root / name, name) for name in SHAPES}
    out["llama-8b-sharded"] = write_model(root / "llama-8b-sharded", "llama-8b", shards=4)
    out["llama-8b-lora"] = write_adapter(root / "llama-8b-lora", "llama-8b")
    return out


def kaggle() -> Runtime:
    return Runtime("kaggle", 32 * GB, 30 * GB, 4, tuple(T4), Path("/"),
                   disks={"/kaggle/working": 20 * GB, "/tmp": 150 * GB, "/": 150 * GB})


def colab(available: int = int(12.7 * 2**30 * 0.9)) -> Runtime:
    return Runtime("colab", int(12.7 * 2**30), available, 2, (T4[0],), Path("/"),
                   disks={"/content": 80 * GB, "/": 80 * GB})


def laptop() -> Runtime:
    return Runtime("local", 16 * GB, 10 * GB, 8, (), Path("/"), disks={"/": 200 * GB})


# ------------------------------------------------------------------------------------------ sizing


@pytest.mark.parametrize("name", list(SHAPES))
def test_size_from_headers_only(models, name):
    size = planner.size_model(models[name])
    expected = shape_tensors(SHAPES[name])
    n = sum(_numel(s) for s in expected.values())
    assert not size.has_weights
    assert size.n_params == n
    assert size.params_by_dtype == {"BF16": n}
    assert size.bytes_by_dtype == {"BF16": 2 * n} == {"BF16": size.nbytes}
    assert size.largest.name == "model.embed_tokens.weight"
    assert size.largest.shape == expected["model.embed_tokens.weight"]
    assert size.architecture.lower().startswith(SHAPES[name]["model_type"])
    assert name.split("-")[0] in size.describe().lower() or size.architecture in size.describe()


def test_sharded_model_through_its_index(models):
    one = planner.size_model(models["llama-8b"])
    four = planner.size_model(models["llama-8b-sharded"])
    assert len(list(models["llama-8b-sharded"].glob("*.safetensors"))) == 4
    assert four.n_params == one.n_params and four.largest == one.largest
    assert sorted(t.name for t in four.tensors) == sorted(t.name for t in one.tensors)


def test_header_reader_agrees_with_safetensors(tmp_path):
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    arrays = {"a": np.zeros((3, 5), np.float16), "b": np.ones((7,), np.float32), "c": np.zeros((2, 2, 2), np.int8)}
    save_file(arrays, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    header = checkpoint.read_header(tmp_path / "x.safetensors")
    tensors, data_end = header.tensors.values(), header.data_end
    assert data_end == (tmp_path / "x.safetensors").stat().st_size
    with safe_open(str(tmp_path / "x.safetensors"), "np") as f:
        for t in tensors:
            assert f.get_slice(t.name).get_shape() == list(t.shape)
            assert f.get_slice(t.name).get_dtype() == t.dtype
            assert f.get_tensor(t.name).nbytes == t.nbytes


def test_damaged_header_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 40) + b"{not json")
    with pytest.raises(UserError, match="damaged"):
        planner.size_model(tmp_path)


def test_hub_id_resolves_to_the_local_cache(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B"
    snapshot = repo / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    for f in models["llama-1b"].iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    size = planner.size_model("meta-llama/Llama-3.2-1B")
    assert size.path == snapshot
    assert size.name == "Llama-3.2-1B"
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        planner.size_model("meta-llama/Llama-3.1-8B")
    with pytest.raises(UserError, match="does not exist"):
        planner.size_model(str(tmp_path / "no" / "such" / "folder"))


@pytest.mark.parametrize("name", ["llama-8b-sharded", "llama-1b"])
def test_hub_metadata_folder_plans_like_the_model(models, tmp_path, name):
    """For users online the planner reads a Hub model's safetensors headers (the Hub's own metadata objects,
    built here from a local folder: tests never reach the Hub) and plans exactly as for the downloaded model."""
    from huggingface_hub.utils._safetensors import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    folder = models[name]
    index = folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        header = checkpoint.read_header(path)
        files[path.name] = SafetensorsFileMetadata(header.metadata, {
            n: TensorInfo(t.dtype, list(t.shape), (t.start - header.data_start, t.start - header.data_start + t.nbytes))
            for n, t in header.tensors.items()})
    repo = SafetensorsRepoMetadata(None, weight_map is not None,
                                   weight_map or {n: f for f, m in files.items() for n in m.tensors}, files)
    config = json.loads((folder / "config.json").read_text())
    fetched = planner.write_header_folder(tmp_path / "org" / name, config, repo)

    local, remote = planner.size_model(folder), planner.size_model(fetched)
    assert set(local.tensors) == set(remote.tensors) and not remote.has_weights
    assert remote.name == name
    methods = ["q4_k_m", "q8_0", "bf16"]
    assert planner.gguf_sizes(local, methods) == planner.gguf_sizes(remote, methods)


def test_hub_id_offline_is_not_fetched(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        planner.size_model("someone/some-model")


# -------------------------------------------------------------------------------------- GGUF sizes


def test_gguf_estimate_follows_the_type_mix(models):
    import gguf

    size = planner.size_model(models["llama-8b"])
    est = {m: planner.estimate_gguf_size(size, m) for m in recipes.METHODS}
    # Bigger methods give bigger files, in the order llama.cpp's file types rank them.
    order = ["q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k", "q8_0", "bf16", "f32"]
    assert [est[m] for m in order] == sorted(est[m] for m in order)
    # 16-bit: the checkpoint itself (norms go to F32) plus metadata; 32-bit: twice the data.
    norms = sum(t.numel for t in size.tensors if len(t.shape) == 1)
    overhead = est["bf16"] - (size.nbytes + 2 * norms)
    assert 0 < overhead < 0.002 * size.nbytes
    assert est["f32"] - overhead == pytest.approx(2 * (est["bf16"] - overhead), rel=1e-4)
    # Q8_0 everywhere but the 1-D tensors: 34 bytes per 32 weights.
    q8 = sum(t.numel // 32 * 34 if len(t.shape) > 1 else 4 * t.numel for t in size.tensors)
    assert est["q8_0"] == pytest.approx(q8, rel=0.002)
    # Q4_K_M is not a flat 4.5 bits per weight: attn_v, ffn_down and output carry Q6_K.
    flat = size.n_params * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K][1] / 256
    assert est["q4_k_m"] > flat * 1.05
    assert est["q4_k_s"] < est["q4_k_m"]


# --------------------------------------------------------------------------------------- placement


def test_kaggle_8b_merge_plus_q4_does_not_fit_working_but_fits_in_tmp(models):
    p = planner.make_plan(models["llama-8b"], "q4_k_m", adapter=models["llama-8b-lora"], runtime=kaggle())
    assert p.fits
    assert p.out_dir == Path("/tmp") / planner.DEFAULT_OUT
    assert [s.name.split()[0] for s in p.steps] == ["merge", "gguf"]
    text = " ".join(p.warnings)
    assert "not kept" in text and "fused" in text and "/kaggle/working" in text


def test_kaggle_8b_fused_path_fits_working(models):
    p = planner.make_plan(models["llama-8b"], "q4_k_m", adapter=models["llama-8b-lora"], fused=True,
                          runtime=kaggle())
    assert p.fits and p.fused
    assert p.out_dir == Path("/kaggle/working") / planner.DEFAULT_OUT
    assert [s.name for s in p.steps] == ["gguf Q4_K_M (fused LoRA)"]
    assert not any("not kept" in w for w in p.warnings)


def test_explicit_folder_wins_and_the_refusal_says_what_to_do(models):
    out = "/kaggle/working/mine"
    p = planner.make_plan(models["llama-8b"], "q4_k_m", out, adapter=models["llama-8b-lora"], runtime=kaggle())
    assert p.out_dir == Path(out)
    assert not p.fits
    merged = sum(s.disk for s in p.steps if s.name.startswith("merge"))
    gguf_file = sum(s.disk for s in p.steps if s.name.startswith("gguf"))
    assert merged + gguf_file > 20 * GB > gguf_file
    with pytest.raises(UserError) as err:
        p.require()
    reason = str(err.value)
    assert "\n" not in reason
    assert out in reason and "short" in reason
    assert planner.gb(merged + gguf_file - 20 * GB) in reason
    assert "fused" in reason and "/tmp" in reason


def test_explicit_tmp_on_kaggle_still_warns(models):
    p = planner.make_plan(models["llama-1b"], "q4_k_m,q8_0", "/tmp/out", runtime=kaggle())
    assert p.fits and p.out_dir == Path("/tmp/out")
    text = " ".join(p.warnings)
    assert "not kept" in text and "also fits in /kaggle/working" in text


def test_kaggle_fewer_methods_offered(models):
    p = planner.make_plan(models["qwen-14b"], "q4_k_m,q8_0,bf16", runtime=kaggle())
    assert p.fits and p.out_dir.parent == Path("/tmp")
    sizes = {s.name.split()[1].lower(): s.disk for s in p.steps}
    fit = [m for m in sorted(sizes, key=sizes.get)]
    keep, total = [], 0
    for m in fit:
        if total + sizes[m] <= 20 * GB:
            keep.append(m)
            total += sizes[m]
    assert keep and len(keep) < 3
    verb = "fits" if len(keep) == 1 else "fit"
    assert any(f"fewer methods ({', '.join(keep)} {verb} in" in w for w in p.warnings)


def test_nothing_fits_anywhere_is_refused(models):
    rt = Runtime("kaggle", 32 * GB, 30 * GB, 4, tuple(T4), Path("/"),
                 disks={"/kaggle/working": 20 * GB, "/tmp": 10 * GB, "/": 10 * GB})
    p = planner.make_plan(models["qwen-14b"], "q8_0,bf16", runtime=rt)
    assert not p.fits
    assert p.out_dir == Path("/kaggle/working") / planner.DEFAULT_OUT
    with pytest.raises(UserError, match="fewer methods"):
        p.require()


def test_colab_never_plans_more_than_75_percent_of_ram(models):
    size_plan = planner.make_plan(models["qwen-14b"], "q4_k_m", runtime=laptop())
    peak = max(s.ram for s in size_plan.steps)
    # RAM for which 90% would do but 75% would not: Colab refuses, a local machine goes ahead.
    available = int(peak / 0.82)
    on_colab = planner.make_plan(models["qwen-14b"], "q4_k_m", runtime=colab(available))
    assert not on_colab.fits
    assert "75%" in on_colab.reason() and "RAM" in on_colab.reason()
    local = Runtime("local", available * 2, available, 2, (), Path("/"), disks={"/": 80 * GB})
    assert planner.make_plan(models["qwen-14b"], "q4_k_m", runtime=local).fits
    # The real Colab: a 1B model goes through, the budget is 75% of what is available.
    small = planner.make_plan(models["llama-1b"], "q4_k_m,q8_0", runtime=colab())
    assert small.fits and small.ram_budget == int(colab().available_ram * 0.75)
    assert small.out_dir == Path("/content") / planner.DEFAULT_OUT
    assert any("Google Drive" in w for w in small.warnings)


def test_colab_ram_for_every_shape_follows_the_rule(models):
    rt = colab()
    for name in SHAPES:
        p = planner.make_plan(models[name], "q4_k_m", runtime=rt)
        assert p.fits == all(s.ram <= 0.75 * rt.available_ram for s in p.steps), name


def test_laptop_without_gpu_uses_the_folder_asked_for(models, tmp_path):
    p = planner.make_plan(models["llama-3b"], ["q4_k_m", "Q8_0"], tmp_path / "out", runtime=laptop())
    assert p.fits and p.out_dir == tmp_path / "out" and p.methods == ["q4_k_m", "q8_0"]
    assert all(s.vram == 0 for s in p.steps)
    assert "needs VRAM" not in str(p)
    assert not p.warnings
    assert not (tmp_path / "out").exists()


def test_merge_ram_is_about_one_tensor(models):
    p = planner.make_plan(models["llama-8b"], [], "/x", adapter=models["llama-8b-lora"], runtime=laptop())
    (merge,) = p.steps
    size = planner.size_model(models["llama-8b"])
    assert merge.disk >= size.bytes_16bit
    assert merge.ram < 0.25 * size.nbytes
    assert merge.ram > size.largest.nbytes


def test_gpu_pass_counts_the_chunks_quantized_ahead(models):
    """On a GPU the converter lets encoded chunks wait for the writer (convert.GPU_LOOKAHEAD_BYTES): the plan's
    RAM for the pass includes them; with device="cpu" it does not."""
    from unsloth_nb.gguf import layout

    for name in ("llama-1b", "llama-8b"):
        gpu = planner.make_plan(models[name], "q4_k_m", runtime=colab())
        cpu = planner.make_plan(models[name], "q4_k_m", runtime=colab(), device="cpu")
        assert gpu.steps[-1].ram - cpu.steps[-1].ram == layout.GPU_LOOKAHEAD_BYTES, name
        assert gpu.steps[-1].disk > layout.GPU_LOOKAHEAD_BYTES


def test_unknown_method_is_a_user_error(models):
    with pytest.raises(UserError, match="q4_k_m"):
        planner.make_plan(models["llama-1b"], "q4_k_mm", runtime=laptop())


def test_plan_renders_as_table_and_html(models):
    p = planner.make_plan(models["llama-8b"], "q4_k_m", "/kaggle/working/x", adapter=models["llama-8b-lora"],
                          runtime=kaggle())
    text = str(p)
    header = next(line for line in text.splitlines() if line.startswith("step"))
    for column in ("needs RAM", "needs VRAM", "needs disk", "where", "fits?"):
        assert column in header
    assert "NO" in text and "does not fit" in text
    page = p._repr_html_()
    assert page.count("<tr") == len(p.steps) + 1
    assert "<th>fits?</th>" in page and "does not fit" in page


# ----------------------------------------------------------------------------- CLI and a real disk


def run_plan_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unsloth_nb", "plan", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_cli_prints_the_plan(models, tmp_path):
    done = run_plan_cli(str(models["llama-1b"]), "--quant", "q4_k_m,q8_0", "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    assert "gguf Q4_K_M" in done.stdout and "gguf Q8_0" in done.stdout and "fits: yes" in done.stdout
    bad = run_plan_cli(str(models["llama-1b"]), "--quant", "q4_k_z")
    assert bad.returncode == 1 and "q4_k" in bad.stderr and "Traceback" not in bad.stderr


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------------------------ real folders: the converter's own sizes

FIXTURE_METHOD = {"llama3": "q4_k_m", "llama2": "q3_k_m", "qwen2": "q2_k"}


@pytest.mark.parametrize("kind", list(FIXTURE_METHOD))
def test_gguf_size_is_the_converters_exact_size(kind, request):
    from unsloth_nb.gguf import convert

    folder = request.getfixturevalue(f"{kind}_dir")
    method = FIXTURE_METHOD[kind]
    layout = convert.file_layout(folder, method)
    size = planner.size_model(folder)
    assert size.has_weights
    # The planner's per-tensor type mix gives the converter's data section to the byte...
    assert planner.gguf_data_bytes(size, method) == layout.size - layout.metadata_size
    # ...so the plan states the exact file size.
    p = planner.make_plan(folder, method, "/x", runtime=laptop())
    (step,) = p.steps
    assert step.exact and step.disk == layout.size
    assert step.where.name == layout.file_name
    # The RAM estimate assumes the converter's chunking (one home: gguf.layout).
    from unsloth_nb.gguf import layout as gguf_layout

    assert gguf_layout.IN_FLIGHT <= gguf_layout.MAX_IN_FLIGHT


def test_real_small_disk_refused_before_writing_and_fitting_plan_succeeds(llama2_dir, tmpfs):
    from unsloth_nb.gguf import convert

    size_q8 = planner.make_plan(llama2_dir, "q8_0", "/x", runtime=laptop()).steps[0].disk
    disk = tmpfs(-(-(size_q8 + 2**20) // 2**20) * 2**20)  # room for Q8_0 only
    out = disk / "gguf"

    too_much = run_plan_cli(str(llama2_dir), "--quant", "q8_0,bf16", "--out", str(out))
    assert too_much.returncode == 1
    assert "short" in too_much.stderr and "fewer methods (q8_0 fits" in too_much.stderr
    assert "Traceback" not in too_much.stderr
    assert os.listdir(disk) == []

    p = planner.make_plan(llama2_dir, "q8_0", out).require()
    (step,) = p.steps
    assert step.fits and step.disk <= free_disk(disk)
    (result,) = convert.convert(llama2_dir, ["q8_0"], out, progress=False)
    assert result.path == step.where and result.size == step.disk


def test_train_plan_counts_gpu_memory_and_warns_when_it_cannot_fit(models, tmp_path):
    """On a GPU the train plan has a GPU-memory row: 4-bit and gradient checkpointing need less, and a
    free-Colab T4 training the 8B in 16 bits gets a warning that names what needs less."""
    kwargs = dict(r=16, targets=("q_proj", "v_proj"), checkpoints=tmp_path / "c", batch_size=1, max_seq_len=2048)
    sizes = {}
    for four_bit in (False, True):
        for checkpointing in (False, True):
            plan = planner.plan_train(models["llama-8b"], tmp_path / "a", runtime=colab(), load_in_4bit=four_bit,
                                      gradient_checkpointing=checkpointing, **kwargs)
            [step] = [s for s in plan.steps if s.vram]
            sizes[four_bit, checkpointing] = step.vram
            assert plan.fits  # GPU memory warns; only the disk refuses
    assert sizes[True, True] < sizes[False, True] < sizes[False, False]
    assert sizes[True, True] < sizes[True, False]  # without checkpointing 4-bit's float32 activations cost the most
    assert sizes[True, True] < 14 * 2**30 < sizes[False, True]  # 8B QLoRA fits a T4, 16 bits do not
    warned = planner.plan_train(models["llama-8b"], tmp_path / "a", runtime=colab(), **kwargs)
    assert any("load_in_4bit=True" in w for w in warned.warnings)
    fine = planner.plan_train(models["llama-8b"], tmp_path / "a", runtime=colab(), load_in_4bit=True, **kwargs)
    assert not any("training may need" in w for w in fine.warnings)
    assert not [s for s in planner.plan_train(models["llama-1b"], tmp_path / "a", runtime=laptop(), **kwargs).steps
                if s.vram]  # no GPU, no GPU row
