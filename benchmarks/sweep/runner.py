"""The sweep: cells run in priority order within the budget, columns timed interleaved, the JSON and PNG
rewritten after every cell."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch._dynamo.utils import counters

from cqil_fx import Plan
from cqil_fx.tools.generation import compiled_twin
from cqil_fx.tools.timing import time_interleaved

from .columns import StepClock, Twin, compile_settings, decode_call, prefill_call, with_threads
from .estimates import FIRST_COMPILE_S, device_kind, estimate_cell_s
from .report import cell_rows, plot, print_cell, summarise
from .shapes import Shape, build_model, parameter_count, plan_label, sweep_plans, without_saved_blocks
from .work import Cell, Part, column_parts


def measure(calls: dict[str, Callable[[], dict]], reps: int, warmup: int, sync: Callable[[], None],
            errors: list[dict]) -> dict[str, list[dict]]:
    """Interleaved (``cqil_fx.tools.timing.time_interleaved``): one call of each column per repetition,
    the order rotated every repetition.

    Returns per column the timed calls: ``call_ms`` (wall, synchronised) and what the call returned.
    A column that raises is dropped (and its error recorded); the others go on.
    """
    def failed(name: str, error: Exception) -> None:  # recorded; the other columns are still worth measuring
        errors.append(dict(column=name, stage="measure", error=f"{type(error).__name__}: {error}"))
        print(f"    {name} failed: {type(error).__name__}: {error}", flush=True)

    with torch.no_grad():
        timings = time_interleaved(calls, reps, warmup, sync=sync, on_error=failed)
    return {name: [{"call_ms": ms, **extra} for ms, extra in zip(timings.ms[name], timings.results[name])]
            for name in calls if timings.ms[name]}


class Sweep:
    """Runs cells in order within the budget, keeping models and compiled twins for later cells."""

    def __init__(self, part: Part, shapes: dict[str, Shape], wide: int, out: Path, command: str,
                 start: float | None = None, wait_for: Path | None = None, compile_only: bool = False,
                 ready: Path | None = None):
        self.part, self.shapes, self.wide, self.out, self.wait_for = part, shapes, wide, out, wait_for
        self.compile_only, self.ready = compile_only, ready
        self._waited = 0.0  # seconds spent waiting for ``wait_for`` in the current cell
        self.models: dict[str, torch.nn.Module] = {}
        self.ideals: dict[tuple[str, str], torch.nn.Module] = {}
        self.twins: dict[tuple[str, str], Twin] = {}
        self.compiled: dict[tuple, int] = {}  # (model, column, workload, batch) -> cell that compiled it
        self.plans = {name: sweep_plans(shape.layers, wide) for name, shape in shapes.items()}
        self.params = {name: meta_parameter_count(shape, part) for name, shape in shapes.items()}
        self.factor, self._estimated, self._spent = 1.0, 0.0, 0.0
        self.start = time.perf_counter() if start is None else start
        self.result: dict[str, Any] = dict(meta=run_meta(part, shapes, wide, command), models={}, rows=[],
                                           summary=[], cells=[], skipped=[], errors=[])

    # -- the loop

    def run(self, cells: list[Cell]) -> dict:
        for index, cell in enumerate(cells, 1):
            self.run_if_it_fits(index, len(cells), cell)
        self.result["meta"]["elapsed_s"] = self.elapsed()
        self.write()
        return self.result

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run_if_it_fits(self, index: int, total: int, cell: Cell) -> None:
        name = cell.model
        guess = estimate_cell_s(cell, self.shapes[name], self.params[name], self.plans[name], self.part,
                                set(self.compiled), set(self.models))
        if not self.models and not self.compiled:
            guess += FIRST_COMPILE_S[device_kind(self.part)]
        need = guess * self.factor
        label = f"[{index}/{total}] {cell.model} {cell.workload} batch {cell.batch}"
        if self.elapsed() + need > self.part.budget_s:
            reason = f"needs ~{need:.0f} s, {self.part.budget_s - self.elapsed():.0f} s of the budget left"
            self.result["skipped"].append(dict(cell=index, model=cell.model, workload=cell.workload,
                                               batch=cell.batch, columns=list(cell.columns), reason=reason))
            print(f"{label}: skipped ({reason})", flush=True)
            return
        print(f"{label} (tier {cell.tier}, ~{need:.0f} s; {self.elapsed():.0f} s elapsed): "
              f"{', '.join(cell.columns)}", flush=True)
        started = time.perf_counter()
        self.run_cell(index, cell)
        spent = time.perf_counter() - started - self._waited  # the estimates know nothing of waits
        self._estimated, self._spent = self._estimated + guess, self._spent + spent
        self.factor = min(max(self._spent / self._estimated, 0.5), 4.0)
        self.write()

    def run_cell(self, index: int, cell: Cell) -> None:
        before = _counter_snapshot()
        ids = token_ids(self.shapes[cell.model], cell, self.part)
        errors: list[dict] = []
        calls, compile_s = {}, {}
        for column in cell.columns:
            call, seconds = self.compiled_call(index, cell, column, ids, errors)
            if call is not None:
                calls[column] = call
                if seconds is not None:
                    compile_s[column] = seconds
        if self.ready is not None:
            self.ready.touch()
        if self.compile_only:
            self.result["cells"].append(dict(cell=index, model=cell.model, workload=cell.workload, batch=cell.batch,
                                             tier=cell.tier, columns=list(cell.columns), compile_s=compile_s,
                                             compile_only=True))
            self.result["errors"] += [dict(cell=index, model=cell.model, **e) for e in errors]
            return
        reps = self.part.reps[cell.workload.split("-")[0]]
        self._waited = self.wait()
        started = time.perf_counter()
        samples = measure(calls, reps, max(self.part.warmup - 1, 0), self.sync, errors)
        plans = self.plans[cell.model]
        rows = cell_rows(index, cell, samples, plans, compile_s, self.part)
        for row in rows:
            backend = self.twins[(cell.model, row["column"])].backend
            if backend is not None and backend.reports:
                row["report"] = repr(backend.reports[-1])
        summary = summarise(rows, plans, self.part)
        self.result["rows"] += rows
        self.result["summary"] += summary
        self.result["errors"] += [dict(cell=index, model=cell.model, workload=cell.workload, batch=cell.batch, **e)
                                  for e in errors]
        self.result["cells"].append(dict(
            cell=index, model=cell.model, workload=cell.workload, batch=cell.batch, tier=cell.tier,
            columns=list(cell.columns), compile_s=sum(compile_s.values()), waited_s=self._waited,
            measure_s=time.perf_counter() - started, counters=_counter_diff(before, _counter_snapshot())))
        print_cell(rows, summary)

    def compiled_call(self, index: int, cell: Cell, column: str, ids: torch.Tensor,
                      errors: list[dict]) -> tuple[Callable[[], dict] | None, float | None]:
        """The column's call for this cell, compiled (by calling it once) unless an earlier cell did."""
        key = (cell.model, column, cell.workload, cell.batch)
        try:
            twin = self.twin(cell.model, column)
        except Exception as error:  # noqa: BLE001 - recorded; the cell goes on without the column
            errors.append(dict(column=column, stage="build", error=f"{type(error).__name__}: {error}"))
            print(f"    {column}: could not build: {type(error).__name__}: {error}", flush=True)
            return None, None
        call = decode_call(twin, ids, self.part) if cell.workload == "decode" else prefill_call(twin, ids)
        threads = column_parts(column)[2]
        if threads is not None:
            call = with_threads(call, threads)
        if key in self.compiled:
            return call, None
        print(f"    compiling {column} ...", end="", flush=True)
        started = time.perf_counter()
        try:
            with torch.no_grad():
                call()
            self.sync()
        except Exception as error:  # noqa: BLE001 - recorded; the cell goes on without the column
            errors.append(dict(column=column, stage="compile", error=f"{type(error).__name__}: {error}"))
            print(f" failed: {type(error).__name__}: {error}", flush=True)
            return None, None
        seconds = time.perf_counter() - started
        print(f" {seconds:.1f} s", flush=True)
        self.compiled[key] = index
        return call, seconds

    # -- models and twins

    def model(self, name: str) -> torch.nn.Module:
        if name not in self.models:
            shape = self.shapes[name]
            started = time.perf_counter()
            self.models[name] = build_model(shape, self.part.device, self.part.dtype)
            self.result["models"][name] = model_entry(shape, self.params[name], self.plans[name], self.part)
            print(f"  built {name}: {self.params[name] / 1e6:.1f} M parameters, {shape.layers} layers, "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
        return self.models[name]

    def twin(self, name: str, column: str) -> Twin:
        if (name, column) not in self.twins:
            kind, key, _ = column_parts(column)
            model = self.model(name)
            if kind == "ideal":
                if (name, key) not in self.ideals:
                    self.ideals[(name, key)] = without_saved_blocks(model, self.plans[name][key])
                model = self.ideals[(name, key)]
            kwargs, backend = compile_settings(column, self.plans[name], self.part)
            module = compiled_twin(model, dynamic=False, **kwargs)
            self.twins[(name, column)] = Twin(module, StepClock(module, self.part.device == "cuda"), backend)
        return self.twins[(name, column)]

    def wait(self) -> float:
        """Seconds spent waiting until ``wait_for`` exists (0 without one)."""
        if self.wait_for is None or self.wait_for.exists():
            return 0.0
        print(f"    waiting for {self.wait_for} before timing ...", end="", flush=True)
        started = time.perf_counter()
        while not self.wait_for.exists():
            time.sleep(0.5)
        waited = time.perf_counter() - started
        print(f" {waited:.0f} s", flush=True)
        return waited

    def sync(self) -> None:
        if self.part.device == "cuda":
            torch.cuda.synchronize()
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step for Inductor's graph trees

    # -- output

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.result["meta"]["elapsed_s"] = self.elapsed()
        path = self.out / f"{self.part.file_stem}.json"
        path.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        plot(self.result, self.part.base, self.out / f"{self.part.file_stem}.png")


def token_ids(shape: Shape, cell: Cell, part: Part) -> torch.Tensor:
    tokens = part.prompt if cell.workload == "decode" else part.prefill
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, shape.vocab, (cell.batch, tokens), generator=generator).to(part.device)


def meta_parameter_count(shape: Shape, part: Part) -> int:
    return parameter_count(build_model(shape, "meta", part.dtype))


def model_entry(shape: Shape, params: int, plans: dict[str, Plan], part: Part) -> dict:
    return dict(dataclasses.asdict(shape), params=params,
                weight_gib=params * torch.finfo(part.dtype).bits / 8 / 2**30,
                plans={key: plan_label(plan) for key, plan in plans.items()},
                ideal_layers={key: shape.layers - plan.saved_blocks for key, plan in plans.items()})


_COUNTERS = ("cqil", "inductor")


def _counter_snapshot() -> dict[str, dict[str, int]]:
    return {group: dict(counters[group]) for group in _COUNTERS}


def _counter_diff(before: dict, after: dict) -> dict[str, int]:
    """What changed in the cqil and inductor counters (captures, segments, fallbacks, cudagraph skips)."""
    out = {}
    for group in _COUNTERS:
        for name, value in after[group].items():
            if value != before[group].get(name, 0) and (group == "cqil" or "cudagraph" in name):
                out[f"{group}.{name}"] = value - before[group].get(name, 0)
    return out


def run_meta(part: Part, shapes: dict[str, Shape], wide: int, command: str) -> dict:
    if part.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    notes = [shape.note for shape in shapes.values() if shape.note]
    notes.append(f"decode: prompt of {part.prompt} tokens prefilled by the uncompiled forward (not timed), "
                 f"then {part.new_tokens} new tokens; ms per new token over the last {part.new_tokens - 1}")
    notes.append(f"ideal: each column ideal|P is the model without the blocks the plan saves, compiled like "
                 f"{part.ideal_like}; every ratio is against {part.base} in the same cell")
    return dict(
        command=command, date=time.strftime("%Y-%m-%d %H:%M"), part=part.name, small=part.small, device=device,
        torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda,
        threads=torch.get_num_threads(), dtype=str(part.dtype).removeprefix("torch."), compiler=part.compiler,
        prompt=part.prompt, new_tokens=part.new_tokens, prefill=part.prefill, reps=part.reps,
        warmup=part.warmup, budget_s=part.budget_s, wide=wide, base=part.base, notes=notes)
