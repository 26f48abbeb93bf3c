"""The SFT, reward and DPO trainers end to end on CPU with tiny models built from configs (no downloads):
fused steps against unfused ones (full logits, TRL's formulas), resume, torchrun, checkpoints, NaN steps,
gradient accumulation, the CLI and the transformers integration."""
import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # noqa: E402

from fastpref.cli import main as cli_main  # noqa: E402
from fastpref.integrations.transformers import last_hidden_states, lm_head  # noqa: E402
from fastpref.trainers import (DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig,  # noqa: E402
                               SFTTrainer)

WORDS = ("<pad> <unk> <s> </s> user assistant the a cat dog sat on mat is good bad yes no what why hello "
         "world red blue green sky sun").split()
PAIRS = [
    {"prompt": "what is the sky", "chosen": "blue sky", "rejected": "green dog sat"},
    {"prompt": "hello", "chosen": "hello world", "rejected": "no"},
    {"prompt": "is the cat good", "chosen": "yes the cat is good", "rejected": "bad"},
    {"prompt": "why", "chosen": "the sun", "rejected": "why why why no"},
    {"prompt": "what sat on the mat", "chosen": "a cat", "rejected": "the red sun sat"},
    {"prompt": "is the dog bad", "chosen": "no", "rejected": "yes a bad dog"},
    {"prompt": "red or blue", "chosen": "blue", "rejected": "green green"},
    {"prompt": "the sun is", "chosen": "good", "rejected": "a mat on the sky"},
]
SFT = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS]
TINY = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def tiny_tokenizer(chat_template=None):
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])  # BOS, as Llama
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                               bos_token="<s>", eos_token="</s>")
    tok.chat_template = chat_template
    return tok


def tiny_llama(seed=0, cls=LlamaForCausalLM, **kw):
    torch.manual_seed(seed)
    return cls(LlamaConfig(**{**TINY, **kw}))


def cfg(config_class, tmp_path, **kw):
    # use_cpu: the comparisons with unfused fp32 steps hold on CPU; CUDA runs bf16 (test_cuda_bf16_training).
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                logging_steps=1, save_steps=None, report_to="none", disable_tqdm=True, use_cpu=True)
    return config_class(**{**base, **kw})


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def unfused_seq_logps(model, batch):
    """TRL's way: full logits, log_softmax, gather, masked sum (float64 after the model)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1), mask.sum(-1)


def assert_same_step(model, fused_loss, reference_loss):
    """The fused loss and its gradients against the reference's, same model."""
    model.zero_grad()
    fused_loss.backward()
    g_fused = grads(model)
    model.zero_grad()
    reference_loss.backward()
    g_ref = grads(model)
    torch.testing.assert_close(fused_loss.double(), reference_loss.double(), rtol=1e-5, atol=1e-6)
    assert g_fused.keys() == g_ref.keys() and g_ref
    for name in g_ref:
        torch.testing.assert_close(g_fused[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


# ---- fused step == unfused step ------------------------------------------------------------------

def test_sft_step_matches_unfused(tmp_path):
    model = tiny_llama()
    trainer = SFTTrainer(model=model, args=cfg(SFTConfig, tmp_path), train_dataset=SFT,
                         processing_class=tiny_tokenizer())
    batch = trainer.collate(trainer.train_examples[:4])
    loss, metrics = trainer.compute_loss(batch)
    logps, n = unfused_seq_logps(model, batch)
    assert_same_step(model, loss, -logps.sum() / n.sum())
    assert metrics["entropy"] > 0


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["pad", "pad-is-eos"])
def test_reward_step_matches_unfused(tmp_path, pad_is_eos):
    tokenizer = tiny_tokenizer()
    extra = {}
    if pad_is_eos:  # tokenizers without a pad token pad with EOS: the EOS is then not where the model pools
        tokenizer.pad_token = tokenizer.eos_token
        extra = dict(pad_token_id=tokenizer.eos_token_id)
    model = tiny_llama(cls=LlamaForSequenceClassification, num_labels=1, **extra)
    trainer = RewardTrainer(model=model, args=cfg(RewardConfig, tmp_path, center_rewards_coefficient=0.01),
                            train_dataset=PAIRS, processing_class=tokenizer)
    batch = trainer.collate(trainer.train_examples[:3])
    loss, metrics = trainer.compute_loss(batch)
    # transformers' own pooling (last token that is not the pad id) and TRL's loss with centering
    r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).double()
    rw, rl = r[:3], r[3:]
    reference = -F.logsigmoid(rw - rl).mean() + 0.01 * ((rw + rl) ** 2).mean()
    assert_same_step(model, loss, reference)
    assert metrics["accuracy"] == pytest.approx(float((rw > rl).double().mean()))


@pytest.mark.parametrize("arch", ["llama", "gemma2-softcap"])
def test_dpo_step_matches_unfused(tmp_path, arch):
    if arch == "llama":
        model = tiny_llama()
    else:
        torch.manual_seed(0)
        config = transformers.Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=3.0)
        model = transformers.Gemma2ForCausalLM(config)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg(DPOConfig, tmp_path, beta=0.3), train_dataset=PAIRS,
                         processing_class=tiny_tokenizer())
    batch = trainer.collate(trainer.train_examples[:4])
    loss, metrics = trainer.compute_loss(batch)
    policy, _ = unfused_seq_logps(model, batch)
    with torch.no_grad():
        reference, _ = unfused_seq_logps(ref, batch)
    logits = (policy[:4] - policy[4:]) - (reference[:4] - reference[4:])
    assert_same_step(model, loss, -F.logsigmoid(0.3 * logits).mean())
    margins = 0.3 * ((policy[:4] - reference[:4]) - (policy[4:] - reference[4:]))
    assert metrics["rewards/margins"] == pytest.approx(float(margins.detach().mean()), rel=1e-4)


def test_dpo_reference_modes_agree(tmp_path):
    """A frozen copy, precomputed log-probs of the initial policy and the PEFT model with its adapter
    disabled are the same reference when the policy starts there."""
    peft = pytest.importorskip("peft")
    tok = tiny_tokenizer()
    explicit = DPOTrainer(model=tiny_llama(), ref_model=tiny_llama(), args=cfg(DPOConfig, tmp_path / "a"),
                          train_dataset=PAIRS, processing_class=tok)
    pre = DPOTrainer(model=tiny_llama(), args=cfg(DPOConfig, tmp_path / "b", precompute_ref_log_probs=True),
                     train_dataset=PAIRS, processing_class=tok)
    assert pre.ref_model is None
    h1, h2 = explicit.train(), pre.train()
    assert [e["loss"] for e in h1] == pytest.approx([e["loss"] for e in h2], rel=1e-5)
    # after training, the cached reference is still the initial policy's
    batch = pre.collate(pre.train_examples[:2])
    torch.testing.assert_close(batch["ref_logps"], explicit.reference_logps(batch), rtol=1e-5, atol=1e-5)

    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    trainer = DPOTrainer(model=lora, args=cfg(DPOConfig, tmp_path / "c", gradient_checkpointing=True),
                         train_dataset=PAIRS, processing_class=tok)
    assert trainer.ref_model is None
    base = trainer.reference_logps(batch)
    torch.testing.assert_close(base, explicit.reference_logps(batch), rtol=1e-5, atol=1e-5)
    adapter = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    trainer.train()  # with gradient checkpointing
    assert all(not torch.equal(p, adapter[n]) for n, p in lora.named_parameters() if p.requires_grad)
    torch.testing.assert_close(trainer.reference_logps(batch), base)  # the adapter trained, the base did not


# ---- end to end --------------------------------------------------------------------------------------

def test_sft_end_to_end(tmp_path):
    tok = tiny_tokenizer()
    args = cfg(SFTConfig, tmp_path, max_steps=6, save_steps=3, report_to=["jsonl", "tensorboard"],
               lr_scheduler_type="cosine", warmup_steps=1, eval_steps=3)
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=SFT, eval_dataset=SFT[:3], processing_class=tok)
    before = trainer.evaluate()["loss"]
    history = trainer.train()
    train = [e for e in history if "loss" in e]
    assert [e["step"] for e in train] == list(range(1, 7))
    assert train[0]["learning_rate"] == 0.0 and train[1]["learning_rate"] == pytest.approx(1e-2)  # warmup
    assert trainer.evaluate()["loss"] < before
    assert any("eval_loss" in e for e in history)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"checkpoint-3", "checkpoint-6", "metrics.jsonl"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(history)
    if (out / "runs").exists():  # TensorBoard when it imports
        assert any((out / "runs").iterdir())
    trainer.save_model(tmp_path / "final")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "final")
    torch.testing.assert_close(reloaded.lm_head.weight, trainer.model.lm_head.weight.detach())
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "final").pad_token == "<pad>"


def test_reward_end_to_end(tmp_path):
    data = [{**p, "margin": 0.5} for p in PAIRS]
    model = tiny_llama(cls=LlamaForSequenceClassification, num_labels=1)
    trainer = RewardTrainer(model=model, args=cfg(RewardConfig, tmp_path, max_steps=8, per_device_train_batch_size=4),
                            train_dataset=data, eval_dataset=PAIRS, processing_class=tiny_tokenizer())
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert set(after) >= {"loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected"}
    assert after["loss"] < before["loss"] and after["accuracy"] >= before["accuracy"]


def test_dpo_end_to_end_bf16(tmp_path):
    """bf16 autocast (forced on CPU here; the default on CUDA) trains, and the chosen rewards pull ahead."""
    trainer = DPOTrainer(model=tiny_llama(), args=cfg(DPOConfig, tmp_path, max_steps=6, bf16=True, beta=0.5),
                         train_dataset=PAIRS, eval_dataset=PAIRS, processing_class=tiny_tokenizer())
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in history)
    metrics = trainer.evaluate()
    assert metrics["rewards/accuracies"] > 0.5 and metrics["loss"] < 0.69
    assert trainer.model.lm_head.weight.dtype == torch.float32  # fp32 master weights


def test_gradient_accumulation_is_the_big_batch(tmp_path):
    """SFT's token mean over 2 micro-batches of 2 equals one batch of 4 (uneven token counts)."""
    tok = tiny_tokenizer()
    runs = []
    for bs, accum in ((4, 1), (2, 2)):
        t = SFTTrainer(model=tiny_llama(), args=cfg(SFTConfig, tmp_path / f"{bs}", max_steps=2,
                                                    per_device_train_batch_size=bs, gradient_accumulation_steps=accum),
                       train_dataset=SFT, processing_class=tok)
        runs.append(([e["loss"] for e in t.train()], t.model.lm_head.weight.detach()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-4, atol=1e-6)


# ---- checkpoints -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sft", "dpo-precomputed"])
def test_resume_gives_the_uninterrupted_run(tmp_path, kind):
    tok = tiny_tokenizer()

    def make(out, **kw):
        if kind == "sft":
            args = cfg(SFTConfig, out, max_steps=4, gradient_accumulation_steps=2, lr_scheduler_type="cosine",
                       warmup_steps=1, **kw)
            return SFTTrainer(model=tiny_llama(), args=args, train_dataset=SFT, processing_class=tok)
        args = cfg(DPOConfig, out, max_steps=4, precompute_ref_log_probs=True, beta=0.5, **kw)
        return DPOTrainer(model=tiny_llama(), args=args, train_dataset=PAIRS, processing_class=tok)

    full = make(tmp_path / "a", save_steps=2)
    losses = [e["loss"] for e in full.train()]
    resumed = make(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    history = resumed.train()
    assert [e["step"] for e in history] == [1, 2, 3, 4]
    assert [e["loss"] for e in history] == pytest.approx(losses, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(resumed.model.lm_head.weight, full.model.lm_head.weight)


def test_interrupted_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    trainer = SFTTrainer(model=tiny_llama(), args=cfg(SFTConfig, tmp_path, max_steps=4, save_steps=2),
                         train_dataset=SFT, processing_class=tiny_tokenizer())
    out = tmp_path / "out"
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if ".tmp-checkpoint-4" in str(f) and str(f).endswith("scheduler.pt"):
            raise OSError("No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        trainer.train()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # no checkpoint-4, no temp folder
    monkeypatch.undo()
    # the same failure while overwriting an existing checkpoint leaves the old one whole
    before = {p.name: p.read_bytes() for p in (out / "checkpoint-2").iterdir()}
    trainer.step = 2
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-2").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    resumed = SFTTrainer(model=tiny_llama(seed=1),
                         args=cfg(SFTConfig, tmp_path, max_steps=3, resume_from_checkpoint=True),
                         train_dataset=SFT, processing_class=tiny_tokenizer())
    assert [e["step"] for e in resumed.train()] == [1, 2, 3]


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    trainer = SFTTrainer(model=tiny_llama(), args=cfg(SFTConfig, tmp_path, max_steps=6, max_bad_steps=3),
                         train_dataset=SFT, processing_class=tiny_tokenizer())
    real, calls = trainer.compute_loss, []

    def compute_loss(batch):
        calls.append(1)
        loss, metrics = real(batch)
        return (loss * float("nan") if len(calls) == 2 or len(calls) >= 4 else loss), metrics

    trainer.compute_loss = compute_loss
    snapshots, real_step = [], trainer.training_step

    def training_step(micro_batches):
        snapshots.append(trainer.model.lm_head.weight.detach().clone())
        return real_step(micro_batches)

    trainer.training_step = training_step
    with pytest.warns(RuntimeWarning, match="non-finite"):
        with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss"):
            trainer.train()
    assert [e["step"] for e in trainer.history] == [1, 3]
    torch.testing.assert_close(snapshots[1], snapshots[2])  # step 2 left the weights alone
    assert not torch.equal(snapshots[2], snapshots[3])  # step 3 updated them


# ---- torchrun and the CLI --------------------------------------------------------------------------

def write_run(tmp_path, **settings):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    spec = {"model": {"model_type": "llama", **TINY}, "tokenizer": str(tok_dir), "train_dataset": str(data),
            "output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 2,
            "learning_rate": "1e-2", "logging_steps": 1, "report_to": "jsonl", "disable_tqdm": True, "use_cpu": True,
            **settings}
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path


def test_torchrun_two_process_dpo_matches_one_process(tmp_path):
    """2 ranks x 2 pairs per step (gloo) == 1 process x 4 pairs: same losses, one writer."""
    config = write_run(tmp_path, beta=0.5, save_steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastpref", "train", "dpo", "--config", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [1, 2]  # rank 0 alone writes
    assert (out / "checkpoint-2" / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert len(torch.load(out / "checkpoint-2" / "rng_state.pt")) == 2

    from fastpref.trainers.cli import build_trainer, load_spec

    spec = load_spec(config, {"per_device_train_batch_size": "4", "output_dir": str(tmp_path / "single")})
    single = build_trainer("dpo", spec).train()
    assert [e["loss"] for e in lines] == pytest.approx([e["loss"] for e in single], rel=1e-5)


def test_cli_trains_with_overrides(tmp_path, capsys):
    config = write_run(tmp_path)
    rc = cli_main(["train", "reward", "--config", str(config), "--learning_rate", "1e-3", "--max_steps=3",
                   "--save_steps", "none", "--eval_dataset", str(tmp_path / "pairs.jsonl")])
    assert rc == 0
    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [1, 2, 3] and lines[0]["learning_rate"] == pytest.approx(1e-3)
    assert not list(out.glob("checkpoint-*"))
    assert transformers.AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1
    assert "eval: " in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--learning_rat", "1e-3"], "unknown key 'learning_rat'; did you mean 'learning_rate'?"),
    (["--learning_rate", "fast"], "learning_rate: expected float, got 'fast'"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be an integer >= 1"),
    (["--loss_type", "sigmod"], "loss_type 'sigmod' is unknown"),
    (["--max_length", "3"], "leaves no room for the completion within max_length=3"),
    (["--train_dataset", "missing.jsonl"], "train_dataset: no such file"),
    (["stray"], "expected --<field> [value], got 'stray'"),
])
def test_cli_rejects_bad_settings(tmp_path, capsys, args, message):
    config = write_run(tmp_path)
    assert cli_main(["train", "dpo", "--config", str(config), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_bad_yaml(tmp_path, capsys):
    config = write_run(tmp_path)
    text = config.read_text()
    config.write_text(text + "warmup_ratoi: 0.1\n")
    assert cli_main(["train", "sft", "--config", str(config)]) == 2
    assert "unknown key 'warmup_ratoi'; did you mean 'warmup_ratio'?" in capsys.readouterr().err
    config.write_text("".join(line + "\n" for line in text.splitlines() if not line.startswith("model:")
                              and not line.startswith("  ")))
    assert cli_main(["train", "sft", "--config", str(config)]) == 2
    assert "model: required" in capsys.readouterr().err
    config.write_text(text + "ref_model: {vocab_size: 30}\n")
    assert cli_main(["train", "dpo", "--config", str(config)]) == 2
    assert "ref_model: a config dict needs model_type" in capsys.readouterr().err
    config.write_text("- just a list\n")
    assert cli_main(["train", "dpo", "--config", str(config)]) == 2
    assert "the YAML must be a mapping" in capsys.readouterr().err


# ---- errors that say what to fix --------------------------------------------------------------------

def test_trainers_reject_bad_inputs(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="dpo|lacks \\['rejected'\\]"):
        DPOTrainer(model=tiny_llama(), args=cfg(DPOConfig, tmp_path),
                   train_dataset=PAIRS[:1] + [{"prompt": "a", "chosen": "b"}], processing_class=tok)
    with pytest.raises(ValueError, match="train_dataset is empty"):
        SFTTrainer(model=tiny_llama(), args=cfg(SFTConfig, tmp_path), train_dataset=[], processing_class=tok)
    with pytest.raises(TypeError, match="sequence-classification"):
        RewardTrainer(model=tiny_llama(), args=cfg(RewardConfig, tmp_path), train_dataset=PAIRS, processing_class=tok)
    with pytest.raises(TypeError, match="args must be a DPOConfig"):
        DPOTrainer(model=tiny_llama(), args=cfg(SFTConfig, tmp_path), train_dataset=PAIRS, processing_class=tok)
    with pytest.raises(ValueError, match="processing_class"):
        SFTTrainer(model=tiny_llama(), args=cfg(SFTConfig, tmp_path), train_dataset=SFT)
    with pytest.raises(ValueError, match="needs a train_dataset"):
        SFTTrainer(model=tiny_llama(), args=cfg(SFTConfig, tmp_path), processing_class=tok).train()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        SFTTrainer(model=tiny_llama(), args=cfg(SFTConfig, tmp_path, resume_from_checkpoint=True),
                   train_dataset=SFT, processing_class=tok).train()
    with pytest.raises(ValueError, match="report_to"):
        SFTConfig(report_to="wandb")


# ---- the transformers integration ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama-tied", "gemma2", "cohere", "granite", "hyperclovax", "peft-modules-to-save",
                                  "peft-tied-trainable-tokens"])
def test_head_reproduces_the_models_log_probs(arch):
    torch.manual_seed(0)
    kw = dict(TINY, head_dim=8)
    if arch == "llama-tied":
        model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True))
        assert lm_head(model).weight is model.model.embed_tokens.weight
    elif arch == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**kw, final_logit_softcapping=2.0))
        assert lm_head(model).softcap == 2.0
    elif arch == "cohere":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**kw, logit_scale=0.5))
        assert lm_head(model).scale == 0.5
    elif arch == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**kw, logits_scaling=4.0))
        assert lm_head(model).scale == 0.25
    elif arch == "hyperclovax":  # MuP: multiplies the logits by logits_scaling, where Granite divides
        if not hasattr(transformers, "HyperCLOVAXForCausalLM"):
            pytest.skip("this transformers has no HyperCLOVAX")
        model = transformers.HyperCLOVAXForCausalLM(transformers.HyperCLOVAXConfig(**kw, logits_scaling=4.0))
        assert lm_head(model).scale == 4.0
    elif arch == "peft-tied-trainable-tokens":
        # With tied embeddings PEFT wraps the head too (TrainableTokensWrapper): the trained rows are part of it.
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(tiny_llama(tie_word_embeddings=True),
                                    peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "trainable_tokens_delta" in name:
                    p.add_(torch.randn_like(p))
        hidden = last_hidden_states(model, torch.tensor([[2, 4, 6]])).detach()  # the head alone gets gradients
        lm_head(model).logprobs(hidden, torch.tensor([[3, 5, 8]])).sum().backward()
        assert any(p.grad is not None for n, p in model.named_parameters() if "trainable_tokens_delta" in n)
        with model.disable_adapter(), torch.no_grad():
            assert torch.equal(lm_head(model).weight, model.get_input_embeddings().token_adapter.base_layer.weight)
    else:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                  modules_to_save=["lm_head"]))
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2)
    ids = torch.randint(0, len(WORDS), (2, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits.double().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        got = lm_head(model).logprobs(last_hidden_states(model, ids)[:, :-1], ids[:, 1:])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_lora_on_the_head_is_rejected():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(TypeError, match="LoRA adapter on the output head"):
        lm_head(model)


def test_import_fastpref_does_not_import_transformers():
    code = ("import sys, fastpref, fastpref.integrations, fastpref.trainers, fastpref.cli; "
            "from fastpref.integrations import lm_head; "
            "assert 'transformers' not in sys.modules, 'imported transformers'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import fastpref.integrations as integrations

        assert integrations.transformers.lm_head is lm_head


# ---- GPU -------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["sft", "reward", "dpo"])
def test_cuda_bf16_training(tmp_path, kind):
    """On a GPU (bf16 autocast by default, the fused ops on bf16 inputs, V = 32000): the first loss agrees
    with the fp32 unfused one to bf16 accuracy, and a few steps lower it."""
    big = dict(vocab_size=32000, hidden_size=256, intermediate_size=512)
    args = dict(use_cpu=False, max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3)
    tok = tiny_tokenizer()
    if kind == "reward":
        model = tiny_llama(cls=LlamaForSequenceClassification, num_labels=1, **big)
        trainer = RewardTrainer(model=model, args=cfg(RewardConfig, tmp_path, **args), train_dataset=PAIRS,
                                processing_class=tok)
    elif kind == "sft":
        model = tiny_llama(**big)
        trainer = SFTTrainer(model=model, args=cfg(SFTConfig, tmp_path, **args), train_dataset=SFT,
                             processing_class=tok)
    else:
        model = tiny_llama(**big)
        trainer = DPOTrainer(model=model, ref_model=tiny_llama(seed=1, **big),
                             args=cfg(DPOConfig, tmp_path, beta=0.5, **args),
                             train_dataset=PAIRS, processing_class=tok)
    assert trainer.bf16 and trainer.device.type == "cuda"
    batch = trainer.to_device(trainer.collate(trainer.train_examples[:4]))
    with torch.no_grad():
        loss, _ = trainer.compute_loss(batch)
        if kind == "sft":
            logps, n = unfused_seq_logps(model, batch)
            expected = -logps.sum() / n.sum()
        elif kind == "reward":
            r = trainer.rewards(batch["input_ids"], batch["attention_mask"])
            expected = -F.logsigmoid(r[:4] - r[4:]).mean()
        else:
            policy, _ = unfused_seq_logps(model, batch)
            ref, _ = unfused_seq_logps(trainer.ref_model, batch)
            expected = -F.logsigmoid(0.5 * ((policy[:4] - policy[4:]) - (ref[:4] - ref[4:]))).mean()
    torch.testing.assert_close(loss.double(), expected.double(), rtol=2e-2, atol=5e-2)
    losses = [e["loss"] for e in trainer.train()]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
