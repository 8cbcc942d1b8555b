"""benchmarks/gpu_sweep.py without a GPU: the dry run, argument errors, and a tiny CPU run of its cells.

The tiny run uses Dynamo with the eager backend (``--compiler eager``, as ``--cpu-small`` does), so it
exercises the script's own code (twins, ideals, the clock, interleaved measuring, ratios, the JSON)
in seconds; the compilers themselves are covered by the other tests.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import threading
from pathlib import Path

import pytest
import torch

from cqil_fx.stack import decoder_layers

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("gpu_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_sweep"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_sweep", None)


def test_dry_run_checks_every_plan_and_prints_the_work_list(sweep, capsys):
    sweep.main(["--dry-run"])
    out = capsys.readouterr().out
    for name in ("smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "llama-3.1-8b"):
        assert name in out
    assert "P2: S12-E28 P2 D0 (8 groups, saves 8/30) (22)" in out  # SmolLM2: the span of the earlier H100 run
    assert "P4: S12-E28 P4 D0 (4 groups, saves 12/30) (18)" in out
    assert "llama-3.1-8b: 16 of the real model's 32 layers" in out
    assert "estimated time for every cell" in out
    sweep.main(["--dry-run", "--cpu"])
    out = capsys.readouterr().out
    assert "CPU sweep" in out and "cqil-concurrent|P4" in out and "inductor-cpp" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--dry-run", "--batches", "0"], "--batches must be positive"),
    (["--dry-run", "--models", "gpt5"], "--models: unknown gpt5"),
    (["--dry-run", "--reps", "1"], "--reps must be at least 2"),
    (["--dry-run", "--big-layers", "40"], "--big-layers must be between 4 and 32"),
    (["--threads", "4", "--dry-run"], "--threads applies to the CPU part"),
    (["--dry-run", "--columns", "inductor", "cqil|P2"], "--columns: unknown cqil|P2"),
    (["--replot", "no-such-sweep.json"], "--replot: no such file no-such-sweep.json"),
])
def test_bad_arguments_are_usage_errors(sweep, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        sweep.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_plans_ideals_and_the_work_list(sweep):
    assert {k: repr(p) for k, p in sweep.sweep_plans(16, 4).items()} == {
        "P2": "Plan(16 blocks: [6-7] [8-9] [10-11] [12-13], bypass 0, saves 4 block-times)",
        "P4": "Plan(16 blocks: [6-9] [10-13], bypass 0, saves 6 block-times)"}
    assert list(sweep.sweep_plans(8, 4)) == ["P2"]  # [3, 6) cannot hold a group of 4
    shape = sweep.TINY_SHAPES["tiny-llama"]
    model = sweep.build_model(shape, "cpu", torch.float32)
    plan = sweep.sweep_plans(shape.layers, 4)["P4"]  # [4-7]
    ideal = sweep.without_saved_blocks(model, plan)
    kept = decoder_layers(ideal)
    assert len(kept) == 7 and len(decoder_layers(model)) == 10  # the original keeps its blocks
    assert kept[5] is decoder_layers(model)[8] and ideal.lm_head.weight is model.lm_head.weight
    part = sweep.make_part(sweep.parse_args(["--cpu-small"])[1])
    shapes = {"eight": dataclasses.replace(shape, name="eight", layers=8)}
    plans = {"eight": sweep.sweep_plans(8, 4)}
    cells = sweep.restrict(sweep.gpu_work(part, shapes, [1], 4), ["decode"], plans)
    assert cells and all(c.workload == "decode" and not any("P4" in col for col in c.columns) for c in cells)
    only = ("inductor-cpp", "ideal|P4")  # --columns: cells keep these alone; a cell that a later one holds goes
    cells = sweep.restrict(sweep.cpu_work(part, {"tiny": shape}, [1], 4), ["decode", "prefill"],
                           {"tiny": sweep.sweep_plans(shape.layers, 4)}, only)
    assert [(c.workload, c.columns, c.tier) for c in cells] == [("decode", only, 2), ("prefill-32", only, 3)]


def test_wait_for_holds_the_timing_until_the_file_exists(sweep, tmp_path):
    flag = tmp_path / "gpu-part-done"
    part = sweep.make_part(sweep.parse_args(["--cpu-small"])[1])
    run = sweep.Sweep(part, {}, 4, tmp_path, "test", wait_for=flag)
    timer = threading.Timer(1.0, flag.touch)
    timer.start()
    try:
        assert 0.9 <= run.wait() < 30
    finally:
        timer.cancel()
    assert run.wait() == 0.0  # already there
    assert sweep.Sweep(part, {}, 4, tmp_path, "test").wait() == 0.0  # no file to wait for


def test_tiny_cpu_run_writes_every_column(sweep, tmp_path):
    shape = dataclasses.replace(sweep.TINY_SHAPES["tiny-llama"], name="tiny", layers=8, hidden=32, intermediate=64,
                                vocab=128)  # 8 blocks: P2 over [4, 6), P3 over [3, 6)
    part = dataclasses.replace(sweep.make_part(sweep.parse_args(["--cpu-small", "--reps", "2"])[1]),
                               prompt=8, new_tokens=3, prefill=12, warmup=2, budget_s=600)
    decode = ("inductor-graphs", "cqil-concurrent-graphs|P2", "ideal|P2", "cqil-local-graphs|P2")
    prefill = ("inductor-graphs", "cqil-concurrent-graphs|P3", "ideal|P3")
    cells = [sweep.Cell("tiny", "decode", 1, decode, 1), sweep.Cell("tiny", "prefill-12", 2, prefill, 2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds waiting on a busy 2-core machine
    try:
        with torch._dynamo.config.patch(recompile_limit=64):  # seven twins of one forward
            sweep.Sweep(part, {"tiny": shape}, 3, tmp_path, "test").run(cells)
    finally:
        torch.set_num_threads(threads)

    result = json.loads((tmp_path / "gpu_sweep_small.json").read_text())
    assert not result["errors"] and not result["skipped"]
    measured = {(r["workload"], r["column"]) for r in result["rows"]}
    assert measured == {("decode", c) for c in decode} | {("prefill-12", c) for c in prefill}
    for row in result["rows"]:
        assert row["n"] == 2 and row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["compile_s"] > 0
    decode_rows = [r for r in result["rows"] if r["workload"] == "decode"]
    assert all(r["forward_ms"] > 0 and r["tokens_per_s"] > 0 for r in decode_rows)
    assert "[4-5]" in next(r for r in decode_rows if r["column"] == "cqil-concurrent-graphs|P2")["report"]
    summary = {(s["workload"], s["column"], s["plan"].split(" (")[0]) for s in result["summary"]}
    assert summary == {("decode", "cqil-concurrent-graphs", "S4-E6 P2 D0"),
                       ("decode", "cqil-local-graphs", "S4-E6 P2 D0"),
                       ("prefill-12", "cqil-concurrent-graphs", "S3-E6 P3 D0")}
    for s in result["summary"]:
        assert {"base_ms", "cqil_ms", "reduction", "ideal_ms", "ideal_reduction", "realised"} <= set(s)
        assert s["base"] == "inductor-graphs"
    assert result["models"]["tiny"]["ideal_layers"] == {"P2": 7, "P3": 6}
    assert [c["counters"].get("cqil.groups_rewritten") for c in result["cells"]] == [2, 1]  # 2 twins x 1 group, 1 x 1
    assert (tmp_path / "gpu_sweep_small.png").exists() or importlib.util.find_spec("matplotlib") is None


def test_columns_at_a_thread_count_run_under_it_and_are_summarised(sweep, tmp_path):
    seen, before = [], torch.get_num_threads()
    sweep.with_threads(lambda: seen.append(torch.get_num_threads()) or {}, before + 1)()
    assert seen == [before + 1] and torch.get_num_threads() == before
    assert sweep.column_parts("cqil-concurrent|P2@8") == ("cqil-concurrent", "P2", 8)
    assert sweep.column_parts("inductor-cpp") == ("inductor-cpp", "", None)

    shape = dataclasses.replace(sweep.TINY_SHAPES["tiny-llama"], name="tiny", layers=8, hidden=32, intermediate=64,
                                vocab=128)
    part = dataclasses.replace(sweep.make_part(sweep.parse_args(["--cpu", "--compiler", "eager", "--reps", "2"])[1]),
                               prompt=8, new_tokens=3, warmup=1, budget_s=600)
    columns = ("inductor-cpp", "inductor-cpp@1", "cqil-concurrent|P2@1", "ideal|P2")
    with torch._dynamo.config.patch(recompile_limit=64):
        result = sweep.Sweep(part, {"tiny": shape}, 4, tmp_path, "test").run([sweep.Cell("tiny", "decode", 1, columns, 1)])
    assert [r["column"] for r in result["rows"]] == list(columns) and not result["errors"]
    (summary,) = result["summary"]
    assert summary["column"] == "cqil-concurrent@1" and summary["plan"].startswith("S4-E6 P2")
    assert summary["ideal_ms"] == result["rows"][3]["median_ms"]  # no ideal|P2@1: the ideal on every thread
    rows = {r["column"]: r["median_ms"] for r in result["rows"]}
    if rows["inductor-cpp@1"] < rows["inductor-cpp"]:
        assert summary["best_original"] == "inductor-cpp@1"
        assert summary["reduction_vs_best_original"] == pytest.approx(1 - rows[columns[2]] / rows["inductor-cpp@1"])
    else:
        assert "best_original" not in summary
