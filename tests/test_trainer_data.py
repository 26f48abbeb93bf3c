"""Trainer data: loading, tokenization with the prompt masked, chat templates, truncation, padding, and the
config checks (fast: no model runs here)."""
import json

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_trainers import PAIRS, SFT, WORDS, cfg, tiny_llama, tiny_tokenizer  # noqa: E402

from fastpref.trainers import DPOConfig, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer  # noqa: E402
from fastpref.trainers.cli import coerce  # noqa: E402
from fastpref.trainers.common import TrainerConfig  # noqa: E402
from fastpref.trainers.data import (Encoder, check_columns, collate_pairs, load_records, pad_sequences,  # noqa: E402
                                    preference_examples)

TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")


def ids(text):
    return [WORDS.index(w) for w in text.split()]


def test_load_records_from_every_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(PAIRS[0]) + "\n\n" + json.dumps(PAIRS[1]) + "\n")
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(PAIRS[:2]))
    for source in (PAIRS[:2], jsonl, str(as_json), datasets.Dataset.from_list(PAIRS[:2])):
        assert load_records(source, split="train") == PAIRS[:2]


@pytest.mark.parametrize("source, error, message", [
    ([], ValueError, "train_dataset is empty"),
    ("nope.jsonl", FileNotFoundError, "train_dataset: no such file 'nope.jsonl'"),
    ([{"prompt": "a"}, "b"], TypeError, r"train_dataset\[1\] must be a dict"),
    (42, TypeError, "train_dataset must be a list of dicts, a .jsonl/.json path or a datasets.Dataset"),
])
def test_load_records_errors(source, error, message):
    with pytest.raises(error, match=message):
        load_records(source, split="train")


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2 is not valid JSON"):
        load_records(path, split="eval")


def test_check_columns_says_what_is_missing():
    with pytest.raises(ValueError,
                       match=r"needs the columns 'text' or 'prompt' \+ 'completion'; example 0 has \['prompt'\]"):
        check_columns([{"prompt": "a"}], [("text",), ("prompt", "completion")], split="train", kind="SFT")
    with pytest.raises(ValueError, match=r"train_dataset\[1\] lacks \['chosen'\]"):
        check_columns([PAIRS[0], {**PAIRS[1], "chosen": None}], [("prompt", "chosen", "rejected")], split="train",
                      kind="preference")


def test_plain_pair_masks_the_prompt_and_appends_eos():
    enc = Encoder(tiny_tokenizer())
    p, c = enc.pair("is the cat good", "yes", where="x")
    assert p == ids("<s> is the cat good") and c == ids("yes </s>")
    batch = pad_sequences([p, []], [c, ids("a cat")], pad_id=0)
    assert batch["input_ids"].tolist() == [p + c, ids("a cat") + [0] * 5]
    assert batch["labels"].tolist() == [[-100] * 5 + c, ids("a cat") + [-100] * 5]
    assert batch["attention_mask"].sum(1).tolist() == [7, 2]


def test_chat_template_for_strings_and_conversations():
    enc = Encoder(tiny_tokenizer(chat_template=TEMPLATE))
    p, c = enc.pair("hello", "hello world", where="x")
    assert p == ids("<s> user hello </s> <s> assistant") and c == ids("hello world </s>")
    conv = enc.pair([{"role": "user", "content": "hello"}], [{"role": "assistant", "content": "hello world"}],
                    where="x")
    assert conv == (p, c)
    assert Encoder(tiny_tokenizer(chat_template=TEMPLATE), use_chat_template=False).pair("hello", "no", where="x") \
        == (ids("<s> hello"), ids("no </s>"))
    with pytest.raises(ValueError, match="need a tokenizer with a chat_template"):
        Encoder(tiny_tokenizer()).pair([{"role": "user", "content": "hi"}], "no", where="x")
    with pytest.raises(ValueError, match="use_chat_template=True but the tokenizer has no chat_template"):
        Encoder(tiny_tokenizer(), use_chat_template=True)


def test_prompt_alone_is_tokenized_as_in_a_pair():
    for enc in (Encoder(tiny_tokenizer(), max_prompt_length=3), Encoder(tiny_tokenizer(chat_template=TEMPLATE))):
        assert enc.prompt("what is the cat", where="x") == enc.pair("what is the cat", "yes", where="x")[0]
    no_eos = tiny_tokenizer()
    no_eos.eos_token = None  # pair(prompt, "") fails here (an empty completion); a prompt alone has none
    assert Encoder(no_eos).prompt("what", where="x") == ids("<s> what")
    no_bos = tiny_tokenizer()
    no_bos.backend_tokenizer.post_processor = None
    with pytest.raises(ValueError, match=r"train_dataset\[2\]: the prompt is empty after tokenization"):
        Encoder(no_bos).prompt("", where="train_dataset[2]")


def test_truncation():
    enc = Encoder(tiny_tokenizer(), max_length=6, max_prompt_length=3)
    p, c = enc.pair("what is the cat", "a red cat sat on the mat", where="x")
    assert p == ids("is the cat") and c == ids("a red cat")  # prompt keeps its end, completion its start
    with pytest.raises(ValueError, match=r"train_dataset\[3\]: the prompt has 5 tokens, which leaves no room for "
                                         "the completion within max_length=5; raise max_length, set max_prompt_length"):
        Encoder(tiny_tokenizer(), max_length=5).pair("what is the cat", "yes", where="train_dataset[3]")
    with pytest.raises(ValueError, match=r"max_prompt_length \(6\) must be < max_length \(6\)"):
        Encoder(tiny_tokenizer(), max_length=6, max_prompt_length=6)
    no_eos = tiny_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="x: the completion is empty after tokenization"):
        Encoder(no_eos).pair("what", "", where="x")


def test_preference_collation_puts_chosen_rows_first():
    enc = Encoder(tiny_tokenizer())
    examples = preference_examples([{**PAIRS[0], "margin": 1.0}, {**PAIRS[1], "margin": 2}], enc, split="train",
                                   prompt_required=True)
    batch = collate_pairs(examples, pad_id=0)
    assert batch["input_ids"].shape[0] == 4
    assert batch["labels"][0][batch["labels"][0] != -100].tolist() == ids("blue sky </s>")
    assert batch["labels"][2][batch["labels"][2] != -100].tolist() == ids("green dog sat </s>")
    assert batch["margin"].tolist() == [1.0, 2.0]
    implicit = preference_examples([{"chosen": "a cat", "rejected": "a dog"}], enc, split="train",
                                   prompt_required=False)
    assert implicit[0]["prompt_ids"] == [] and implicit[0]["chosen_ids"] == ids("<s> a cat </s>")
    with pytest.raises(ValueError, match="'prompt' \\+ 'chosen' \\+ 'rejected'"):
        preference_examples([{"chosen": "a", "rejected": "b"}], enc, split="train", prompt_required=True)


def test_sft_columns(tmp_path):
    tok = tiny_tokenizer(chat_template=TEMPLATE)
    trainer = SFTTrainer(model=tiny_llama(), args=cfg(SFTConfig, tmp_path), processing_class=tok)
    text = trainer.prepare_dataset([{"text": "a cat sat"}], split="train")
    assert text[0] == {"prompt_ids": [], "completion_ids": ids("<s> a cat sat </s>")}  # text: never templated
    chat = trainer.prepare_dataset([{"messages": [{"role": "user", "content": "hi"}]}], split="train")
    assert chat[0]["completion_ids"] == ids("<s> user <unk> </s>")
    pc = trainer.prepare_dataset(SFT[:1], split="train")[0]
    assert pc["prompt_ids"][-2:] == ids("<s> assistant") and pc["completion_ids"] == ids("blue sky </s>")
    trainer.args.completion_only_loss = False
    assert trainer.prepare_dataset(SFT[:1], split="train")[0]["prompt_ids"] == []


def test_reward_drops_sequences_longer_than_max_length(tmp_path):
    model = tiny_llama(cls=transformers.LlamaForSequenceClassification, num_labels=1)
    with pytest.warns(UserWarning, match="dropped 1 of 2 examples longer than max_length=8"):
        trainer = RewardTrainer(model=model, args=cfg(RewardConfig, tmp_path, max_length=8),
                                train_dataset=[PAIRS[1], PAIRS[2]], processing_class=tiny_tokenizer())
    assert len(trainer.train_examples) == 1
    with pytest.raises(ValueError, match="every example is longer than max_length=3"):
        trainer.args.max_length = 3
        trainer.prepare_dataset(PAIRS, split="eval")


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr_scheduler_type="cosinus"), "lr_scheduler_type 'cosinus' is unknown"),
    (dict(warmup_ratio=1.5), r"warmup_ratio must be in \[0, 1\)"),
    (dict(max_steps=-1, num_train_epochs=0), "set max_steps > 0 or num_train_epochs > 0"),
    (dict(save_steps=0), "save_steps must be an integer >= 1 or None"),
    (dict(max_grad_norm=0), "max_grad_norm must be > 0 or None"),
])
def test_config_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig(**kwargs)


def test_dpo_config_checks():
    with pytest.raises(ValueError, match="f_divergence_type 'kl' is unknown"):
        DPOConfig(f_divergence_type="kl")
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOConfig(beta=0)


def test_epochs_set_the_number_of_steps(tmp_path):
    trainer = SFTTrainer(model=tiny_llama(), args=cfg(SFTConfig, tmp_path, max_steps=-1, num_train_epochs=1.5,
                                                      gradient_accumulation_steps=2),
                         train_dataset=SFT, processing_class=tiny_tokenizer())
    assert trainer.total_steps() == 3  # 8 examples / 2 per micro-batch / 2 per step = 2 steps per epoch
    history = trainer.train()
    assert history[-1]["step"] == 3 and history[-1]["epoch"] == pytest.approx(1.5)


def test_coerce_converts_command_line_strings():
    hints = DPOConfig.field_types()
    assert coerce("learning_rate", "1e-4", hints["learning_rate"]) == 1e-4
    assert coerce("save_steps", "none", hints["save_steps"]) is None
    assert coerce("save_steps", "10", hints["save_steps"]) == 10
    assert coerce("bf16", "false", hints["bf16"]) is False
    assert coerce("resume_from_checkpoint", "true", hints["resume_from_checkpoint"]) is True
    assert coerce("resume_from_checkpoint", "out/checkpoint-2", hints["resume_from_checkpoint"]) == "out/checkpoint-2"
    assert coerce("report_to", "jsonl,tensorboard", hints["report_to"]) == ["jsonl", "tensorboard"]
    with pytest.raises(ValueError, match="max_steps: expected int, got 2.5"):
        coerce("max_steps", 2.5, hints["max_steps"])
