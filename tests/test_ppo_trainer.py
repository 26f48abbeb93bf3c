"""PPOTrainer / PPOConfig: advantages against hand-computed values, the fused training step against an
unfused one written out here (full logits, log_softmax, the clipped surrogate), and short end-to-end runs
with the demo task's tiny model (GAE + reward model, GRPO + reward function, KL in the reward or the loss,
full-vocabulary divergence, resume, CLI)."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from fastpref.trainers.demo import ArithmeticTask, build_model, build_tokenizer, reward_fn  # noqa: E402
from fastpref.trainers.ppo import (PPOConfig, PPOTrainer, gae_advantages, group_advantages,  # noqa: E402
                                   masked_whiten)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask(max_operand=20)


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_completion_length=4, max_prompt_length=None, learning_rate=1e-3, logging_steps=1,
                save_steps=None, report_to="none", disable_tqdm=True, num_ppo_epochs=2, temperature=1.0, seed=0)
    return PPOConfig(**{**base, **kw})


def _length_reward(prompts, completions):
    """A reward that varies even for an untrained model (the arithmetic one is ~always 0 there)."""
    return [len(c) / 4 for c in completions]


def _trainer(tmp_path, tok, task, *, reward_model=None, ref_model=None, reward=reward_fn, **kw):
    return PPOTrainer(build_model(tok, hidden_size=32, seed=0), ref_model=ref_model, reward_model=reward_model,
                      reward_fn=None if reward_model is not None else reward, args=_config(tmp_path, **kw),
                      train_dataset=task.prompt_dataset(32), eval_dataset=task.prompt_dataset(6, split="eval"),
                      processing_class=tok)


# ---- advantages -------------------------------------------------------------------------------------
def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)  # row 2 ends after 2 tokens
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: deltas (0.9*0.6-0.5, 0.9*0.7-0.6, 1-0.7) = (0.04, 0.03, 0.3), A_t = delta_t + 0.72 A_{t+1}
    a2 = 0.3
    a1 = 0.03 + 0.72 * a2
    a0 = 0.04 + 0.72 * a1
    # row 2: V = 0 past the end: deltas (0.9*1-1, 2-1) = (-0.1, 1)
    b1 = 1.0
    b0 = -0.1 + 0.72 * b1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7], [b0 + 1.0, b1 + 1.0, 0.0]]))


def test_group_advantages_formula():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0, 1.0])
    adv = group_advantages(r, 4)
    for g in range(3):
        x = r[4 * g:4 * g + 4]
        mean = x.sum() / 4
        std = math.sqrt(float(((x - mean) ** 2).sum()) / 3)  # unbiased, as TRL
        torch.testing.assert_close(adv[4 * g:4 * g + 4], (x - mean) / (std + 1e-4))
    torch.testing.assert_close(group_advantages(r, 4, scale=False), r - r.view(3, 4).mean(1).repeat_interleave(4))
    assert torch.all(adv[4:8] == 0)  # a group of equal rewards teaches nothing


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    w = masked_whiten(x, mask)
    kept = x[mask]
    torch.testing.assert_close(w[mask], (kept - kept.mean()) / kept.std(), rtol=1e-4, atol=1e-5)
    assert w[0, 2] == 0


# ---- the fused step against an unfused reference --------------------------------------------------
def _reference_loss(trainer, batch, *, old_logp, eps, kl_coef=0.0, ref_logp=None, vf_coef=0.0, vclip=None):
    """The PPO loss written out from the full logits (token-mean, as configured in the test)."""
    model, T = trainer.model, trainer.args.temperature
    C = batch["labels"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], output_hidden_states=True)
    logits = out.logits[:, -C - 1:-1].float() / T
    mask = batch["labels"] != -100
    logp = torch.log_softmax(logits, -1).gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    A = batch["advantages"]
    ratio = torch.exp(logp - old_logp)
    per_token = torch.maximum(-A * ratio, -A * ratio.clamp(1 - eps, 1 + eps))
    if kl_coef:
        r = ref_logp - logp
        per_token = per_token + kl_coef * (torch.exp(r) - 1 - r)  # k3
    loss = (per_token * mask).sum() / mask.sum()
    if vf_coef:
        hidden = out.hidden_states[-1][:, -C - 1:-1].detach()  # the critic does not pull the policy's features
        v = trainer.value_head(hidden).squeeze(-1)
        old, R = batch["values"], batch["returns"]
        vl = torch.maximum((v - R) ** 2, (old + (v - old).clamp(-vclip, vclip) - R) ** 2)
        loss = loss + vf_coef * 0.5 * (vl * mask).sum() / mask.sum()
    return loss, logp, ratio, mask


@pytest.mark.parametrize("mode", ["gae", "grpo_kl_loss"])
def test_fused_step_matches_unfused_reference(tmp_path, tok, task, mode):
    torch.manual_seed(0)
    if mode == "gae":
        trainer = _trainer(tmp_path, tok, task, kl_coef=0.0)
        torch.nn.init.normal_(trainer.value_head.weight, std=0.5)  # zero-initialized: make values non-trivial
    else:
        trainer = _trainer(tmp_path, tok, task, advantage_estimator="grpo", num_generations=4, use_kl_loss=True,
                           kl_coef=0.3, kl_estimator="k3", ref_model=build_model(tok, hidden_size=32, seed=1))
    buf = trainer.rollout(trainer._rollout_prompts(0))["batch"]
    batch = {k: v for k, v in buf.items() if k != "old_logp"}
    with torch.no_grad():  # an off-policy old_logp so that some ratios clip on each side
        _, logp, _, mask = _reference_loss(trainer, batch, old_logp=torch.zeros_like(buf["advantages"]), eps=0.2)
    batch["old_logp"] = torch.where(mask, logp + 0.4 * torch.randn_like(logp), 0.0)
    if mode == "gae":
        batch["returns"] = batch["returns"] + torch.randn_like(batch["returns"]) * mask  # exercise the value clip
    params = [p for _, p in trainer.trainable_named_parameters()]

    loss, metrics = trainer.compute_loss(batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref_loss, _, ratio, _ = _reference_loss(
        trainer, batch, old_logp=batch["old_logp"], eps=0.2, kl_coef=trainer.args.kl_coef if mode != "gae" else 0.0,
        ref_logp=batch.get("ref_logp"), vf_coef=0.1 if mode == "gae" else 0.0, vclip=0.2)
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (name, _), g, r in zip(trainer.trainable_named_parameters(), grads, ref_grads):
        if r is None:
            assert g is None or torch.all(g == 0), name
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=name)
    clipped = ((ratio > 1.2) | (ratio < 0.8))[mask].float().mean()
    assert clipped > 0.05  # the test exercises the clipped branch
    assert metrics["ratio/mean"] == pytest.approx(float(ratio[mask].mean().detach()), rel=1e-4)


def test_first_epoch_runs_on_policy_and_fills_old_logp(tmp_path, tok, task):
    trainer = _trainer(tmp_path, tok, task, kl_coef=0.0, max_steps=2)
    trainer._build_optimizer(trainer.total_steps())
    batches = trainer.next_micro_batches()
    assert all("old_logp" not in b for b in batches)  # no forward pass for old log-probs at rollout
    buf = trainer._buffer["batch"]
    with torch.no_grad():
        expected = trainer._logprobs(trainer.model, buf)
    metrics = trainer.training_step(batches)
    assert metrics["ratio/mean"] == pytest.approx(1.0) and metrics["clip_ratio/region"] == 0.0
    torch.testing.assert_close(buf["old_logp"], expected, rtol=1e-5, atol=1e-5)
    assert all("old_logp" in b for b in trainer.next_micro_batches())  # the second epoch is off-policy


def test_value_learning_rate_is_the_value_heads_group(tmp_path, tok, task):
    trainer = _trainer(tmp_path, tok, task, value_learning_rate=3e-3, weight_decay=0.1)
    trainer._build_optimizer(trainer.total_steps())
    *policy, head = trainer.optimizer.param_groups
    assert head["params"] == list(trainer.value_head.parameters()) and head["lr"] == 3e-3
    assert [g["weight_decay"] for g in policy] == [0.1, 0.0] and all(g["lr"] == 1e-3 for g in policy)
    assert sum(len(g["params"]) for g in policy) == len(list(trainer.model.parameters()))


# ---- end to end -------------------------------------------------------------------------------------
def _finite(entry):
    return all(math.isfinite(v) for v in entry.values() if isinstance(v, float))


@pytest.mark.parametrize("kw", [
    dict(advantage_estimator="gae", kl_coef=0.05),                                    # classic PPO, KL in reward
    dict(advantage_estimator="gae", num_mini_batches=2, kl_coef=0.0, gradient_accumulation_steps=1),
    dict(advantage_estimator="grpo", num_generations=4, kl_coef=0.0),                 # GRPO without reference
    dict(advantage_estimator="grpo", num_generations=4, scale_rewards=False, use_kl_loss=True, kl_coef=0.05,
         kl_estimator="k3", loss_agg="seq-mean-token-sum-norm"),                      # Dr. GRPO, KL in the loss
    dict(advantage_estimator="grpo", num_generations=2, use_kl_loss=True, kl_coef=0.05,
         divergence="forward_kl", loss_agg="seq-mean-token-mean"),                    # full-vocabulary penalty
])
def test_train_end_to_end_reward_fn(tmp_path, tok, task, kw):
    trainer = _trainer(tmp_path, tok, task, max_steps=3, reward=_length_reward, **kw)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    history = trainer.train()
    assert [h["step"] for h in history] == [1, 2, 3]
    for key in ("loss", "policy_loss", "reward", "entropy", "clip_ratio/low", "clip_ratio/high",
                "completions/mean_length", "ratio/mean"):
        assert key in history[-1], key
    assert all(_finite(h) for h in history)
    if kw["advantage_estimator"] == "gae":
        assert "value_loss" in history[-1] and "vf_clipfrac" in history[-1]
    if kw.get("kl_coef"):
        assert "kl" in history[-1]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    ev = trainer.evaluate()
    assert set(ev) == {"reward", "completions/mean_length"} and 0 <= ev["reward"] <= 1.25


def test_train_with_reward_model_checkpoint_and_resume(tmp_path, tok, task):
    rm = build_model(tok, kind="reward", hidden_size=32, seed=3)
    trainer = _trainer(tmp_path, tok, task, reward_model=rm, max_steps=2, save_steps=2, report_to="jsonl")
    history = trainer.train()
    assert all(_finite(h) for h in history) and "value_loss" in history[-1]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert "value_head.weight" in saved and not torch.all(saved["value_head.weight"] == 0)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    resumed = _trainer(tmp_path, tok, task, reward_model=rm, max_steps=4, save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.step == 4 and [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    resumed.save_model(tmp_path / "final")
    assert (tmp_path / "final" / "value_head.safetensors").is_file()


def test_config_errors():
    with pytest.raises(ValueError, match="num_generations >= 2"):
        PPOConfig(advantage_estimator="grpo", num_generations=1)
    with pytest.raises(ValueError, match="whole groups"):
        PPOConfig(advantage_estimator="grpo", num_generations=3, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match="use_kl_loss"):
        PPOConfig(divergence="forward_kl")
    with pytest.raises(ValueError, match="advantage_estimator"):
        PPOConfig(advantage_estimator="rloo")


def test_needs_exactly_one_reward_source(tmp_path, tok, task):
    with pytest.raises(ValueError, match="exactly one"):
        PPOTrainer(build_model(tok, hidden_size=32), args=_config(tmp_path), train_dataset=task.prompt_dataset(8),
                   processing_class=tok)


def test_cli_train_ppo(tmp_path, tok, task):
    from fastpref.cli import main

    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task.prompt_dataset(16)))
    model = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 32,
             "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    import yaml

    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump({
        "model": model, "tokenizer": str(tmp_path / "tok"), "train_dataset": str(tmp_path / "train.jsonl"),
        "reward_fn": "fastpref.trainers.demo:reward_fn", "advantage_estimator": "grpo", "num_generations": 4,
        "per_device_train_batch_size": 8, "max_completion_length": 4, "max_steps": 2, "save_steps": None,
        "report_to": ["none"], "disable_tqdm": True}))
    assert main(["train", "ppo", "--config", str(tmp_path / "ppo.yaml"), "--output_dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
