"""The bundled offline demo task: two-operand arithmetic ("12+7=" -> "19") with a character tokenizer and
a tiny Llama built from a config, so every trainer runs on a CPU in minutes with no download.

Choices: the tokenizer adds no special tokens by itself (the trainers append EOS to completions, as TRL
does); operands lie in [0, ``max_operand``] and differences are never negative; every problem is assigned
to train or held-out by a seeded shuffle of the whole problem set, so held-out prompts never reach training.
"""
from __future__ import annotations

import random
import re

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHARS = "0123456789+-="


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` over single characters (16 tokens), built offline with ``tokenizers``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # WordLevel would join characters with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   model_max_length=32)


def build_model(tokenizer, *, kind="causal", hidden_size=64, num_layers=2, seed=0):
    """A tiny Llama from a config (no weights downloaded): ``kind="causal"`` the policy,
    ``kind="reward"`` a one-label sequence classifier (what the reward trainer trains)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=tokenizer.model_max_length, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    cls = {"causal": LlamaForCausalLM, "reward": LlamaForSequenceClassification}[kind]
    return cls(config)


class ArithmeticTask:
    """Problems ``a+b=`` and ``a-b=`` (a >= b) with a, b in [0, max_operand], split train / held-out."""

    def __init__(self, *, max_operand=49, ops="+-", eval_fraction=0.1, seed=0):
        problems = [(a, op, b) for op in ops for a in range(max_operand + 1) for b in range(max_operand + 1)
                    if op == "+" or a >= b]
        random.Random(seed).shuffle(problems)
        n_eval = max(1, int(len(problems) * eval_fraction))
        self.eval_problems, self.train_problems = problems[:n_eval], problems[n_eval:]
        self.seed = seed

    @staticmethod
    def prompt(problem) -> str:
        a, op, b = problem
        return f"{a}{op}{b}="

    @staticmethod
    def answer(problem) -> str:
        a, op, b = problem
        return str(a + b if op == "+" else a - b)

    @staticmethod
    def wrong_answer(problem, rng) -> str:
        """A plausible mistake: off by one or ten (a missed carry), or two digits swapped."""
        ans = int(ArithmeticTask.answer(problem))
        candidates = {ans + d for d in (-10, -1, 1, 10) if ans + d >= 0}
        swapped = str(ans)[::-1].lstrip("0")
        if len(str(ans)) > 1 and swapped and int(swapped) != ans:
            candidates.add(int(swapped))
        return str(rng.choice(sorted(candidates)))

    def _problems(self, split, n, seed):
        pool = self.train_problems if split == "train" else self.eval_problems
        order = list(range(len(pool)))
        random.Random(f"{self.seed}/{split}/{seed}").shuffle(order)  # str seeds are stable across processes
        return [pool[order[i % len(pool)]] for i in range(n or len(pool))]

    def sft_dataset(self, n=None, *, split="train", seed=0):
        """``[{"prompt": "12+7=", "completion": "19"}]`` (TRL's prompt-completion columns)."""
        return [{"prompt": self.prompt(p), "completion": self.answer(p)} for p in self._problems(split, n, seed)]

    def preference_dataset(self, n=None, *, split="train", seed=0):
        """``[{"prompt", "chosen": correct answer, "rejected": a plausible wrong one}]``."""
        rng = random.Random(seed)
        return [{"prompt": self.prompt(p), "chosen": self.answer(p), "rejected": self.wrong_answer(p, rng)}
                for p in self._problems(split, n, seed)]

    def prompt_dataset(self, n=None, *, split="train", seed=0):
        """``[{"prompt": "12+7="}]`` for PPO / GRPO rollouts."""
        return [{"prompt": self.prompt(p)} for p in self._problems(split, n, seed)]


_PROMPT = re.compile(r"^\s*(\d+)([+-])(\d+)=\s*$")


def reward_fn(prompts, completions, *, partial_credit=0.5, **columns):
    """Verifiable reward: 1.0 for the exact answer; otherwise ``partial_credit`` times the fraction of
    digits right in their place (aligned on the units digit, over the longer of the two numbers), so a
    near miss scores above a wrong length or garbage. A completion is read up to its first non-digit
    (EOS included), so trailing text after the answer is ignored. Other dataset ``columns`` (TRL passes
    them as keyword lists) are not needed: the answer is computed from the prompt."""
    out = []
    for prompt, completion in zip(prompts, completions):
        a, op, b = _PROMPT.match(prompt).groups()
        want = ArithmeticTask.answer((int(a), op, int(b)))
        got = re.match(r"\d*", completion.strip()).group()
        if got == want:
            out.append(1.0)
        elif not got:
            out.append(0.0)
        else:
            width = max(len(got), len(want))
            hits = sum(x == y for x, y in zip(got.rjust(width), want.rjust(width)))
            out.append(partial_credit * hits / width)
    return out
