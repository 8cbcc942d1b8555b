"""The model shapes the sweep measures, their random-weight models, and the plans and ideals it times."""

from __future__ import annotations

import dataclasses

import torch
import transformers

from cqil_fx import CQILConfig, Plan
from cqil_fx.stack import decoder_layers, without_blocks


@dataclasses.dataclass(frozen=True)
class Shape:
    """A decoder-only architecture by its sizes: ``layers`` built and measured, ``full_layers`` in the real model."""

    name: str
    family: str  # a key of FAMILIES
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    layers: int
    full_layers: int
    tied: bool
    big: bool = False  # measured after the smaller shapes

    @property
    def note(self) -> str:
        if self.layers == self.full_layers:
            return ""
        return f"{self.name}: {self.layers} of the real model's {self.full_layers} layers"


FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
SHAPES = {
    "smollm2-135m": Shape("smollm2-135m", "llama", 576, 9, 3, 1536, 49152, 30, 30, tied=True),
    "qwen2.5-0.5b": Shape("qwen2.5-0.5b", "qwen2", 896, 14, 2, 4864, 151936, 24, 24, tied=True),
    "llama-3.2-1b": Shape("llama-3.2-1b", "llama", 2048, 32, 8, 8192, 128256, 16, 16, tied=True),
    "llama-3.1-8b": Shape("llama-3.1-8b", "llama", 4096, 32, 8, 14336, 128256, 16, 32, tied=False, big=True),
}
CPU_SHAPES = ("smollm2-135m", "qwen2.5-0.5b")
TINY_SHAPES = {  # --cpu-small: the same families, a few layers of hidden 64
    "tiny-llama": Shape("tiny-llama", "llama", 64, 4, 2, 128, 512, 10, 10, tied=True),
    "tiny-qwen2": Shape("tiny-qwen2", "qwen2", 64, 4, 2, 128, 512, 10, 20, tied=True, big=True),
}


def hf_config(shape: Shape) -> transformers.PretrainedConfig:
    config_class = getattr(transformers, FAMILIES[shape.family][0])
    return config_class(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=shape.tied)


def build_model(shape: Shape, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight model of ``shape``, made directly on ``device`` in ``dtype`` ("meta": no memory)."""
    model_class = getattr(transformers, FAMILIES[shape.family][1])
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in the measured dtype: an 8B model never exists in float32
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = model_class(hf_config(shape))
    finally:
        torch.set_default_dtype(saved)
    return model.eval().requires_grad_(False)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ plans


def sweep_plans(num_blocks: int, wide: int) -> dict[str, Plan]:
    """``{"P2": plan, "P<wide>": plan}``: uniform plans, D = 0, over the span of :func:`middle_span`."""
    plans = {}
    for parallel in (2, wide):
        start, end = middle_span(num_blocks, parallel)
        if end - start >= parallel:
            plans[f"P{parallel}"] = CQILConfig(start=start, end=end, parallel=parallel).plan_for(num_blocks)
    return plans


def middle_span(num_blocks: int, parallel: int) -> tuple[int, int]:
    """The issue's span ``[round(0.4 N), N - 2)``, its start moved up until ``parallel`` divides it."""
    end = max(num_blocks - 2, 0)
    start = min(round(0.4 * num_blocks), end)
    return start + (end - start) % parallel, end


def plan_label(plan: Plan) -> str:
    """``"S12-E28 P2 D0 (8 groups, saves 8/30)"``."""
    first, last = plan.groups[0], plan.groups[-1]
    return (f"S{first[0]}-E{last[-1] + 1} P{len(first)} D{plan.bypass} "
            f"({len(plan.groups)} groups, saves {plan.saved_blocks}/{plan.num_blocks})")


def without_saved_blocks(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    """The ideal for ``plan``: ``model`` without each group's members after the first, weights shared."""
    return without_blocks(model, [i for group in plan.groups for i in group[1:]])


def check_plans(model: torch.nn.Module, shape: Shape, plans: dict[str, Plan], wide: int) -> None:
    """Every plan is legal for the model, and its ideal has the blocks it should; raise if not."""
    num_blocks = len(decoder_layers(model))
    if num_blocks != shape.layers:
        raise RuntimeError(f"{shape.name}: built {num_blocks} decoder blocks, expected {shape.layers}")
    for parallel in (2, wide):
        key = f"P{parallel}"
        if key not in plans:
            raise RuntimeError(f"{shape.name}: no uniform P={parallel} plan fits {num_blocks} blocks; "
                               f"change --wide or --big-layers")
        plan = plans[key]
        CQILConfig(plan=plan).plan_for(num_blocks)  # the backend's own check
        if any(len(g) != parallel for g in plan.groups) or plan.bypass:
            raise RuntimeError(f"{shape.name}: {plan} is not a uniform P={parallel} D0 plan")
        ideal_blocks = len(decoder_layers(without_saved_blocks(model, plan)))
        if ideal_blocks != num_blocks - plan.saved_blocks:
            raise RuntimeError(f"{shape.name}: the ideal of {plan} has {ideal_blocks} blocks, "
                               f"expected {num_blocks - plan.saved_blocks}")
