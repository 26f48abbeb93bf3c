"""Data for the trainers: loading records, tokenizing them with the prompt masked, truncating, padding.

Records come from a list of dicts, a JSONL file (or a JSON file holding a list), or a ``datasets.Dataset``,
with TRL's column names: ``text`` or ``prompt`` + ``completion`` (or ``messages``) for SFT; ``prompt``,
``chosen``, ``rejected`` for preferences (the reward model also takes ``chosen``/``rejected`` alone, and an
optional ``margin``); ``prompt`` alone for PPO. Values are strings, or lists of ``{"role", "content"}``
messages (conversational).

Choices where TRL leaves room:

- Chat template: conversational records always use the tokenizer's template (an error without one).
  Plain-string records use it when ``use_chat_template`` is True, or None (the default) and the tokenizer
  has one: the prompt becomes the user turn and the completion the assistant turn. ``text`` is never
  templated. The completion's tokens are the template's text after the prompt (with its generation
  prompt), so the end-of-turn tokens are trained. A prompt alone (``Encoder.prompt``, to generate from)
  is tokenized as the prompt of a pair.
- Without a template the prompt is tokenized with the tokenizer's special tokens (BOS) and the completion
  without them, followed by EOS (TRL appends it too); ``text`` gets both.
- Truncation: a prompt longer than ``max_prompt_length`` keeps its last tokens; a completion is cut to fit
  ``max_length`` (keeps the start, TRL's ``keep_start``); a prompt that leaves no room for the completion
  is an error naming the example (the model would learn nothing from it).
- Labels equal ``input_ids`` with -100 on prompt tokens and padding, *unshifted* (transformers'
  convention); the trainers shift. Padding is on the right, with the tokenizer's pad token (EOS when it has
  none, as TRL does).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100


@dataclass
class DataConfig:
    """Tokenization fields shared by the SFT, reward and DPO configs.

    ``max_length``: tokens per sequence (prompt + completion), None for no limit.
    ``use_chat_template``: None = when the tokenizer has one (see the module docstring)."""

    max_length: int | None = 1024
    use_chat_template: bool | None = None


def load_records(data, *, split: str) -> list[dict]:
    """A list of dict records from a list/tuple of dicts, a .jsonl/.json path or a ``datasets.Dataset``.
    ``split`` ("train"/"eval") names the argument in errors."""
    name = f"{split}_dataset"
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no such file {str(path)!r} (pass a .jsonl/.json file, a list of "
                                    "dicts or a datasets.Dataset)")
        text = path.read_text()
        if path.suffix == ".json":
            records = json.loads(text)
        else:
            records = []
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{name}: {path}:{i} is not valid JSON ({e.msg})") from None
    else:
        try:
            records = list(data)
        except TypeError:
            raise TypeError(f"{name} must be a list of dicts, a .jsonl/.json path or a datasets.Dataset, "
                            f"got {type(data).__name__}") from None
    if not records:
        raise ValueError(f"{name} is empty: it needs at least one example")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise TypeError(f"{name}[{i}] must be a dict of columns, got {type(r).__name__}")
    return [dict(r) for r in records]


def check_columns(records: list[dict], options: list[tuple[str, ...]], *, split: str, kind: str) -> tuple[str, ...]:
    """The first column set of ``options`` that record 0 holds; every record must hold it (non-None)."""
    first = records[0]
    found = next((cols for cols in options if all(c in first for c in cols)), None)
    wanted = " or ".join(" + ".join(repr(c) for c in cols) for cols in options)
    if found is None:
        raise ValueError(f"{split}_dataset: {kind} data needs the columns {wanted}; example 0 has "
                         f"{sorted(first)}")
    for i, r in enumerate(records):
        missing = [c for c in found if r.get(c) is None]
        if missing:
            raise ValueError(f"{split}_dataset[{i}] lacks {missing} (every example needs {' + '.join(found)})")
    return found


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, or EOS when it has none (TRL's choice; the attention mask hides it)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token: set tokenizer.pad_token")
    return pad


def _is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def _as_messages(value, role: str) -> list[dict]:
    return value if _is_conversation(value) else [{"role": role, "content": value}]


class Encoder:
    """Tokenizes prompt/completion pairs, prompts alone and texts the way the module docstring says."""

    def __init__(self, tokenizer, *, use_chat_template=None, max_length=None, max_prompt_length=None):
        if tokenizer is None:
            raise ValueError("processing_class (the tokenizer) is required to tokenize the dataset")
        self.tok = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
        self.template = has_template if use_chat_template is None else use_chat_template
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and a completion token), got {max_length}")
        if max_prompt_length is not None and max_length is not None and max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
        self.pad_id = pad_token_id(tokenizer)

    def _ids(self, text, *, special):
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def _eos(self):
        return [] if self.tok.eos_token_id is None else [self.tok.eos_token_id]

    def _template(self, messages, **kwargs):
        if not getattr(self.tok, "chat_template", None):
            raise ValueError("conversational examples (lists of messages) need a tokenizer with a chat_template")
        return self.tok.apply_chat_template(messages, tokenize=False, **kwargs)

    def text(self, text) -> list[int]:
        """A whole text (or a conversation, through the template), truncated to max_length."""
        if _is_conversation(text):
            ids = self._ids(self._template(text), special=False)
        else:
            ids = self._ids(text, special=True) + self._eos()
        return ids[: self.max_length] if self.max_length else ids

    def _prompt(self, prompt, *, templated: bool) -> tuple[str, list[int]]:
        """(the prompt's text, its ids cut to the last max_prompt_length): the template's user turn with the
        generation prompt when ``templated``, else the text itself with the special tokens."""
        if templated:
            text = self._template(_as_messages(prompt, "user"), add_generation_prompt=True)
            ids = self._ids(text, special=False)
        else:
            text, ids = prompt, self._ids(prompt, special=True)
        return text, ids if self.max_prompt_length is None else ids[-self.max_prompt_length:]

    def prompt(self, prompt, *, where: str) -> list[int]:
        """A prompt alone (to generate from): its ids as ``pair`` gives them; ``where`` names the example in
        errors. Generation needs a token to start from, so an empty prompt is an error."""
        ids = self._prompt(prompt, templated=self.template or _is_conversation(prompt))[1]
        if not ids:
            raise ValueError(f"{where}: the prompt is empty after tokenization")
        return ids

    def pair(self, prompt, completion, *, where: str) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids), truncated; ``where`` names the example in errors."""
        templated = self.template or _is_conversation(prompt) or _is_conversation(completion)
        prompt_text, prompt_ids = self._prompt(prompt, templated=templated)
        if templated:
            full = self._template(_as_messages(prompt, "user") + _as_messages(completion, "assistant"))
            if not full.startswith(prompt_text):
                raise ValueError(f"{where}: the chat template's text for prompt + completion does not start with "
                                 "its text for the prompt, so the prompt cannot be masked")
            completion_ids = self._ids(full[len(prompt_text):], special=False)
        else:
            completion_ids = self._ids(completion, special=False) + self._eos()
        if not completion_ids:
            raise ValueError(f"{where}: the completion is empty after tokenization")
        if self.max_length is not None:
            if len(prompt_ids) >= self.max_length:
                raise ValueError(f"{where}: the prompt has {len(prompt_ids)} tokens, which leaves no room for the "
                                 f"completion within max_length={self.max_length}; raise max_length, set "
                                 "max_prompt_length (< max_length) to cut long prompts, or drop the example")
            completion_ids = completion_ids[: self.max_length - len(prompt_ids)]
        return prompt_ids, completion_ids


def pad_sequences(prompts: list[list[int]], completions: list[list[int]], *, pad_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding, unshifted)
    for the sequences prompt + completion."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    n = len(prompts)
    input_ids = torch.full((n, T), pad_id, dtype=torch.long)
    labels = torch.full((n, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        L = len(p) + len(c)
        input_ids[i, :L] = torch.tensor(p + c)
        labels[i, len(p):L] = torch.tensor(c)
        mask[i, :L] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def preference_examples(records, encoder: Encoder, *, split: str, prompt_required: bool) -> list[dict]:
    """Records with ``chosen``/``rejected`` (and ``prompt``, optional unless ``prompt_required``) ->
    examples {prompt_ids, chosen_ids, rejected_ids[, margin]}. Without a prompt the whole of each response
    is the completion (TRL's implicit prompt, for reward models)."""
    options = [("prompt", "chosen", "rejected")] + ([] if prompt_required else [("chosen", "rejected")])
    cols = check_columns(records, options, split=split, kind="preference")
    out = []
    for i, r in enumerate(records):
        where = f"{split}_dataset[{i}]"
        if "prompt" in cols:
            prompt, chosen = encoder.pair(r["prompt"], r["chosen"], where=where)
            prompt2, rejected = encoder.pair(r["prompt"], r["rejected"], where=where)
            if prompt2 != prompt:
                raise ValueError(f"{where}: the prompt tokenizes differently before chosen and rejected")
        else:
            prompt, chosen, rejected = [], encoder.text(r["chosen"]), encoder.text(r["rejected"])
        ex = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
        if r.get("margin") is not None:
            ex["margin"] = float(r["margin"])
        out.append(ex)
    return out


def collate_pairs(examples: list[dict], *, pad_id: int) -> dict:
    """[2B, T] tensors, the B chosen sequences first (fastpref's preference layout), plus ``margin`` [B]
    when the examples have one."""
    prompts = [e["prompt_ids"] for e in examples] * 2
    completions = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    batch = pad_sequences(prompts, completions, pad_id=pad_id)
    if all("margin" in e for e in examples):
        batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    return batch
