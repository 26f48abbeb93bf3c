"""fastpref.integrations.trl: TRL's DPO, reward and GRPO trainers with fastpref's fused losses, against TRL's
own path on tiny Llama models built from configs (CPU, fp32, offline): the same loss, gradients and metrics
for the options both support, and a training step for the options only fastpref supports."""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
trl = pytest.importorskip("trl")
pytest.importorskip("peft")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,  # noqa: E402
                          PreTrainedTokenizerFast)

from fastpref.integrations.trl import (FastprefDPOTrainer, FastprefGRPOTrainer,  # noqa: E402
                                       FastprefRewardTrainer, patch_trl)

WORDS = "<pad> <unk> <s> </s> the a cat dog sat on mat is good bad yes no what why hello world red blue sky".split()
PAIRS = [  # completions start with a space: TRL tokenizes prompt + completion as one string
    {"prompt": "what is the sky", "chosen": " blue", "rejected": " the red dog sat"},
    {"prompt": "hello", "chosen": " hello world", "rejected": " no"},
    {"prompt": "is the cat good", "chosen": " yes the cat is good", "rejected": " bad"},
    {"prompt": "why", "chosen": " the sky", "rejected": " why why no"},
]
ARGS = dict(report_to=[], bf16=False, use_cpu=True, gradient_checkpointing=False, per_device_train_batch_size=4,
            max_steps=1, logging_steps=1, save_strategy="no", disable_tqdm=True, learning_rate=1e-3)


def tokenizer():
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny(cls=LlamaForCausalLM, **kw):
    torch.manual_seed(0)
    return cls(LlamaConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, pad_token_id=0, bos_token_id=2,
                           eos_token_id=3, **kw))


def nudge(model):
    """Move the policy away from the reference (the same way for every copy), so that the rewards are not
    rounding noise around 0."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}


def assert_same_step(ours, theirs, inputs):
    """Same loss and parameter gradients on ``inputs`` (returned); our metrics are TRL's (names and values)."""
    loss, grads = loss_and_grads(ours, inputs)
    ref_loss, ref_grads = loss_and_grads(theirs, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    mine, trls = ours._metrics["train"], theirs._metrics["train"]
    assert mine and set(mine) <= set(trls), set(mine) - set(trls)
    for key, values in mine.items():
        assert values == pytest.approx(trls[key], rel=1e-4, abs=1e-6), key
    return grads


# --- DPO -------------------------------------------------------------------------------------------------------

def dpo_pair(tmp_path, peft=False, **options):
    """(fastpref trainer, TRL trainer) on copies of one tiny model and reference (a LoRA adapter, whose
    disabled model is the reference, with ``peft``)."""
    args = trl.DPOConfig(output_dir=str(tmp_path), **ARGS, **options)
    base = tiny()
    trainers = []
    for cls in (FastprefDPOTrainer, trl.DPOTrainer):
        model = copy.deepcopy(base)
        if peft:
            torch.manual_seed(0)  # the adapter's random initialization
            model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        ref = None if peft or options.get("precompute_ref_log_probs") else copy.deepcopy(base)
        trainers.append(cls(model=model, ref_model=ref, args=copy.deepcopy(args),
                            train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer()))
        nudge(trainers[-1].model)  # after any precomputed reference log-probs
    return trainers


@pytest.mark.parametrize("options", [
    dict(loss_type=["sigmoid"]),
    dict(loss_type=["ipo"]),
    dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type=["hinge"], f_divergence_type="js_divergence"),
    dict(loss_type=["robust"], label_smoothing=0.1),
    dict(loss_type=["apo_zero", "sft"], loss_weights=[1.0, 0.5]),  # fused, the SFT term as nll_coef
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO: per-token path
    dict(loss_type=["discopop"], ld_alpha=0.5),
    dict(loss_type=["aot"], precompute_ref_log_probs=True),
], ids=lambda o: "-".join(o["loss_type"]) + "".join(f"-{k}" for k in o if k not in ("loss_type", "loss_weights")))
def test_dpo_matches_trl(tmp_path, options):
    ours, theirs = dpo_pair(tmp_path, **options)
    assert_same_step(ours, theirs, next(iter(theirs.get_train_dataloader())))


def test_dpo_peft_reference_matches_trl(tmp_path):
    ours, theirs = dpo_pair(tmp_path, peft=True, loss_type=["sigmoid"])
    grads = assert_same_step(ours, theirs, next(iter(theirs.get_train_dataloader())))
    assert all("lora_" in name for name in grads)  # the frozen base model gets none


def test_dpo_conservative_sigmoid_trains(tmp_path):
    """Label smoothing on sigmoid (conservative DPO; TRL 1.16 ignores it there) with precomputed reference
    log-probs: -(1-eps) log sig(z) - eps log sig(-z) = -log sig(z) + eps z, z the reward margin; then one
    training step."""
    ours, theirs = dpo_pair(tmp_path, loss_type=["sigmoid"], label_smoothing=0.2, precompute_ref_log_probs=True)
    batch = next(iter(ours.get_train_dataloader()))
    smoothed, plain = ours.compute_loss(ours.model, batch), theirs.compute_loss(theirs.model, batch)
    margin = ours._metrics["train"]["rewards/margins"][-1]
    torch.testing.assert_close(smoothed.item(), plain.item() + 0.2 * margin, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in ours.model.parameters()]
    assert ours.train().training_loss > 0 and "ref_chosen_logps" in ours.train_dataset.column_names
    assert any(not torch.equal(a, b) for a, b in zip(before, ours.model.parameters()))


def test_dpo_refuses_what_it_cannot_compute(tmp_path):
    with pytest.raises(NotImplementedError, match="use_weighting"):
        dpo_pair(tmp_path, loss_type=["sigmoid"], use_weighting=True)
    with pytest.raises(ValueError, match="sft"):
        dpo_pair(tmp_path, loss_type=["sft"])


# --- Reward ----------------------------------------------------------------------------------------------------

def test_reward_matches_trl(tmp_path):
    args = trl.RewardConfig(output_dir=str(tmp_path), **ARGS, center_rewards_coefficient=0.01)
    rows = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"],
             "margin": float(i) / 2} for i, p in enumerate(PAIRS)]
    base = tiny(LlamaForSequenceClassification, num_labels=1)
    ours, theirs = (cls(model=copy.deepcopy(base), args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=tokenizer()) for cls in (FastprefRewardTrainer, trl.RewardTrainer))
    batch = next(iter(theirs.get_train_dataloader()))
    assert "margin" in batch
    assert_same_step(ours, theirs, batch)


# --- GRPO ------------------------------------------------------------------------------------------------------

def reward_length(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A saved tiny model: TRL's GRPOTrainer builds its reference model from a path when beta != 0."""
    path = tmp_path_factory.mktemp("tiny")
    tiny().save_pretrained(path)
    return str(path)


def grpo_pair(tmp_path, model_path, **options):
    args = trl.GRPOConfig(output_dir=str(tmp_path), **ARGS, num_generations=2, max_completion_length=4,
                          **options)
    data = Dataset.from_list([{"prompt": p["prompt"]} for p in PAIRS[:2]])
    return [cls(model=model_path, reward_funcs=reward_length, args=copy.deepcopy(args), train_dataset=data,
                processing_class=tokenizer()) for cls in (FastprefGRPOTrainer, trl.GRPOTrainer)]


def grpo_inputs(ours, theirs, off_policy):
    """One generated batch (completions, rewards, advantages) for both trainers; ``off_policy``: old log-probs
    away from the policy's, so that the clips act."""
    for trainer in (ours, theirs):
        trainer.model.train()  # from_pretrained gives eval mode; the training loop sets both
        trainer.current_gradient_accumulation_steps = 1
    inputs = theirs._prepare_inputs(next(iter(theirs.get_train_dataloader())))
    if off_policy:
        torch.manual_seed(1)
        with torch.no_grad():
            logp, _, _ = theirs._get_per_token_logps_and_entropies(
                theirs.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])
        inputs["old_per_token_logps"] = logp + 0.5 * torch.randn_like(logp)
    return inputs


@pytest.mark.parametrize("off_policy, options", [
    (False, dict(loss_type="grpo", beta=0.04)),  # TRL's bias-corrected k3 on-policy is fastpref's "k3+"
    (True, dict(loss_type="bnpo", entropy_coef=0.01)),
    (True, dict(loss_type="dapo", epsilon_high=0.28, delta=1.3, entropy_coef=0.01)),
    (True, dict(loss_type="dr_grpo", beta=0.04, use_bias_correction_kl=False)),
    (True, dict(loss_type="luspo", importance_sampling_level="sequence")),
    (True, dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4)),  # GSPO
], ids=lambda o: o if isinstance(o, bool) else "-".join(f"{k}={v}" for k, v in o.items()))
def test_grpo_matches_trl(tmp_path, model_path, off_policy, options):
    ours, theirs = grpo_pair(tmp_path, model_path, **options)
    assert_same_step(ours, theirs, grpo_inputs(ours, theirs, off_policy))


def test_grpo_vllm_importance_sampling_matches_trl(tmp_path, model_path):
    """vLLM's truncated importance-sampling ratios (computed at generation, with vLLM) weight the surrogate."""
    ours, theirs = grpo_pair(tmp_path, model_path, loss_type="dapo")
    inputs = grpo_inputs(ours, theirs, off_policy=True)
    inputs["importance_sampling_ratio"] = torch.rand(inputs["completion_mask"].shape) * 2
    for trainer in (ours, theirs):
        trainer.use_vllm = True  # only the loss reads it here: the batch is generated already
    assert_same_step(ours, theirs, inputs)


def test_grpo_entropy_bonus_trains(tmp_path, model_path):
    """grpo's per-sequence weights: fastpref averages the entropy bonus like the loss (not TRL's token mean)."""
    ours, _ = grpo_pair(tmp_path, model_path, loss_type="grpo", entropy_coef=0.05, beta=0.04)
    history = ours.train()
    assert torch.isfinite(torch.tensor(history.training_loss))
    logged = ours.state.log_history[0]
    assert {"entropy", "kl", "clip_ratio/region_mean", "entropy_coef"} <= set(logged)


def test_grpo_refuses_what_it_cannot_compute(tmp_path, model_path):
    with pytest.raises(ValueError, match="cispo"):
        grpo_pair(tmp_path, model_path, loss_type="cispo")
    with pytest.raises(NotImplementedError, match="use_bias_correction_kl"):
        grpo_pair(tmp_path, model_path, beta=0.04, num_iterations=2)


def test_patch_trl(monkeypatch):
    for name in ("DPOTrainer", "RewardTrainer", "GRPOTrainer"):
        monkeypatch.setattr(trl, name, getattr(trl, name))  # restored after the test
    patch_trl()
    from trl import DPOTrainer, GRPOTrainer, RewardTrainer

    assert (DPOTrainer, RewardTrainer, GRPOTrainer) == (FastprefDPOTrainer, FastprefRewardTrainer, FastprefGRPOTrainer)
