"""Recover the quality a CQIL plan costs by distilling the original model into the grouped blocks.

    from cqil_fx import recover, make_backend, CQILConfig

    config = CQILConfig(start=12, end=28, parallel=2)
    recovered = recover(model, config, texts, tokenizer=tokenizer, steps=400)   # a trained copy
    fast = torch.compile(recovered, backend=make_backend(config))

    result = distill_plan(model, config, train_batches, eval_batches=held_out)  # with the history
    save_recovered(result.model, result.plan, "recovered/")                     # safetensors + plan
    plan = load_recovered(fresh_model, "recovered/")                            # in place

The student is a copy of ``model`` run under :func:`cqil_fx.eager.reference.cqil_semantics`
(the exact numbers the backend computes for the plan, bypass included); the
teacher is ``model`` itself, left untouched. The loss is the KL divergence from
the teacher's next-token distribution to the student's, optionally mixed with
the language-model loss. What trains:

* ``method="full"``: every weight of the trained blocks (by default the plan's
  grouped blocks); everything else is frozen.
* ``method="lora"``: peft's low-rank adapters ``W + (alpha / rank) B A`` on
  every ``nn.Linear`` of the trained blocks, merged into the weights
  afterwards, so the returned model has the original architecture. On a
  quantized model (torchao weights, e.g. ``quantize_(model,
  Int8WeightOnlyConfig())``) it is QLoRA: the quantized weights stay frozen,
  the adapters train in float32 and stay beside them, unmerged (merging would
  round them to the weights' grid). ``method="full"`` cannot train quantized
  weights (:class:`~cqil_fx.errors.CQILUnsupportedError`).

The plan's semantics come from module hooks on each decoder layer and on the
modules that end its branches (:func:`cqil_semantics`); peft replaces only the
``nn.Linear`` layers inside those modules, so the hooks see the adapted
branches unchanged.

The teacher's distribution is kept per training batch as its ``top_k``
log-probabilities plus the mass of the rest (a (k+1)-way distribution whose KL
is exact when ``top_k`` covers the vocabulary): it is computed once, the first
time a batch is used, and reused on later epochs, in ``O(tokens * top_k)``
memory. ``top_k=None`` uses the full vocabulary and recomputes the teacher at
every step instead of storing vocab-sized logits.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import CQILConfig, Plan
from ..errors import CQILConfigError, CQILUnsupportedError, RecoveredWeightsError
from ..stack import decoder_layers
from ..tokens import token_windows
from .quality import perplexity
from .reference import cqil_semantics, resolve_plan

if TYPE_CHECKING:
    from peft import LoraConfig

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "PlanMismatchWarning",
    "RecoveredWeightsError",
    "Recovery",
    "RecoveryRecord",
    "distill_plan",
    "load_recovered",
    "recover",
    "run_recovery",
    "save_recovered",
    "save_adapters",
    "load_adapters",
    "convert_adapters",
    "base_fingerprint",
]

METHODS = ("full", "lora")
DEFAULT_LR = {"full": 2e-4, "lora": 1e-3}
WEIGHTS_FILE = "recovered.safetensors"
PLAN_FILE = "plan.json"
FORMAT = "cqil_fx.recovered/1"


class PlanMismatchWarning(UserWarning):
    """Recovered weights are loaded for a plan other than the one they were trained for."""


@dataclasses.dataclass(frozen=True)
class RecoveryRecord:
    """One point of the training history: mean loss since the last record, held-out perplexity."""

    step: int
    loss: float
    perplexity: float | None
    seconds: float  # wall time since training started
    cpu_seconds: float  # this process's CPU time since then (all threads)


@dataclasses.dataclass
class Recovery:
    """What :func:`distill_plan` returns: the recovered model and how it got there."""

    model: nn.Module
    plan: Plan
    method: str
    trained_blocks: tuple[int, ...]
    history: list[RecoveryRecord]
    steps: int  # optimizer steps taken
    best_step: int  # the step whose weights were kept
    stopped_early: bool
    seconds: float
    teacher_perplexity: float | None = None  # the original model's, on eval_batches
    # method="lora": the trained factors per Linear (qualified weight name -> (A, B)), their scale and
    # peft's LoraConfig, kept after merging so that save_adapters can write them instead of whole weights
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict, repr=False)
    adapter_scale: float = 1.0
    lora_config: LoraConfig | None = dataclasses.field(default=None, repr=False)

    @property
    def initial_perplexity(self) -> float | None:
        return self.history[0].perplexity if self.history else None

    @property
    def best_perplexity(self) -> float | None:
        values = [r.perplexity for r in self.history if r.perplexity is not None]
        return min(values) if values else None


def recover(model: nn.Module, plan: Plan | CQILConfig, data, **kwargs) -> nn.Module:
    """A copy of ``model`` whose blocks are distilled to recover the quality ``plan`` costs.

    Takes the arguments of :func:`distill_plan` and returns ``distill_plan(...).model``;
    ``model`` itself is not changed. Compile the result with the backend for the same plan.
    """
    return distill_plan(model, plan, data, **kwargs).model


def distill_plan(model: nn.Module, plan: Plan | CQILConfig, data, *, steps: int = 400, method: str = "full",
            lr: float | None = None, warmup: int | None = None, rank: int = 16, alpha: float | None = None,
            blocks: Sequence[int] | None = None, top_k: int | None = 64, lm_weight: float = 0.0,
            hidden_weight: float = 0.0, tokenizer=None, seq_len: int = 128,
            eval_batches: Sequence[torch.Tensor] | None = None, eval_every: int = 50, patience: int = 3, seed: int = 0, progress: bool = True) -> Recovery:
    """Distil ``model`` (teacher) into a copy of it run under the CQIL semantics of ``plan`` (student).

    Args:
        model: a Hugging Face causal LM; it stays unchanged and serves as the teacher.
        plan: a :class:`Plan` or :class:`CQILConfig` (resolved for this model).
        data: training text: a string or a list of strings (with ``tokenizer``, cut into
            ``seq_len``-token windows), or a list of ``(batch, tokens)`` tensors of token ids.
            Steps cycle through it in a seeded random order, one item per step.
        steps: optimizer steps (at most; early stopping may end sooner).
        method: ``"full"`` (train the blocks' weights) or ``"lora"`` (peft's low-rank adapters, merged;
            on quantized weights QLoRA: float32 adapters beside the frozen weights, unmerged).
        lr: AdamW peak learning rate; default 2e-4 for full, 1e-3 for lora. Linear warmup over
            ``warmup`` steps (default 5 % of ``steps``), then cosine decay to 10 % of the peak.
        rank, alpha: LoRA rank and scale (``alpha`` defaults to ``2 * rank``).
        blocks: the blocks that train; default the plan's grouped blocks.
        top_k: teacher tokens kept per position (see module docs); ``None``: full vocabulary.
        lm_weight: weight of the next-token cross-entropy added to the KL loss.
        hidden_weight: weight of a layer-wise term added to the KL loss: after each group, the
            student's residual stream against the teacher's, the squared error relative to the
            teacher's squared norm, per token (:class:`_HiddenMatch`).
        eval_batches: held-out token batches; their perplexity under the plan is measured
            before training, every ``eval_every`` steps and at the end. Training stops after
            ``patience`` measurements without improvement and the best weights are kept.
        seed: seeds the data order and the adapters' initialisation.
        progress: show a tqdm bar with the loss and the last held-out perplexity.
    """
    _check_args(steps, method, rank, top_k, lm_weight, hidden_weight, eval_every, patience)
    plan = resolve_plan(model, plan)
    trained = _trained_blocks(plan, blocks)
    batches = _training_batches(data, tokenizer, seq_len)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student, adapters, params = _student(model, trained, method, rank, alpha)
    lr = lr if lr is not None else DEFAULT_LR[method]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=_fused_ok(params))
    warmup = warmup if warmup is not None else max(1, steps // 20)
    schedule = _schedule(optimizer, warmup, steps)
    run = _Run(student, eval_batches, patience, params)
    targets = _TeacherTargets(model, _top_k(top_k, model), batches)
    teacher_ppl = perplexity(model, eval_batches) if eval_batches else None
    log.info("distilling %s: %s on blocks %s, %d steps, lr %s; teacher perplexity %s",
             plan, method, list(trained), steps, lr, teacher_ppl)
    hidden = _HiddenMatch(model, student, plan) if hidden_weight else contextlib.nullcontext()
    with cqil_semantics(student, plan), hidden, _progress_bar(steps, progress, teacher_ppl) as bar:
        run.evaluate(0, bar)
        for step, index in enumerate(_order(len(batches), steps, generator), start=1):
            loss = _loss(student, batches[index], targets.get(index, batches[index]), lm_weight)
            if hidden_weight:
                loss = loss + hidden_weight * hidden.loss(batches[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            run.add_loss(loss.item(), bar)
            if (step % eval_every == 0 or step == steps) and run.evaluate(step, bar):
                break
    run.restore_best()
    factors, scale, config = {}, 1.0, None
    if adapters is not None:
        factors, scale, config = adapters.factors(), adapters.scale, adapters.config
        adapters.merge()
    student.requires_grad_(False)
    return Recovery(student, plan, method, trained, run.history, run.step, run.best_step, run.stopped_early,
                    time.perf_counter() - run.started, teacher_ppl, factors, scale, config)


def _student(model: nn.Module, trained: Sequence[int], method: str, rank: int, alpha: float | None):
    """(frozen copy of model, its adapters or None, the parameters to train)."""
    student = copy.deepcopy(model).eval()
    student.requires_grad_(False)
    if method == "lora":
        _check_trainable_through(student)
        adapters = _Adapters(student, _lora_config(student, trained, rank, alpha))
        return student, adapters, adapters.parameters()
    quantized = _quantized_weights(student, _block_prefixes(student, trained))
    if quantized:
        raise CQILUnsupportedError(
            f"method='full' on quantized weights ({quantized[0]} is a {quantized[1]}): full-weights recovery "
            "cannot train them; use method='lora' (adapters on the frozen quantized weights, as QLoRA), or "
            "recover the unquantized model and quantize the result")
    return student, None, _unfreeze(student, trained)


# --------------------------------------------------------------------------- arguments and data


def _check_args(steps, method, rank, top_k, lm_weight, hidden_weight, eval_every, patience) -> None:
    if method not in METHODS:
        raise CQILConfigError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")
    for name, value in (("steps", steps), ("rank", rank), ("eval_every", eval_every), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CQILConfigError(f"{name}={value!r} must be a positive int")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise CQILConfigError(f"top_k={top_k!r} must be a positive int, or None for the full vocabulary")
    for name, value in (("lm_weight", lm_weight), ("hidden_weight", hidden_weight)):
        if value < 0:
            raise CQILConfigError(f"{name}={value} must be >= 0")


def _trained_blocks(plan: Plan, blocks: Sequence[int] | None) -> tuple[int, ...]:
    trained = tuple(sorted(set(blocks))) if blocks is not None else tuple(i for g in plan.groups for i in g)
    if not trained:
        raise CQILConfigError(f"nothing to train: {plan} groups no blocks; pass blocks=[...] or a plan with groups")
    bad = [i for i in trained if not 0 <= i < plan.num_blocks]
    if bad:
        raise CQILConfigError(f"blocks={bad} are out of range: the model has {plan.num_blocks} decoder blocks")
    return trained


def _training_batches(data, tokenizer, seq_len: int) -> list[torch.Tensor]:
    """``data`` as a list of (batch, tokens) id tensors."""
    if isinstance(data, str):
        data = [data]
    if isinstance(data, torch.Tensor):
        data = [data]
    data = list(data)
    if not data:
        raise CQILConfigError("no training data: pass texts or token id tensors")
    if all(isinstance(d, str) for d in data):
        return _windows(data, tokenizer, seq_len)
    bad = [i for i, d in enumerate(data) if not (isinstance(d, torch.Tensor) and not d.is_floating_point()
                                                 and d.dim() == 2 and d.shape[1] >= 2)]
    if bad:
        raise CQILConfigError(
            f"training item {bad[0]} is not a (batch, tokens) tensor of token ids with >= 2 tokens; "
            "pass strings (with tokenizer=) or integer tensors shaped (batch, tokens)")
    return data


def _windows(texts: list[str], tokenizer, seq_len: int) -> list[torch.Tensor]:
    if tokenizer is None:
        raise CQILConfigError("training texts need tokenizer= to turn them into token ids")
    if seq_len < 2:
        raise CQILConfigError(f"seq_len={seq_len} must be at least 2 tokens")
    ids = torch.tensor([t for text in texts
                        for t in tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]])
    if ids.numel() < seq_len:
        raise CQILConfigError(f"the texts hold {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return token_windows(ids, seq_len)


def _order(count: int, steps: int, generator: torch.Generator) -> Iterator[int]:
    """``steps`` batch indices: seeded random permutations of ``range(count)``, one after another."""
    taken = 0
    while taken < steps:
        for i in torch.randperm(count, generator=generator).tolist()[: steps - taken]:
            taken += 1
            yield i


def _fused_ok(params: Sequence[nn.Parameter]) -> bool:
    """The fused AdamW kernel (several times faster on CPU) takes float tensors on CPU or CUDA."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _schedule(optimizer: torch.optim.Optimizer, warmup: int, steps: int, floor: float = 0.1):
    """transformers' warm-up-cosine with a floor: ``(s + 1) / warmup`` of the peak on step ``s < warmup``,
    then a cosine that reaches ``floor`` of the peak on the last step."""
    from transformers import get_scheduler

    return get_scheduler("cosine_warmup_with_min_lr", optimizer, num_warmup_steps=warmup, num_training_steps=steps,
                         scheduler_specific_kwargs={"min_lr_rate": floor})


# --------------------------------------------------------------------------- what trains


def _block_prefixes(model: nn.Module, blocks: Sequence[int]) -> list[str]:
    """Qualified names (``model.layers.12.``) of the given decoder blocks."""
    layers = decoder_layers(model)
    names = {id(m): name for name, m in model.named_modules()}
    return [f"{names[id(layers[i])]}." for i in blocks]


def _unfreeze(model: nn.Module, blocks: Sequence[int]) -> list[nn.Parameter]:
    layers = decoder_layers(model)
    params = [p for i in blocks for p in layers[i].parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


ADAPTER = "default"  # peft's name for a model's only adapter (its files then sit in the directory itself)


def _lora_config(model: nn.Module, blocks: Sequence[int], rank: int, alpha: float | None) -> LoraConfig:
    """peft's LoRA on every ``nn.Linear`` of ``blocks``, named in full so that no other module matches."""
    prefixes = tuple(_block_prefixes(model, blocks))
    targets = sorted(name for name, m in model.named_modules()
                     if isinstance(m, nn.Linear) and name.startswith(prefixes))
    if not targets:
        raise CQILUnsupportedError(f"method='lora' adapts the nn.Linear layers of the trained blocks, and blocks "
                                   f"{list(blocks)} have none ({type(decoder_layers(model)[blocks[0]]).__name__}); "
                                   "use method='full'")
    return _peft_config(targets, rank, alpha if alpha is not None else 2 * rank)


def _peft_config(targets: Sequence[str], rank: int, alpha: float) -> LoraConfig:
    from peft import LoraConfig

    alpha = int(alpha) if float(alpha).is_integer() else alpha
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM")


def _check_trainable_through(model: nn.Module) -> None:
    """Refuse LoRA training through quantized weights whose kernels have no backward: the gradient of every
    adapter flows through the later blocks' weights. torchao's int8 weight-only Int8Tensor has one."""
    for name, p in model.named_parameters():
        if type(p) in (torch.Tensor, nn.Parameter):
            continue
        dynamic = getattr(p, "act_quant_kwargs", None) is not None  # activations quantized: no gradient
        if type(p).__name__ != "Int8Tensor" or dynamic:
            kind = f"{type(p).__name__}{' with dynamic activation quantization' if dynamic else ''}"
            raise CQILUnsupportedError(
                f"method='lora' on {kind} weights ({name}): no gradient flows through them, so no adapter can "
                "be trained; recover with int8 weight-only weights or the unquantized model, then quantize")


def _quantized_weights(model: nn.Module, prefixes: Sequence[str]) -> tuple[str, str] | None:
    """(name, type) of the first weight under ``prefixes`` that is a tensor subclass (a torchao quantized one)."""
    for name, p in model.named_parameters():
        if name.startswith(tuple(prefixes)) and type(p) not in (torch.Tensor, nn.Parameter):
            return name, type(p).__name__
    return None


class _Adapters:
    """peft's LoRA layers in ``model`` (``y = W x + (alpha / rank) B A x``, A Kaiming-uniform, B zero).

    On quantized weights peft wraps each Linear in its torchao LoRA layer; then the adapters
    are cast to float32 and :meth:`merge` leaves them beside the weights (QLoRA).
    """

    def __init__(self, model: nn.Module, config: LoraConfig) -> None:
        from peft import LoraModel
        from peft.functional import cast_adapter_dtype

        self.model, self.config = model, config
        targets = config.target_modules  # names (ours), or a regular expression (peft's other files)
        self.quantized = _quantized_weights(model, [""] if isinstance(targets, str) else
                                            [f"{name}." for name in targets]) is not None
        with warnings.catch_warnings():
            # peft's torchao layer cannot merge without the quantization recipe; it is never merged here
            warnings.filterwarnings("ignore", message=".*without `get_apply_tensor_subclass`")
            self.tuner = LoraModel(model, config, ADAPTER)
        if self.quantized:
            cast_adapter_dtype(model, ADAPTER, autocast_adapter_dtype=True)

    @property
    def scale(self) -> float:
        return self.config.lora_alpha / self.config.r

    def layers(self) -> dict[str, nn.Module]:
        from peft.tuners.lora import LoraLayer

        return {name: m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.layers().values() for p in (m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight)]

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Qualified weight name of each adapted Linear -> (A, B), detached copies."""
        return {f"{name}.weight": (m.lora_A[ADAPTER].weight.detach().clone(),
                                   m.lora_B[ADAPTER].weight.detach().clone())
                for name, m in self.layers().items()}

    def merge(self) -> None:
        """Fold the adapters into the weights and put the plain Linears back; on quantized weights, nothing."""
        if not self.quantized:
            self.tuner.merge_and_unload()


# --------------------------------------------------------------------------- teacher and loss


class _TeacherTargets:
    """The teacher's next-token distribution per training batch: its top-k, computed once, or all of it each time.

    The top-k store is allocated once for every position of every batch: many small
    cached tensors would pin freed logits-sized blocks of the allocator in place and
    make the process grow by about one logits tensor per step.
    """

    def __init__(self, teacher: nn.Module, top_k: int | None, batches: Sequence[torch.Tensor]) -> None:
        self.teacher, self.top_k = teacher, top_k
        sizes = [b.numel() for b in batches]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.done = [False] * len(batches)
        if top_k is not None:
            device = batches[0].device  # where the student's logits will be
            self.values = torch.empty(self.offsets[-1], top_k, device=device)
            self.indices = torch.empty(self.offsets[-1], top_k, dtype=torch.int32, device=device)

    def get(self, index: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs, token indices or None for the full vocabulary), both (batch, tokens, k)."""
        if self.top_k is None:
            return self._teacher_logp(ids), None
        rows = slice(self.offsets[index], self.offsets[index + 1])
        values, indices = self.values[rows], self.indices[rows]
        if not self.done[index]:
            top = self._teacher_logp(ids).flatten(0, 1).topk(self.top_k, dim=-1)
            values.copy_(top.values)
            indices.copy_(top.indices)
            self.done[index] = True
        return values.view(*ids.shape, -1), indices.view(*ids.shape, -1).long()

    def _teacher_logp(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(self.teacher(ids, use_cache=False).logits.float(), dim=-1)


def _top_k(top_k: int | None, model: nn.Module) -> int | None:
    """None when k covers the vocabulary: then the full distribution is as cheap and exact."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(head, "out_features", None)
    return None if top_k is None or (vocab is not None and top_k >= vocab) else top_k


def _loss(student: nn.Module, ids: torch.Tensor, target, lm_weight: float) -> torch.Tensor:
    logits = student(ids, use_cache=False).logits.float()
    loss = distillation_kl(logits, *target)
    if lm_weight:
        loss = loss + lm_weight * nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return loss


class _HiddenMatch:
    """The layer-wise term: after each group, the student's residual stream against the teacher's.

    Entered after :func:`cqil_semantics` (its hooks then see the group's sum); every student
    forward records the residual stream at each group's last block, and :meth:`loss` runs the
    teacher on the same ids as far as the last group, without gradients, and returns the mean over
    groups and tokens of ``|s - t|² / |t|²``, relative per token so that the few tokens whose
    residual stream is orders of magnitude larger than the rest (the first token's) do not decide it.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, plan: Plan) -> None:
        self.teacher = teacher
        self.points = sorted({group[-1] for group in plan.groups})
        self.student_layers = [decoder_layers(student)[i] for i in self.points]
        self.teacher_layers = [decoder_layers(teacher)[i] for i in self.points]
        self.student_states: dict[int, torch.Tensor] = {}

    def __enter__(self):
        self.handles = [layer.register_forward_hook(functools.partial(self._record, self.student_states, k))
                        for k, layer in enumerate(self.student_layers)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    @staticmethod
    def _record(into: dict, k: int, module, args, output):
        into[k] = output[0] if isinstance(output, tuple) else output

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        teacher: dict[int, torch.Tensor] = {}
        last = len(self.points) - 1

        def record(k, module, args, output):
            self._record(teacher, k, module, args, output)
            if k == last:
                raise _TeacherDone

        handles = [layer.register_forward_hook(functools.partial(record, k))
                   for k, layer in enumerate(self.teacher_layers)]
        try:
            with torch.no_grad():
                self.teacher(ids, use_cache=False)
        except _TeacherDone:
            pass
        finally:
            for h in handles:
                h.remove()
        terms = [((self.student_states[k].float() - t.float()).square().sum(-1)
                  / t.float().square().sum(-1).clamp_min(1e-12)).mean() for k, t in teacher.items()]
        return sum(terms) / len(terms)


class _TeacherDone(Exception):
    """Raised at the teacher's last group: nothing after it is compared."""


def distillation_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor,
                    teacher_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of KL(teacher || student).

    With ``teacher_indices`` the teacher holds only its top-k log-probs: the KL is taken
    between the (k+1)-way distributions "each of the k tokens, or any other token",
    which equals the full KL when k covers the vocabulary.
    """
    logp = torch.log_softmax(student_logits, dim=-1)
    if teacher_indices is None:
        return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()
    student_top = logp.gather(-1, teacher_indices)
    tiny = torch.finfo(logp.dtype).tiny
    teacher_rest = torch.log((1 - teacher_logp.exp().sum(-1)).clamp_min(tiny))
    student_rest = torch.log((1 - student_top.exp().sum(-1)).clamp_min(tiny))
    kl = (teacher_logp.exp() * (teacher_logp - student_top)).sum(-1)
    return (kl + teacher_rest.exp() * (teacher_rest - student_rest)).mean()


# --------------------------------------------------------------------------- evaluation, early stop


class _Run:
    """The history, the held-out evaluation and the best weights seen so far."""

    def __init__(self, model, eval_batches, patience, params) -> None:
        self.model, self.eval_batches, self.patience = model, eval_batches, patience
        self.params = list(params)
        self.history: list[RecoveryRecord] = []
        self.losses: list[float] = []
        self.step = self.best_step = 0
        self.best: tuple[float, list[torch.Tensor]] | None = None
        self.bad_evaluations = 0
        self.stopped_early = False
        self.last_ppl: float | None = None
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def add_loss(self, loss: float, bar) -> None:
        self.step += 1
        self.losses.append(loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", ppl="-" if self.last_ppl is None else f"{self.last_ppl:.2f}")

    def evaluate(self, step: int, bar) -> bool:
        """Record a history point; True when training should stop early."""
        loss = sum(self.losses) / len(self.losses) if self.losses else float("nan")
        self.losses = []
        ppl = None
        if self.eval_batches:
            # The model is already under cqil_semantics; perplexity must not hook it twice.
            ppl = perplexity(self.model, self.eval_batches)
            self.last_ppl = ppl
        self.history.append(RecoveryRecord(step, loss, ppl, time.perf_counter() - self.started,
                                           time.process_time() - self.cpu_started))
        log.info("step %d: loss %.4f, held-out perplexity %s", step, loss, ppl)
        if bar is not None and ppl is not None:
            bar.set_postfix(loss=f"{loss:.4f}", ppl=f"{ppl:.2f}")
        if ppl is None:
            return False
        if self.best is None or ppl < self.best[0]:
            self.best = (ppl, [p.detach().clone() for p in self.params])
            self.best_step, self.bad_evaluations = step, 0
            return False
        self.bad_evaluations += 1
        self.stopped_early = self.bad_evaluations >= self.patience
        return self.stopped_early

    def restore_best(self) -> None:
        if self.best is None:
            self.best_step = self.step
            return
        with torch.no_grad():
            for p, saved in zip(self.params, self.best[1]):
                p.copy_(saved)


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress_bar(steps: int, enabled: bool, teacher_ppl: float | None):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    desc = "recover" if teacher_ppl is None else f"recover (original ppl {teacher_ppl:.2f})"
    return tqdm(total=steps, desc=desc, unit="step")


# --------------------------------------------------------------------------- save and load


def save_recovered(model: nn.Module, plan: Plan, directory: str | Path, blocks: Sequence[int] | None = None) -> Path:
    """Write the trained blocks' weights (``recovered.safetensors``) and ``plan.json`` into ``directory``.

    ``blocks`` defaults to the plan's grouped blocks (what :func:`distill_plan` trains by default).
    The plan is stored in the safetensors metadata as well as beside it.
    """
    from safetensors.torch import save_file

    blocks = _trained_blocks(plan, blocks)
    prefixes = tuple(_block_prefixes(model, blocks))
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items() if name.startswith(prefixes)}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "plan": plan.to_json(), "blocks": json.dumps(list(blocks))}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata=metadata)
    plan.save(out / PLAN_FILE)
    log.info("saved %d tensors of blocks %s to %s", len(tensors), list(blocks), out)
    return out


def load_recovered(model: nn.Module, directory: str | Path, plan: Plan | CQILConfig | None = None) -> Plan:
    """Load weights written by :func:`save_recovered`, or adapters written by :func:`save_adapters`
    (:func:`load_adapters`), into ``model`` (in place); return their plan.

    With ``plan`` given and different from the stored one, warns (:class:`PlanMismatchWarning`):
    the weights were tuned for the stored plan and lose quality under another.
    """
    from safetensors import safe_open

    if any((Path(directory) / name).is_file() for name in (ADAPTER_WEIGHTS_FILE, LEGACY_ADAPTERS_FILE)):
        return load_adapters(model, directory, plan)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise RecoveredWeightsError(f"{path} does not exist; point to a directory written by save_recovered")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if metadata.get("format") != FORMAT:
        raise RecoveredWeightsError(f"{path} is not a cqil_fx recovered-weights file "
                                    f"(format {metadata.get('format')!r}, expected {FORMAT!r})")
    stored = Plan.from_json(metadata["plan"])
    _check_fits(model, tensors, path)
    if plan is not None:
        wanted = resolve_plan(model, plan)
        if wanted != stored:
            warnings.warn(f"{path} was recovered for {stored}, but is loaded for {wanted}; "
                          "its quality holds only for the stored plan: recover again for this one",
                          PlanMismatchWarning, stacklevel=2)
    else:
        resolve_plan(model, stored)
    model.load_state_dict(tensors, strict=False)
    return stored


# Adapters are written in peft's files (PeftModel.save_pretrained's names and keys), so that peft loads them as
# they are; the plan and the base model's fingerprint ride in the weights' metadata, and plan.json lies beside.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTERS_FORMAT = "cqil_fx.adapters/2"
PEFT_PREFIX = "base_model.model."  # PeftModel's path to the model it wraps: its saved keys start with it
LEGACY_ADAPTERS_FILE = "adapters.safetensors"  # cqil_fx's own format before peft, still read
LEGACY_ADAPTERS_FORMAT = "cqil_fx.adapters/1"


@dataclasses.dataclass
class _StoredAdapters:
    """Adapters as read from (or about to be written to) a directory."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]  # peft's keys on the bare model: "<module>.lora_A.weight", ".lora_B.weight"
    plan: Plan
    base: str | None  # the base model's weights' fingerprint
    path: Path  # the weights' file
    fingerprint: Callable[[nn.Module], str | None] | None = None  # how ``base`` was taken; None: base_fingerprint


def save_adapters(recovery: Recovery, base: nn.Module, directory: str | Path) -> Path:
    """Write a LoRA recovery's adapters (not whole weights) as peft does, with the plan and ``base``'s fingerprint.

    ``directory`` gets peft's ``adapter_config.json`` and ``adapter_model.safetensors`` (the plan and the
    fingerprint in its metadata) and ``plan.json``: a few megabytes for a 135M model, small enough to keep
    in a repository. :func:`load_adapters` checks the plan and the base model before it merges them;
    ``peft.PeftModel.from_pretrained(base, directory)`` loads them as they are.
    """
    if not recovery.adapters:
        raise RecoveredWeightsError("this recovery has no adapters: train with method='lora' to save adapters")
    tensors = {}
    for name, (a, b) in recovery.adapters.items():
        module = name.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a, b
    config = recovery.lora_config
    if config is None:
        rank = next(iter(recovery.adapters.values()))[0].shape[0]
        config = _peft_config(sorted(n.removesuffix(".weight") for n in recovery.adapters), rank,
                              recovery.adapter_scale * rank)
    stored = _StoredAdapters(config, tensors, recovery.plan, base_fingerprint(base),
                             Path(directory) / ADAPTER_WEIGHTS_FILE)
    return _write_adapters(stored, getattr(base, "name_or_path", None))


def load_adapters(model: nn.Module, directory: str | Path, plan: Plan | CQILConfig | None = None) -> Plan:
    """Merge adapters written by :func:`save_adapters` into ``model`` (in place, with peft); return their plan.

    Refused (:class:`RecoveredWeightsError`) when ``model`` is not the base model
    they were trained on (its weights' fingerprint differs), or when ``plan`` is
    given and is not theirs: adapters recover the quality of one plan of one model.
    On a quantized model they stay beside its weights, unmerged (peft's torchao
    LoRA layers). Also reads ``adapters.safetensors``, the format of cqil_fx
    before peft (:func:`convert_adapters` rewrites it in peft's).
    """
    stored = _read_adapters(directory)
    if stored.base is not None and (stored.fingerprint or base_fingerprint)(model) != stored.base:
        raise RecoveredWeightsError(f"{stored.path} was trained on another base model (its weights' fingerprint "
                                    "differs); load it into the model it was recovered from")
    if plan is not None and resolve_plan(model, plan) != stored.plan:
        raise RecoveredWeightsError(f"{stored.path} recovers {stored.plan}, not {resolve_plan(model, plan)}; use its "
                                    "own plan (the returned one) or recover again for yours")
    resolve_plan(model, stored.plan)
    _attach(model, stored)
    return stored.plan


def convert_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Rewrite the ``adapters.safetensors`` of cqil_fx before peft in ``directory`` as peft's files, in place.

    ``model`` is their base model: it is checked against the fingerprint they hold, whose
    digest has changed since, and its fingerprint of today is written instead. The factors
    and the plan are copied as they are: the merged weights are the same numbers.
    """
    legacy = _read_legacy_adapters(Path(directory) / LEGACY_ADAPTERS_FILE)
    if legacy.fingerprint(model) != legacy.base:
        raise RecoveredWeightsError(f"{legacy.path} was trained on another base model (its weights' fingerprint "
                                    "differs); convert it with the model it was recovered from")
    converted = _StoredAdapters(legacy.config, legacy.tensors, legacy.plan, base_fingerprint(model),
                                Path(directory) / ADAPTER_WEIGHTS_FILE)
    out = _write_adapters(converted, getattr(model, "name_or_path", None))
    legacy.path.unlink()
    return out


def _write_adapters(stored: _StoredAdapters, name_or_path: str | None) -> Path:
    from safetensors.torch import save_file

    out = stored.path.parent
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(stored.config)
    config.inference_mode = True  # what PeftModel.save_pretrained writes
    config.base_model_name_or_path = config.base_model_name_or_path or name_or_path or None
    document = {key: sorted(v) if isinstance(v, set) else v for key, v in config.to_dict().items()}
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
    metadata = {"format": "pt", "cqil_fx.format": ADAPTERS_FORMAT, "cqil_fx.plan": stored.plan.to_json()}
    if stored.base is not None:
        metadata["cqil_fx.base"] = stored.base
    tensors = {PEFT_PREFIX + key: t.detach().contiguous() for key, t in stored.tensors.items()}
    save_file(tensors, str(stored.path), metadata=metadata)
    stored.plan.save(out / PLAN_FILE)
    return out


def _read_adapters(directory: str | Path) -> _StoredAdapters:
    d = Path(directory)
    if (d / ADAPTER_WEIGHTS_FILE).is_file():
        return _read_peft_adapters(d)
    if (d / LEGACY_ADAPTERS_FILE).is_file():
        return _read_legacy_adapters(d / LEGACY_ADAPTERS_FILE)
    raise RecoveredWeightsError(f"{d / ADAPTER_WEIGHTS_FILE} does not exist; point to a directory written by "
                                "save_adapters (cqil-fx recover --method lora)")


def _read_peft_adapters(directory: Path) -> _StoredAdapters:
    from peft import LoraConfig

    path = directory / ADAPTER_WEIGHTS_FILE
    metadata, tensors = _read_safetensors(path)
    if metadata.get("cqil_fx.format") != ADAPTERS_FORMAT:
        raise RecoveredWeightsError(f"{path} holds no cqil_fx plan (cqil_fx.format {metadata.get('cqil_fx.format')!r}, "
                                    f"expected {ADAPTERS_FORMAT!r}): load peft's own adapters with "
                                    "peft.PeftModel.from_pretrained")
    if not (directory / ADAPTER_CONFIG_FILE).is_file():
        raise RecoveredWeightsError(f"{directory / ADAPTER_CONFIG_FILE} does not exist; save_adapters writes it "
                                    f"beside {path.name}")
    config = LoraConfig.from_pretrained(str(directory))
    tensors = {key.removeprefix(PEFT_PREFIX): t for key, t in tensors.items()}
    return _StoredAdapters(config, tensors, Plan.from_json(metadata["cqil_fx.plan"]), metadata.get("cqil_fx.base"),
                           path)


def _read_legacy_adapters(path: Path) -> _StoredAdapters:
    """``<module>.weight.lora_A`` / ``.lora_B`` factors with the plan, the scale and the fingerprint in the metadata."""
    if not path.is_file():
        raise RecoveredWeightsError(f"{path} does not exist; point to a directory of cqil_fx adapters written "
                                    "before peft")
    metadata, tensors = _read_safetensors(path)
    if metadata.get("format") != LEGACY_ADAPTERS_FORMAT:
        raise RecoveredWeightsError(f"{path} is not a cqil_fx adapters file (format {metadata.get('format')!r})")
    renamed = {}
    for key, t in tensors.items():
        weight, factor = key.rsplit(".", 1)
        renamed[f"{weight.removesuffix('.weight')}.{factor}.weight"] = t
    modules = sorted({key.rsplit(".", 2)[0] for key in renamed})
    rank = renamed[f"{modules[0]}.lora_A.weight"].shape[0]
    config = _peft_config(modules, rank, float(metadata["scale"]) * rank)
    return _StoredAdapters(config, renamed, Plan.from_json(metadata["plan"]), metadata.get("base"), path,
                           _legacy_fingerprint)


def _legacy_fingerprint(model: nn.Module) -> str:
    """The base-model fingerprint ``adapters.safetensors`` holds: the digest of the decoder weights before
    quantized weights (shape, dtype and 4096 evenly strided values of each, as float32)."""
    import hashlib

    h = hashlib.sha256()
    for layer in decoder_layers(model):
        digests = []
        for w in layer.parameters():
            flat = w.detach().reshape(-1)
            digest = hashlib.sha256(f"{tuple(w.shape)}|{w.dtype}".encode())
            digest.update(flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32).numpy().tobytes())
            digests.append(digest.hexdigest())
        h.update(("|".join(sorted(digests)) + ";").encode())
    return h.hexdigest()


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}


def _attach(model: nn.Module, stored: _StoredAdapters) -> None:
    """Inject the stored adapters with peft, load their factors and merge them (on quantized weights, keep them)."""
    from peft.functional import set_peft_model_state_dict

    targets = stored.config.target_modules
    own = {name for name, _ in model.named_modules()}
    missing = [] if isinstance(targets, str) else [name for name in sorted(targets) if name not in own]
    if missing:
        raise RecoveredWeightsError(f"{stored.path} adapts {missing[0]!r}, which this model does not have; "
                                    "load it into the model it was recovered from")
    adapters = _Adapters(model, stored.config)
    result = set_peft_model_state_dict(model, stored.tensors, adapter_name=ADAPTER)
    unloaded = [key for key in result.missing_keys if ".lora_" in key] + list(result.unexpected_keys)
    if unloaded:
        raise RecoveredWeightsError(f"{stored.path} and its adapter_config.json disagree on {unloaded[0]!r}")
    adapters.merge()


def base_fingerprint(model: nn.Module) -> str:
    """The fingerprint of the decoder stack's weights (the plan cache's), for adapters' base-model check."""
    from ..fingerprint import weights_fingerprint

    return weights_fingerprint([list(layer.parameters()) for layer in decoder_layers(model)])


def _check_fits(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    unknown = [n for n in tensors if n not in own]
    if unknown:
        raise RecoveredWeightsError(f"{path} holds {unknown[0]!r}, which this model does not have; "
                                    "load it into the model it was recovered from")
    wrong = [n for n, t in tensors.items() if t.shape != own[n].shape]
    if wrong:
        raise RecoveredWeightsError(f"{path}: {wrong[0]!r} has shape {tuple(tensors[wrong[0]].shape)}, the model's "
                                    f"is {tuple(own[wrong[0]].shape)}; load it into the model it was recovered from")


# --------------------------------------------------------------------------- the recipe behind `cqil-fx recover`


def run_recovery(model: nn.Module, plan: Plan | CQILConfig, train, validation, evaluation, out_dir: str | Path,
                 command: str = "", **kwargs) -> dict:
    """Measure, distil, measure again; save the result and ``recovery.json`` (the summary returned).

    ``method="lora"`` saves the adapters' factors (:func:`save_adapters`), anything
    else the trained blocks' weights (:func:`save_recovered`).
    """
    import platform

    plan = resolve_plan(model, plan)
    before = {"original": perplexity(model, evaluation), "cqil": perplexity(model, evaluation, plan=plan)}
    result = distill_plan(model, plan, train, eval_batches=validation, **kwargs)
    after = perplexity(result.model, evaluation, plan=plan)
    if result.adapters:
        save_adapters(result, model, out_dir)
    else:
        save_recovered(result.model, plan, out_dir, blocks=result.trained_blocks)
    summary = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        # the groups; a correction's factors (megabytes at a low rank) stay in plan.json beside this file
        "plan": json.loads(plan.without_corrections().to_json()),
        "plan_repr": repr(plan),
        "settings": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, type(None)))},
        "train_windows": len(train),
        "train_tokens_per_step": int(train[0].numel()),
        "method": result.method,
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "train_seconds": result.seconds,
        "train_cpu_seconds": result.history[-1].cpu_seconds,
        "validation_perplexity": {"original": result.teacher_perplexity, "cqil": result.initial_perplexity,
                                  "recovered": result.best_perplexity},
        "perplexity": {**before, "recovered": after},
        "history": [dataclasses.asdict(r) for r in result.history],
    }
    (Path(out_dir) / "recovery.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
