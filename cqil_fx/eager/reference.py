"""An eager oracle for the CQIL semantics, written with module hooks and no FX.

Tests and users check the backend against it::

    expected = cqil_reference(model, CQILConfig(start=4, end=8), input_ids, use_cache=False)

For a group G with input x it makes the model compute
``x + Σ_k (a_k(x) + m_k(u_k))`` with ``u_k = x + a_k + Σ_{j=max(0,k-D)}^{k-1} a_j``
(docs/semantics.md), or with the plan's correction
``x + Σ_k (s_k ⊙ Δ_k + (Δ_k D_k) U) + b`` (the low-rank term optional),
by hooking the HF layer and its branch modules:

* a pre-hook on each member layer feeds it the group input x;
* a hook on the module whose output is the attention branch records ``a_k``;
* a pre-hook on the first module of the MLP branch adds the bypassed ``a_j``
  to its input, so the MLP branch reads ``u_k`` while the residual does not;
* a hook on the last module of the MLP branch records ``m_k``;
* a hook on the last member replaces its output with the group sum.

Which modules those are is the only family knowledge here (:data:`BRANCHES`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..config import CQILConfig, GroupCorrection, Plan
from ..errors import CQILUnsupportedError
from ..stack import decoder_layers


@dataclasses.dataclass(frozen=True)
class Branches:
    """Names of a decoder layer's submodules that bound its two branches."""

    attention_out: str  # its output is the attention branch a(x) (post-norm included)
    mlp_in: str | None  # its input is the MLP branch's read of the mid-block residual
    mlp_out: str  # its output is the MLP branch m(u)

    @property
    def kind(self) -> str:
        return "parallel" if self.mlp_in is None else "sequential"


# First match wins; a layer matches when it has every named submodule.
BRANCHES: tuple[tuple[tuple[str, ...], Branches], ...] = (
    # Gemma 2/3: post-norms on both branches.
    (("pre_feedforward_layernorm", "post_feedforward_layernorm"),
     Branches("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")),
    # LLaMA, Mistral, Qwen2/3, Gemma 1, ...: pre-norm sequential.
    (("self_attn", "post_attention_layernorm", "mlp"), Branches("self_attn", "post_attention_layernorm", "mlp")),
    # GPT-2.
    (("attn", "ln_2", "mlp"), Branches("attn", "ln_2", "mlp")),
    # Phi: parallel residual, one shared input norm.
    (("self_attn", "mlp"), Branches("self_attn", None, "mlp")),
    # GPT-J: parallel residual.
    (("attn", "mlp"), Branches("attn", None, "mlp")),
)


def branches_of(layer: nn.Module) -> Branches:
    """The :class:`Branches` of one decoder layer."""
    for required, branches in BRANCHES:
        if all(hasattr(layer, name) for name in required):
            return branches
    raise CQILUnsupportedError(
        f"the eager reference does not know the branches of {type(layer).__name__}; "
        "add an entry to cqil_fx.eager.reference.BRANCHES"
    )


def resolve_plan(model: nn.Module, plan: Plan | CQILConfig) -> Plan:
    """``plan`` itself, or the plan a config gives for this model; checked against block kinds."""
    layers = decoder_layers(model)
    if isinstance(plan, CQILConfig):
        plan = plan.plan_for(len(layers))
    plan.check_block_kinds({i: branches_of(layer).kind for i, layer in enumerate(layers)})
    return plan


def cqil_reference(model: nn.Module, plan: Plan | CQILConfig, *args, **kwargs):
    """``model(*args, **kwargs)`` computed with the CQIL semantics of ``plan``."""
    with cqil_semantics(model, plan):
        return model(*args, **kwargs)


# observe(group index, group input x, member deltas, (args, kwargs) of the first member's call)
GroupObserver = Callable[[int, torch.Tensor, list, tuple], None]


@contextlib.contextmanager
def cqil_semantics(model: nn.Module, plan: Plan | CQILConfig, observe: GroupObserver | None = None) -> Iterator[Plan]:
    """Within the block, eager calls of ``model`` compute the CQIL semantics of ``plan``.

    ``observe``, if given, is called at every group's sum with the group index,
    its input, its members' deltas (before any correction) and the arguments the
    first member was called with (fitting corrections uses it).
    """
    plan = resolve_plan(model, plan)
    layers = decoder_layers(model)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for g, group in enumerate(plan.groups):
            observer = functools.partial(observe, g) if observe is not None else None
            handles += _hook_group([layers[i] for i in group], plan.bypass, plan.correction(g), observer)
        yield plan
    finally:
        for h in handles:
            h.remove()


def _hook_group(members: list[nn.Module], bypass: int, correction: GroupCorrection | None = None,
                observe: Callable | None = None) -> list:
    state: dict = {}
    last = len(members) - 1
    handles = []
    for k, layer in enumerate(members):
        names = branches_of(layer)
        handles += [
            layer.register_forward_pre_hook(_feed_group_input(state, k), with_kwargs=True),
            layer.get_submodule(names.attention_out).register_forward_hook(_record(state, "a", k)),
            layer.get_submodule(names.mlp_out).register_forward_hook(_record(state, "m", k)),
            layer.register_forward_hook(_emit_group_sum(state, k == last, correction, observe)),
        ]
        if names.mlp_in is not None and bypass:
            mlp_in = layer.get_submodule(names.mlp_in)
            handles.append(mlp_in.register_forward_pre_hook(_add_bypass(state, k, bypass)))
    return handles


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual stream a decoder layer was called with (HF passes it first or by name)."""
    return args[0] if args else kwargs["hidden_states"]


def _feed_group_input(state: dict, k: int):
    def hook(module, args, kwargs):
        if k == 0:
            state.clear()
            state["x"] = layer_input(args, kwargs)
            state["a"], state["m"] = {}, {}
            state["call"] = (args, kwargs)
            return None
        if args:
            return (state["x"], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state["x"]}

    return hook


def _record(state: dict, key: str, k: int):
    def hook(module, args, output):
        state[key][k] = output[0] if isinstance(output, tuple) else output

    return hook


def _add_bypass(state: dict, k: int, bypass: int):
    def hook(module, args):
        extra = [state["a"][j] for j in range(max(0, k - bypass), k)]
        return (sum(extra, args[0]), *args[1:])

    return hook


def _emit_group_sum(state: dict, is_last: bool, correction: GroupCorrection | None, observe: Callable | None):
    def hook(module, args, output):
        if not is_last:
            return None
        deltas = [state["a"][k] + state["m"][k] for k in sorted(state["m"])]
        if observe is not None:
            observe(state["x"], deltas, state["call"])
        if correction is not None:  # the op order of passes/concurrent_groups.py: Σ terms, + b, x +
            _, bias = correction.tensors(deltas[0])
            deltas = correction.member_terms(deltas)
        total = deltas[0]
        for d in deltas[1:]:
            total = total + d
        if correction is not None:
            total = total + bias
        out = state["x"] + total
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook
