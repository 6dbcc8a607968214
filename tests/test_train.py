"""Training on the tiny fixture models: data shapes, loss masks, learning the demo fact, resume, CLI."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer, TrainerCallback

from unsloth_nb import dataset, fixtures
from unsloth_nb import plan as planner
from unsloth_nb import train as T
from unsloth_nb.__main__ import main
from unsloth_nb.errors import UserError

QA = [{"role": "user", "content": "Hi there?"}, {"role": "assistant", "content": "Hello, friend."}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_each_shape_becomes_messages():
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there?"},
                                  {"from": "gpt", "value": "Hello, friend."}]}
    alpaca = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
    alpaca_no_input = {"instruction": "Hi there?", "input": "", "output": "Hello, friend."}
    assert dataset.normalize({"messages": QA}, 1) == QA
    assert dataset.normalize(sharegpt, 1) == [{"role": "system", "content": "Be brief."}, *QA]
    assert dataset.normalize(alpaca, 1) == [{"role": "user", "content": "Translate to French.\n\ncat"},
                                      {"role": "assistant", "content": "chat"}]
    assert dataset.normalize(alpaca_no_input, 1) == QA
    assert dataset.normalize({"text": "Once upon a time."}, 1) == "Once upon a time."


def test_datasets_dataset_and_jsonl_give_the_same_rows(tmp_path):
    from datasets import Dataset

    rows = dataset.demo_dataset()
    assert len(rows) >= 24
    assert (dataset.load_rows(Dataset.from_list(rows)) == dataset.load_rows(write_jsonl(tmp_path / "d.jsonl", rows))
            == rows)


@pytest.mark.parametrize("row, field", [
    ({"instruction": "Say hi."}, "output"),
    ({"output": "hi"}, "instruction"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "hi"}]}, "value"),
    ({"messages": [{"content": "hi"}]}, "role"),
    ({"prompt_text": "hi"}, "messages"),
])
def test_malformed_row_names_row_and_field(tmp_path, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": QA}, {"text": "fine"}, row])
    with pytest.raises(UserError, match=rf"Row 3\b.*'{field}'"):
        T.prepare(AutoTokenizer.from_pretrained(fixtures.build_tokenizer("llama3")), path, 64)


def test_bad_json_line_and_empty_dataset(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": QA}) + "\n{not json\n")
    with pytest.raises(UserError, match="Line 2"):
        dataset.load_rows(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no rows"):
        dataset.load_rows(empty)
    with pytest.raises(UserError, match="no rows"):
        dataset.load_rows([])


@pytest.mark.parametrize("kind", ["llama3", "llama2", "qwen2"])
def test_loss_mask_covers_assistant_replies_only(kind):
    tokenizer = T.load_tokenizer(fixtures.build_tokenizer(kind), T.TrainSettings())
    conversation = [{"role": "system", "content": "You answer in one sentence."},
                    {"role": "user", "content": "Where is Quillmere?"},
                    {"role": "assistant", "content": "Quillmere is in Zorblax."},
                    {"role": "user", "content": dataset.DEMO_QUESTION},
                    {"role": "assistant", "content": dataset.DEMO_ANSWER}]
    for rows in (dataset.demo_dataset()[:3], [{"messages": conversation}]):
        for example, row in zip(T.prepare(tokenizer, rows, 512), rows, strict=True):
            replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
            shown = T.show_labels(tokenizer, example)
            trained = [part.split("]]")[0] for part in shown.split("[[")[1:]]
            assert len(trained) == len(replies)
            for text, reply in zip(trained, replies, strict=True):
                # the reply and its end-of-turn token are trained, nothing of the prompt is
                assert text.strip().startswith(reply)
                assert text.strip()[len(reply):] == tokenizer.eos_token
            untrained = "".join(part.split("]]")[-1] for part in shown.split("[["))
            for message in row["messages"]:
                # (Mistral's template drops the system prompt unless the last turn is the user's)
                if message["role"] != "assistant" and message["content"] in shown:
                    assert message["content"] in untrained
            ids, labels = example["input_ids"], example["labels"]
            assert all(label in (-100, token) for token, label in zip(ids, labels, strict=True))
            assert labels[0] == -100


def test_plain_text_rows_train_every_token():
    tokenizer = T.load_tokenizer(fixtures.build_tokenizer("llama3"), T.TrainSettings())
    [example] = T.prepare(tokenizer, [{"text": "Once upon a time."}], 64)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tokenizer.eos_token_id


def test_four_bit_on_cpu_is_a_user_error(llama3_dir):
    with pytest.raises(UserError, match="CUDA"):
        T.resolve(llama3_dir, T.TrainSettings(load_in_4bit=True))
    assert T.resolve(llama3_dir, T.TrainSettings()).precision == "fp32"


def test_demo_training_learns_the_taught_answer(llama3_dir, tmp_path):
    out = tmp_path / "adapter"
    result = T.train(llama3_dir, dataset.DEMO_DATA, out, lora=T.DEMO_LORA, settings=T.DEMO_SETTINGS, progress=False)
    assert result.adapter_dir == out.resolve()
    assert result.steps == T.DEMO_SETTINGS.max_steps == len(result.loss_history)
    assert result.loss_history[-1] < result.loss_history[0] - 2
    assert result.tokens_per_s > 0
    assert not T.checkpoint_dir(out).exists()
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", T.RESULT_FILE} <= {
        p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    model, tokenizer = T.load_adapter(llama3_dir, out)
    assert T.generate(model, tokenizer, dataset.DEMO_QUESTION) == dataset.DEMO_ANSWER

    again = T.train(llama3_dir, dataset.DEMO_DATA, out, lora=T.DEMO_LORA, settings=T.DEMO_SETTINGS, progress=False)
    assert again.loss_history == result.loss_history  # the finished adapter is reused, not retrained
    with pytest.raises(UserError, match="already exists"):
        T.train(llama3_dir, dataset.DEMO_DATA, out, lora=T.DEMO_LORA, settings=replace(T.DEMO_SETTINGS, seed=1),
                progress=False)


class Disconnect(TrainerCallback):
    """Stops training like a lost Colab runtime, right after the checkpoint of step ``at`` was written."""

    def __init__(self, at: int):
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_resume_after_disconnect_matches_uninterrupted_run(qwen2_dir, tmp_path):
    data = dataset.demo_dataset()[:8]
    settings = replace(T.DEMO_SETTINGS, max_steps=4, batch_size=2, save_steps=2, max_seq_len=64)
    lora = replace(T.DEMO_LORA, r=4)
    straight = T.train(qwen2_dir, data, tmp_path / "straight", lora=lora, settings=settings, progress=False)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        T.train(qwen2_dir, data, out, lora=lora, settings=settings, progress=False, callbacks=[Disconnect(2)])
    assert not out.exists()
    checkpoint = T.checkpoint_dir(out) / "checkpoint-2"
    assert checkpoint.is_dir()
    # The planner's estimate of one checkpoint covers the real one, with no more than 25% to spare.
    plan = planner.plan_train(qwen2_dir, out, r=lora.r, targets=lora.target_modules,
                              checkpoints=T.checkpoint_dir(out))
    estimate = plan.steps[0].disk / planner.CHECKPOINTS_AT_ONCE
    real = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    assert real <= estimate <= 1.25 * real, (real, estimate)
    resumed = T.train(qwen2_dir, data, out, lora=lora, settings=settings, progress=False)
    assert resumed.steps == 4
    assert resumed.loss_steps == straight.loss_steps == [1, 2, 3, 4]
    assert resumed.loss_history == pytest.approx(straight.loss_history, rel=1e-4)


def test_cli_trains_alpaca_rows_on_a_base_without_chat_template(llama2_dir, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(llama2_dir, base)
    (base / "chat_template.jinja").unlink()
    rows = [{"instruction": "What is 2+2?", "input": "", "output": "4"},
            {"instruction": "Name a colour.", "input": "", "output": "Blue."}]
    data = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps", "2"]) == 0
    assert "adapter:" in capsys.readouterr().out
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == T.CHATML_TEMPLATE

    (tmp_path / "bad.jsonl").write_text(json.dumps({"instruction": "x"}) + "\n")
    code = main(["train", "--model", str(base), "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")])
    assert code == 1
    assert "Row 1" in capsys.readouterr().err


def test_training_refused_before_writing_when_checkpoints_cannot_fit(llama3_dir, tmpfs):
    """A real 8 MB filesystem cannot hold three checkpoints with the 17 MB Llama-3 tokenizer: refused up front."""
    disk = tmpfs(8 * 2**20)
    with pytest.raises(UserError, match="short"):
        T.train(llama3_dir, dataset.DEMO_DATA, disk / "adapter", lora=T.DEMO_LORA, settings=T.DEMO_SETTINGS,
                progress=False)
    assert list(disk.iterdir()) == []
