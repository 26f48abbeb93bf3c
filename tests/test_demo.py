"""The bundled demo task (tokenizer, reward, data generators, tiny model) and a very short `fastpref demo`."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from fastpref.trainers.demo import ArithmeticTask, build_model, build_tokenizer, reward_fn  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_tokenizer_round_trip(tok):
    text = "0123456789+-="
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and len(tok) == 16  # one token per character, no special token added
    assert tok.decode(ids) == text
    assert tok.encode("12+7=" + tok.eos_token) == tok.encode("12+7=") + [tok.eos_token_id]
    assert tok.decode(tok.encode("19</s>"), skip_special_tokens=True) == "19"
    assert tok.pad_token_id == 0 and tok.eos_token_id not in (None, tok.pad_token_id)
    batch = tok(["1+2=", "12+30="], padding=True)
    assert batch["attention_mask"][0] == [1, 1, 1, 1, 0, 0]  # right padding for training; generation pads left


def test_reward_fn():
    prompts = ["12+7=", "12+7=", "12+7=", "12+7=", "40-3=", "40-3=", "9+1="]
    completions = ["19", "19</s>junk", "18", "x", "37", "73", "100"]
    # 18 vs 19: the tens digit right (1 of 2) -> 0.5 * 1/2; "100" vs "10": aligned on units, "0" matches
    assert reward_fn(prompts, completions) == [1.0, 1.0, 0.25, 0.0, 1.0, 0.0, 0.5 * 1 / 3]
    assert reward_fn(["12+7="], ["18"], partial_credit=0.0) == [0.0]


def test_data_generators():
    task = ArithmeticTask(max_operand=20, seed=3)
    train = {ArithmeticTask.prompt(p) for p in task.train_problems}
    held_out = {ArithmeticTask.prompt(p) for p in task.eval_problems}
    assert train and held_out and not train & held_out
    sft = task.sft_dataset(50)
    assert len(sft) == 50 and all(r["prompt"] in train for r in sft)
    assert all(reward_fn([r["prompt"]], [r["completion"]]) == [1.0] for r in sft)
    pairs = task.preference_dataset(split="eval")
    assert len(pairs) == len(held_out) and {r["prompt"] for r in pairs} == held_out
    for r in pairs:
        assert r["chosen"] != r["rejected"] and reward_fn([r["prompt"]], [r["rejected"]])[0] < 1.0
        gap = abs(int(r["chosen"]) - int(r["rejected"]))
        assert gap in (1, 10) or r["rejected"] == r["chosen"][::-1].lstrip("0")  # plausible mistakes
    assert task.preference_dataset(10, seed=1) == task.preference_dataset(10, seed=1)  # deterministic
    assert task.prompt_dataset(5, split="eval") == [{"prompt": r["prompt"]} for r in task.sft_dataset(5, split="eval")]
    assert all(int(r["completion"]) >= 0 for r in task.sft_dataset())  # differences are never negative
    assert len(task.sft_dataset(3 * len(task.train_problems))) == 3 * len(task.train_problems)  # cycles


def test_build_model(tok):
    model = build_model(tok)
    ids = torch.tensor([tok.encode("12+7=19")])
    assert model(input_ids=ids).logits.shape == (1, 7, len(tok))
    rm = build_model(tok, kind="reward")
    assert rm(input_ids=ids).logits.shape == (1, 1)
    assert sum(p.numel() for p in model.parameters()) < 200_000


def test_demo_cli_quick(tmp_path, capsys):
    from fastpref.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == ["sft", "dpo", "reward", "grpo", "ppo"]
    for stage, s in summary.items():
        assert (tmp_path / stage / "metrics.jsonl").is_file()
        assert s["history"][0]["step"] == 0 and s["history"][-1]["step"] > 0
        assert set(s["before"]) <= set(s["after"])
    assert "preference_accuracy" in summary["dpo"]["after"] and "reward" in summary["ppo"]["after"]
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "stage" in out and "grpo" in out and "log p(correct) > log p(wrong)" in out
