"""What every fastpref trainer shares: ``TrainerConfig`` (a dataclass of TRL/HF-named fields) and
``BaseTrainer`` (the loop, checkpoints, logging, data parallelism).

A trainer is a config subclass and a trainer subclass that say how data becomes batches and a batch a
loss::

    @dataclass
    class MyConfig(TrainerConfig):
        learning_rate: float = 1e-5
        my_coef: float = 0.1

    class MyTrainer(BaseTrainer):
        config_class = MyConfig
        def prepare_dataset(self, data, *, split): ...   # raw data -> list of examples, once (tokenize here)
        def collate(self, examples): ...                 # list of examples -> dict of CPU tensors
        def compute_loss(self, batch): ...               # batch on self.device -> (0-d loss, {name: number})

Everything else comes from ``BaseTrainer``:

- ``train(resume_from_checkpoint=None)`` -> the logged history (list of dicts). Each optimizer step takes
  ``gradient_accumulation_steps`` micro-batches (``next_micro_batches``), weights their losses
  (``micro_batch_weights``: 1/k each; override for token-mean losses), clips the gradient norm, steps AdamW
  and the LR schedule (``transformers.get_scheduler``: warmup then linear/cosine/...).
- Model forwards run under ``self.autocast()`` (bf16 on CUDA unless ``bf16=False``); run the fused fastpref
  ops outside it, on inputs cast to ``self.compute_dtype`` (``Head.inputs(hidden, dtype=...)``).
- A step whose loss or gradient norm is not finite is skipped (no optimizer update, a warning; the step
  counter and the LR schedule still advance, so the data and schedule stay those of the step number);
  ``max_bad_steps`` of them in a row stop the run with a RuntimeError.
- Logs: a tqdm bar with live metrics, ``output_dir/metrics.jsonl``, TensorBoard in ``output_dir/runs``
  when ``torch.utils.tensorboard`` imports. Entries are means over ``logging_steps`` steps.
- Checkpoints ``output_dir/checkpoint-<step>/`` every ``save_steps`` and at the end: trainable weights
  (``model.safetensors``, names from ``named_parameters``), optimizer, scheduler, per-rank RNG states,
  ``trainer_state.json`` (step, history, config) and ``extra_state()``. Written to a hidden temp folder,
  fsynced and renamed into place, so a crash mid-write leaves the previous checkpoints as they were.
- ``torchrun``: with WORLD_SIZE > 1 the process group starts from the env vars (nccl on CUDA, gloo on
  CPU), rank 0's weights are broadcast, each rank reads its shard of every epoch's permutation (padded
  like ``DistributedSampler``), gradients are averaged once per optimizer step (what DDP does with
  ``no_sync`` during accumulation, without wrapping the model, so that trainers may call its decoder and
  head directly), metrics are averaged, and only rank 0 writes files.

Hooks for other trainers: ``next_micro_batches()`` (e.g. rollouts instead of a dataset) with
``micro_batches_per_epoch()`` (what an epoch is then), ``training_step(micro_batches)``, ``on_train_begin()``,
``trainable_named_parameters()`` (e.g. add a value head), ``optimizer_param_groups()`` (e.g. a group with
its own learning rate; ``weight_decay_groups`` builds the usual ones), ``extra_state()`` /
``load_extra_state(state)`` (subclass state saved with torch.save).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import typing
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fastpref.integrations.transformers import unwrap

__all__ = ["BaseTrainer", "TrainerConfig", "atomic_directory", "disable_dropout", "weight_decay_groups"]

_REPORTERS = ("jsonl", "tensorboard", "none")


@dataclass
class TrainerConfig:
    """Fields shared by all trainers; names and defaults are those of transformers' TrainingArguments
    except where noted.

    ``max_steps`` > 0 overrides ``num_train_epochs``. ``save_steps`` None: no checkpoints. ``eval_steps``
    None: no evaluation during training. ``bf16`` None: on when CUDA supports it (fp32 master weights,
    autocast). ``report_to``: any of "jsonl", "tensorboard" (skipped when it does not import), or "none".
    ``max_bad_steps`` (fastpref): non-finite steps in a row before the run stops.
    ``resume_from_checkpoint``: a checkpoint folder, or True for the latest one in ``output_dir``.
    ``gradient_checkpointing`` is off by default (TRL 1.x turns it on; off is faster for small models).
    """

    output_dir: str = "fastpref-output"
    max_steps: int = -1
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int | None = 500
    save_total_limit: int | None = None
    resume_from_checkpoint: str | bool | None = None
    bf16: bool | None = None
    use_cpu: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42
    max_bad_steps: int = 5
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    disable_tqdm: bool = False

    def __post_init__(self):
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        bad = [r for r in self.report_to if r not in _REPORTERS]
        if bad:
            raise ValueError(f"report_to: unknown {bad}; use any of {list(_REPORTERS)}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "max_bad_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("eval_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError("set max_steps > 0 or num_train_epochs > 0: there is nothing to train")
        if self.learning_rate < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("learning_rate, weight_decay and warmup_steps must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}")
        from transformers import SchedulerType

        kinds = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in kinds:
            raise ValueError(f"lr_scheduler_type {self.lr_scheduler_type!r} is unknown; use one of {kinds}")

    @classmethod
    def field_types(cls) -> dict[str, typing.Any]:
        """Field name -> resolved type (for the CLI's conversion of strings)."""
        return typing.get_type_hints(cls)


def disable_dropout(model) -> None:
    """Sets p = 0 in every dropout module (TRL's ``disable_dropout`` for DPO and reward training: the
    policy and reference log-probs must come from the same deterministic function)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def weight_decay_groups(params, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on matrices, none on 1-D parameters (biases, norms)."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(final: Path):
    """Yields a hidden temp folder beside ``final``; on success its files are fsynced and it is renamed to
    ``final`` (an older ``final`` is moved aside first, then deleted). On any exception the temp folder is
    removed and ``final`` is untouched. A crash leaves only a hidden ``.tmp-*`` folder, which nothing reads."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for p in tmp.rglob("*"):
            _fsync(p)
        _fsync(tmp)
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rng_state() -> dict:
    """This process's RNG states as plain Python values (bytes, lists): they travel through
    ``all_gather_object``, which mis-unpickles tensors in some torch versions."""
    kind, keys, *rest = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), *rest],
            "torch": bytes(torch.get_rng_state().numpy()), "cuda": [bytes(s.numpy()) for s in cuda]}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(b) for b in state["cuda"]])


def _byte_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


class BaseTrainer:
    """The training loop; see the module docstring for how a subclass plugs in.

    Args (TRL's names): ``model`` (transformers model, plain or PEFT), ``args`` (a ``config_class``
    instance; default: its defaults), ``train_dataset`` / ``eval_dataset`` (whatever ``prepare_dataset``
    takes), ``processing_class`` (the tokenizer), ``optimizers`` ((optimizer, scheduler), default AdamW
    with no decay on 1-D parameters and ``transformers.get_scheduler``).
    """

    config_class = TrainerConfig
    # For the CLI: the model arguments this trainer takes and the transformers Auto class of each.
    cli_models = {"model": "causal_lm"}

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 optimizers=(None, None)):
        args = self.config_class() if args is None else args
        if not isinstance(args, self.config_class):
            raise TypeError(f"args must be a {self.config_class.__name__}, got {type(args).__name__}")
        self.args, self.model, self.processing_class = args, model, processing_class
        self.rank, self.world_size, self.device = self._setup_distributed()
        self.is_main = self.rank == 0
        self.bf16 = args.bf16 if args.bf16 is not None else (
            self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.compute_dtype = torch.bfloat16 if self.bf16 else None
        self.output_dir = Path(args.output_dir)
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        model.to(self.device)
        if args.gradient_checkpointing:
            unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.broadcast_module(model)
        self.train_examples = None if train_dataset is None else self.prepare_dataset(train_dataset, split="train")
        self.eval_examples = None if eval_dataset is None else self.prepare_dataset(eval_dataset, split="eval")
        self.optimizer, self.lr_scheduler = optimizers
        self.step, self.history, self._stream, self._writers = 0, [], None, None

    # ---- subclass interface -------------------------------------------------------------------------
    def prepare_dataset(self, data, *, split: str) -> list:
        """Raw data -> list of examples (``split`` is "train" or "eval", for error messages)."""
        raise NotImplementedError

    def collate(self, examples: list) -> dict:
        raise NotImplementedError

    def compute_loss(self, batch: dict):
        """-> (0-d loss tensor, {metric name: float or 0-d tensor}); called with grad for training and under
        no_grad (model in eval mode) for ``evaluate``."""
        raise NotImplementedError

    def on_train_begin(self) -> None:
        """Runs in ``train`` after any checkpoint was loaded, before the first step."""

    def extra_state(self) -> dict | None:
        return None

    def load_extra_state(self, state: dict) -> None:
        pass

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def micro_batch_weights(self, micro_batches: list) -> list[float]:
        """The factor of each micro-batch's loss in the step's loss: 1/k (equal micro-batches)."""
        return [1.0 / len(micro_batches)] * len(micro_batches)

    def micro_batches_per_epoch(self) -> int:
        """This rank's micro-batches in one epoch: they turn ``num_train_epochs`` into ``total_steps()`` and
        the step into the logged ``epoch``. By default an epoch is a pass over this rank's shard of the
        training examples, which the default ``next_micro_batches`` also reads by; a trainer whose
        ``next_micro_batches`` reads otherwise overrides both."""
        shard = math.ceil(len(self.train_examples) / self.world_size)
        return math.ceil(shard / self.args.per_device_train_batch_size)

    def optimizer_param_groups(self) -> list[dict]:
        """The parameter groups of the default AdamW (``weight_decay_groups`` of the trainable parameters);
        a group may set its own ``lr`` and other AdamW options."""
        return weight_decay_groups((p for _, p in self.trainable_named_parameters()), self.args.weight_decay)

    # ---- setup --------------------------------------------------------------------------------------
    def _setup_distributed(self):
        use_cuda = torch.cuda.is_available() and not self.args.use_cpu
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return rank, world, torch.device("cuda", local)
        return rank, world, torch.device("cpu")

    def broadcast_module(self, module) -> None:
        """Rank 0's parameters and buffers to every rank (models built from a config differ per rank)."""
        if self.world_size > 1:
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    def autocast(self):
        """The mixed-precision context for model forwards (bf16 autocast, or nothing)."""
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(self.args.num_train_epochs * self._steps_per_epoch()))

    def _steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch() / self.args.gradient_accumulation_steps)

    def _build_optimizer(self, total: int) -> None:
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.optimizer_param_groups(), lr=self.args.learning_rate,
                                               betas=(self.args.adam_beta1, self.args.adam_beta2),
                                               eps=self.args.adam_epsilon)
        if self.lr_scheduler is None:
            from transformers import get_scheduler

            warmup = self.args.warmup_steps or math.ceil(self.args.warmup_ratio * total)
            self.lr_scheduler = get_scheduler(self.args.lr_scheduler_type, self.optimizer,
                                              num_warmup_steps=warmup, num_training_steps=total)

    # ---- data ---------------------------------------------------------------------------------------
    def _shard(self, n: int, *, epoch: int | None) -> list[int]:
        """This rank's indices: of a seeded per-epoch permutation padded to a multiple of the world size
        (DistributedSampler's order), or, with ``epoch`` None (evaluation), of range(n) unpadded."""
        if epoch is None:
            return list(range(self.rank, n, self.world_size))
        g = torch.Generator().manual_seed(self.args.seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
        order += order[: math.ceil(n / self.world_size) * self.world_size - n]
        return order[self.rank::self.world_size]

    def _train_stream(self, start: int):
        """Collated training micro-batches from the ``start``-th on (so a resumed run reads what the
        uninterrupted one would have)."""
        per_epoch = self.micro_batches_per_epoch()
        bs = self.args.per_device_train_batch_size
        epoch, skip = divmod(start, per_epoch)
        while True:
            idx = self._shard(len(self.train_examples), epoch=epoch)
            for b in range(skip, per_epoch):
                yield self.collate([self.train_examples[i] for i in idx[b * bs:(b + 1) * bs]])
            epoch, skip = epoch + 1, 0

    def next_micro_batches(self) -> list[dict]:
        """The micro-batches of the next optimizer step."""
        if self._stream is None:
            self._stream = self._train_stream(self.step * self.args.gradient_accumulation_steps)
        return [next(self._stream) for _ in range(self.args.gradient_accumulation_steps)]

    # ---- distributed helpers --------------------------------------------------------------------------
    def _all_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values

    def _average_gradients(self, params) -> None:
        """Averages gradients over ranks, one flat all-reduce per dtype (a rank whose parameter got no
        gradient contributes zeros)."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.world_size)
            dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    # ---- the loop -------------------------------------------------------------------------------------
    def training_step(self, micro_batches: list[dict]) -> dict | None:
        """Forward/backward over the micro-batches and one optimizer step; None when skipped (non-finite)."""
        self.model.train()
        params = [p for _, p in self.trainable_named_parameters()]
        sums, bad = {}, False
        for weight, batch in zip(self.micro_batch_weights(micro_batches), micro_batches):
            loss, metrics = self.compute_loss(self.to_device(batch))
            if not torch.isfinite(loss.detach()).item():
                bad = True
                break
            (loss * weight).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + weight * float(v)
        bad = bool(self._all_sum(torch.tensor([float(bad)], device=self.device)).item())
        grad_norm = None
        if not bad:
            if self.world_size > 1:
                self._average_gradients(params)
            clip = self.args.max_grad_norm if self.args.max_grad_norm is not None else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            bad = not math.isfinite(grad_norm)
        lr = self.lr_scheduler.get_last_lr()[0]
        if not bad:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if bad:
            return None
        keys = sorted(sums)
        means = self._all_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64)) / self.world_size
        return {**dict(zip(keys, means.tolist())), "grad_norm": grad_norm, "learning_rate": lr}

    def train(self, resume_from_checkpoint=None) -> list[dict]:
        """Trains for ``total_steps()`` optimizer steps; returns the history of logged entries (also those
        before a resume)."""
        if self.train_examples is None:
            raise ValueError("train() needs a train_dataset: pass one to the trainer")
        total = self.total_steps()
        self._build_optimizer(total)
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else self.args.resume_from_checkpoint
        if resume:
            self.load_checkpoint(self._find_checkpoint(resume))
        self.on_train_begin()
        self._stream = None
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step, disable=not self.is_main or self.args.disable_tqdm,
                   desc=type(self).__name__, dynamic_ncols=True)
        window, bad_in_row = [], 0
        try:
            while self.step < total:
                metrics = self.training_step(self.next_micro_batches())
                self.step += 1
                bar.update(1)
                if metrics is None:
                    bad_in_row += 1
                    if self.is_main:
                        warnings.warn(f"step {self.step}: non-finite loss or gradient norm, update skipped "
                                      f"({bad_in_row} in a row; the run stops at max_bad_steps="
                                      f"{self.args.max_bad_steps})", RuntimeWarning, stacklevel=2)
                    if bad_in_row >= self.args.max_bad_steps:
                        raise RuntimeError(
                            f"stopped at step {self.step}: {bad_in_row} steps in a row had a non-finite loss or "
                            "gradient norm. Lower learning_rate, set max_grad_norm, check the data (e.g. empty "
                            "completions), or raise max_bad_steps.")
                    continue
                bad_in_row = 0
                window.append(metrics)
                if self.step % self.args.logging_steps == 0 or self.step == total:
                    entry = {k: sum(m[k] for m in window) / len(window) for k in window[-1]}
                    self.log(entry)
                    bar.set_postfix({k: f"{entry[k]:.4g}" for k in ("loss", "grad_norm", "learning_rate")})
                    window = []
                if self.args.eval_steps and self.step % self.args.eval_steps == 0 and self.eval_examples:
                    self.log({f"eval_{k}": v for k, v in self.evaluate().items()})
                if self.args.save_steps and (self.step % self.args.save_steps == 0 or self.step == total):
                    self.save_checkpoint()
        finally:
            bar.close()
            self._close_writers()
        return self.history

    def eval_batches(self, eval_dataset=None) -> tuple[list[list], int]:
        """This rank's share of the eval examples (of ``eval_dataset``, else the trainer's) in batches of
        ``per_device_eval_batch_size``, and how many examples that is."""
        examples = self.prepare_dataset(eval_dataset, split="eval") if eval_dataset is not None else self.eval_examples
        if not examples:
            raise ValueError("evaluate() needs an eval_dataset: pass one to the trainer or to evaluate()")
        idx, bs = self._shard(len(examples), epoch=None), self.args.per_device_eval_batch_size
        return [[examples[i] for i in idx[s:s + bs]] for s in range(0, len(idx), bs)], len(idx)

    @torch.no_grad()
    def evaluate(self, eval_dataset=None) -> dict:
        """Mean metrics (``loss`` and the trainer's) over the eval set, weighted by batch size, averaged
        over all ranks' shards; logged nowhere (``train`` logs them with an ``eval_`` prefix)."""
        chunks, count = self.eval_batches(eval_dataset)
        was_training = self.model.training
        self.model.eval()
        sums = {}
        for chunk in chunks:
            loss, metrics = self.compute_loss(self.to_device(self.collate(chunk)))
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + len(chunk) * float(v)
        self.model.train(was_training)
        keys = sorted(sums)
        if self.world_size > 1:  # a rank with an empty shard has no keys: reduce the union everywhere
            every = [None] * self.world_size
            dist.all_gather_object(every, keys)
            keys = sorted(set().union(*every))
        totals = self._all_sum(torch.tensor([sums.get(k, 0.0) for k in keys] + [count], dtype=torch.float64))
        return dict(zip(keys, (totals[:-1] / totals[-1]).tolist()))

    # ---- logging ----------------------------------------------------------------------------------
    def log(self, metrics: dict) -> None:
        """Appends ``{"step": ..., **metrics}`` to the history, and on rank 0 to metrics.jsonl and
        TensorBoard."""
        entry = {"step": self.step, **metrics}
        if self.train_examples:
            entry["epoch"] = self.step * self.args.gradient_accumulation_steps / self.micro_batches_per_epoch()
        self.history.append(entry)
        if not self.is_main or "none" in self.args.report_to:
            return
        jsonl, tb = self._open_writers()
        if jsonl is not None:
            jsonl.write(json.dumps(entry) + "\n")
            jsonl.flush()
        if tb is not None:
            for k, v in metrics.items():
                tb.add_scalar(k.replace("eval_", "eval/", 1) if k.startswith("eval_") else f"train/{k}", v, self.step)

    def _open_writers(self):
        if self._writers is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            jsonl = open(self.output_dir / "metrics.jsonl", "a") if "jsonl" in self.args.report_to else None
            tb = None
            if "tensorboard" in self.args.report_to:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    tb = SummaryWriter(log_dir=str(self.output_dir / "runs"))
                except Exception:  # tensorboard missing or broken: the issue asks to skip it silently
                    tb = None
            self._writers = (jsonl, tb)
        return self._writers

    def _close_writers(self) -> None:
        for w in self._writers or ():
            if w is not None:
                w.close()
        self._writers = None

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Writes ``output_dir/checkpoint-<step>`` atomically (rank 0; every rank must call it)."""
        rng = [_rng_state()]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, _rng_state())
        final = self.output_dir / f"checkpoint-{self.step}"
        if self.is_main:
            from safetensors.torch import save_file

            with atomic_directory(final) as tmp:
                weights = {n: p.detach().contiguous().cpu() for n, p in self.trainable_named_parameters()}
                save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(rng, tmp / "rng_state.pt")
                extra = self.extra_state()
                if extra is not None:
                    torch.save(extra, tmp / "extra_state.pt")
                state = {"step": self.step, "history": self.history, "world_size": self.world_size,
                         "config": dataclasses.asdict(self.args)}
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
            self._rotate_checkpoints()
        if self.world_size > 1:
            dist.barrier()
        return final

    def _checkpoints(self) -> list[Path]:
        found = [p for p in self.output_dir.glob("checkpoint-*")
                 if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
        return sorted(found, key=_checkpoint_step)

    def _rotate_checkpoints(self) -> None:
        if self.args.save_total_limit:
            for old in self._checkpoints()[: -self.args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)

    def _find_checkpoint(self, resume) -> Path:
        if resume is True or resume == "latest":
            found = self._checkpoints()
            if not found:
                raise FileNotFoundError(f"resume_from_checkpoint=True but {self.output_dir} holds no complete "
                                        "checkpoint-<step> folder; pass a checkpoint path or start fresh")
            return found[-1]
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume_from_checkpoint={str(resume)!r} is not a checkpoint folder "
                                    "(no trainer_state.json)")
        return path

    def load_checkpoint(self, path) -> None:
        """Restores weights, optimizer, scheduler, RNG, step, history and extra state from ``path``."""
        from safetensors.torch import load_file

        path = Path(path)
        saved = load_file(path / "model.safetensors")
        params = dict(self.trainable_named_parameters())
        if set(saved) != set(params):
            missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
            raise ValueError(f"checkpoint {path} does not match this model's trainable parameters: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]} (same model and PEFT config?)")
        with torch.no_grad():
            for name, t in saved.items():
                params[name].copy_(t)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device))
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt"))
        rng = torch.load(path / "rng_state.pt")
        _set_rng_state(rng[self.rank] if len(rng) == self.world_size else rng[0])
        if (path / "extra_state.pt").is_file():
            self.load_extra_state(torch.load(path / "extra_state.pt", map_location="cpu", weights_only=False))
        state = json.loads((path / "trainer_state.json").read_text())
        self.step, self.history = state["step"], state["history"]

    def save_model(self, path=None) -> None:
        """The model in transformers format (``save_pretrained``: config + safetensors, or the adapter for
        PEFT) and the tokenizer, on rank 0; default path ``output_dir``."""
        path = Path(path or self.output_dir)
        if self.is_main:
            path.mkdir(parents=True, exist_ok=True)
            if hasattr(self.model, "save_pretrained"):
                self.model.save_pretrained(path)
            else:
                from safetensors.torch import save_model

                save_model(self.model, str(path / "model.safetensors"))
            if hasattr(self.processing_class, "save_pretrained"):
                self.processing_class.save_pretrained(path)
        if self.world_size > 1:
            dist.barrier()
