"""mode="spmd" on 2 gloo ranks started by the tests: exactness, graph contents, errors instead of hangs."""

from __future__ import annotations

import mmap
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from conftest import relative_error

import spmd_worker

WORLD = 2
TOLERANCE = 1e-5


def run_ranks(scenario: str, tmp_path: Path, timeout: float = 240) -> list[dict]:
    """Run ``spmd_worker.<scenario>`` on WORLD fresh processes; each rank's result."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=spmd_worker.main, args=(r, WORLD, scenario, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        p.kill() if p.is_alive() else None
    assert not hung, f"ranks {hung} of {scenario!r} did not finish within {timeout} s"
    results = []
    for r in range(WORLD):
        path = tmp_path / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else dict(exitcode=procs[r].exitcode))
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return results


@pytest.fixture(scope="module")
def exactness(tmp_path_factory):
    return run_ranks("exactness", tmp_path_factory.mktemp("spmd"))


@pytest.mark.parametrize("case", spmd_worker.EXACTNESS_CASES, ids=lambda c: "-".join(map(str, c)))
def test_ranks_equal_local_mode_and_reference(exactness, case):
    for rank, results in enumerate(exactness):
        r = results[case]
        assert relative_error(r["spmd"], r["local"]) < TOLERANCE, rank
        assert relative_error(r["spmd"], r["reference"]) < TOLERANCE, rank
        assert relative_error(r["spmd"], r["original"]) > 1e-2  # the plan changes the model
    assert torch.equal(exactness[0][case]["spmd"], exactness[1][case]["spmd"])  # every rank: same logits


@pytest.mark.parametrize("case", spmd_worker.EXACTNESS_CASES, ids=lambda c: "-".join(map(str, c)))
def test_each_rank_graph_holds_its_members_and_the_collectives(exactness, case):
    _, bypass, _, transport = case
    for rank, results in enumerate(exactness):
        r = results[case]
        groups = [[2, 3], [4, 5]]
        others = {g[1 - rank] for g in groups}
        assert r["layers"] == set(range(8)) - others
        assert r["collectives"] == {"all_reduce": 2, "all_gather": 2 if bypass else 0}
        assert r["transport"] == {"auto": "shared_memory"}.get(transport, transport)  # CPU ranks on one host
        assert r["placement"].kept == tuple(g[rank] for g in groups)
        assert r["placement"].dropped == tuple(sorted(others))


@pytest.mark.parametrize("tp", [False, True], ids=["cqil", "cqil+tp"])
def test_a_corrected_plan_on_two_ranks_equals_its_reference(exactness, tensor_parallel, tp):
    """Affine and low-rank corrections: rank r sends its member's corrected term to the group's one
    all-reduce, with tensor_parallel=True too (whose collectives the correction leaves as they were)."""
    ranks = [results["corrected"] for results in (tensor_parallel if tp else exactness)]
    assert ranks[0]["plan"] == ranks[1]["plan"]  # both ranks fitted the same factors
    assert '"low_rank"' in ranks[0]["plan"]
    for rank, r in enumerate(ranks):
        assert relative_error(r["spmd"], r["reference"]) < TOLERANCE, rank
        assert relative_error(r["reference"], r["uncorrected"]) > 1e-3  # the correction changes the model
        assert r["collectives"] == (expected_collectives(2, 1, 8) if tp else {"all_reduce": 2, "all_gather": 2})
        assert r["layers"] == set(range(8)) - {g[1 - rank] for g in [[2, 3], [4, 5]]}
    assert torch.equal(ranks[0]["spmd"], ranks[1]["spmd"])


def test_each_rank_keeps_only_its_members_weights(exactness):
    r = exactness[0][("gpt2", 0, "aot_eager", "shared_memory")]
    from tiny_models import tiny_model

    layer_bytes = sum(p.numel() * 4 for p in tiny_model("gpt2").transformer.h[2].parameters())
    # Two members (one per group) released, each down to one element per parameter.
    assert r["bytes_before"] - r["bytes_after"] == pytest.approx(2 * layer_bytes, rel=0.01)


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory):
    return run_ranks("tensor_parallel", tmp_path_factory.mktemp("spmd"))


def _tp_id(case) -> str:
    return "-".join(map(str, case))


@pytest.mark.parametrize("case", spmd_worker.TP_CASES, ids=_tp_id)
def test_tensor_parallel_ranks_equal_the_reference(tensor_parallel, case):
    for rank, results in enumerate(tensor_parallel):
        assert relative_error(results[case]["spmd"], results[case]["reference"]) < TOLERANCE, rank
    assert torch.equal(tensor_parallel[0][case]["spmd"], tensor_parallel[1][case]["spmd"])


def test_tensor_parallel_one_token_of_batch_one_equals_the_reference(tensor_parallel):
    for rank, results in enumerate(tensor_parallel):
        assert relative_error(results["decode"]["spmd"], results["decode"]["reference"]) < TOLERANCE, rank


def test_tensor_parallel_fallback_keeps_attention_whole_where_heads_do_not_divide(tensor_parallel):
    for rank, results in enumerate(tensor_parallel):
        r = results["fallback"]
        assert relative_error(r["spmd"], r["reference"]) < TOLERANCE, rank
        assert r["sharding"].whole_branches == (0, 1, 6, 7)  # their attention: 3 KV heads over 2 ranks
        # groups, one MLP per block, the embedding; the LM head
        assert r["collectives"] == {"all_reduce": 2 + 4 + 1, "all_gather": 1}


def expected_collectives(groups: int, bypass: int, blocks: int, world: int = WORLD, vocab_splits: bool = True):
    """The formula of docs/architecture.md ("Tensor parallelism"): per forward, on every rank,
    all_reduce = G + 2 S + [embedding split] (S = blocks outside groups), all_gather = G [D > 0] + [LM head split]."""
    outside = blocks - world * groups
    return {"all_reduce": groups + 2 * outside + int(vocab_splits),
            "all_gather": groups * (bypass > 0) + int(vocab_splits)}


@pytest.mark.parametrize("case", spmd_worker.TP_CASES, ids=_tp_id)
def test_tensor_parallel_graph_holds_the_formula_of_collectives_and_weight_slices(tensor_parallel, case):
    family, bypass, _, _, plan = case
    groups = [[2, 3], [4, 5]] if plan == "groups" else []
    outside = [i for i in range(8) if not any(i in g for g in groups)]
    expected = expected_collectives(len(groups), bypass, 8)
    for rank, results in enumerate(tensor_parallel):
        r = results[case]
        assert r["collectives"] == expected, (rank, r["collectives"])
        assert r["reported"] == sum(expected.values())
        # the bypass gathers along dim 0; the logits in one collective along the vocabulary (no chunk + cat)
        assert r["gather_dims"] == [0] * (len(groups) * (bypass > 0)) + [2], (rank, r["gather_dims"])
        # over shared memory the LM head's linear is folded into its gather (computed into the slot)
        assert r["linear_gathers"] == (case[3] == "shared_memory"), (rank, r["linear_gathers"])
        assert r["sharding"].blocks == tuple(outside) and r["sharding"].lm_head and r["sharding"].embedding
        assert r["sharding"].row_linears == 2 * len(outside)  # o_proj / dense and down_proj / fc2
        # q, k, v and the MLP's input linears (gate + up; Phi: fc1) column-parallel, the LM head by vocabulary
        assert r["sharding"].column_linears == (5 if family != "phi" else 4) * len(outside)
        assert r["narrows"]  # the weights are read as slices: this rank's half of the LM head's rows
        head = [v for k, v in r["narrows"].items() if "lm_head" in k and "weight" in k]
        assert head == [(0, rank * 48, 48)], r["narrows"]
        table = [v for k, v in r["narrows"].items() if "embed" in k and "weight" in k]
        assert table == [(0, rank * 48, 48)], r["narrows"]  # the embedding's rows: this rank's half too


def test_each_rank_reads_only_its_members_and_shards_from_safetensors(tensor_parallel):
    from tiny_models import tiny_model

    results = [r["weights"] for r in tensor_parallel]
    full = tiny_model("llama")
    whole = sum(p.numel() * 4 for p in full.parameters())
    layer = sum(p.numel() * 4 for p in full.model.layers[0].parameters())
    linears = sum(p.numel() * 4 for n, p in full.model.layers[0].named_parameters() if "proj" in n)
    head = full.lm_head.weight.numel() * 4
    table = full.get_input_embeddings().weight.numel() * 4
    for rank, by_tp in enumerate(results):
        r = by_tp.pop("tied")  # one table read by the embedding and the LM head: its rows split once
        assert relative_error(r["spmd"], r["reference"]) < TOLERANCE, rank
        assert r["same"] and r["rows"] == 48 and r["collectives"] == expected_collectives(2, 1, 8)
        assert r["loaded"].bytes_whole == r["whole"] and r["loaded"].fraction < 0.6, r["loaded"]
        for tp, r in by_tp.items():
            assert relative_error(r["spmd"], r["reference"]) < TOLERANCE, (rank, tp)
            plain = {"all_reduce": 2, "all_gather": 2}  # G all-reduces, G all-gathers (D = 1)
            assert r["collectives"] == (expected_collectives(2, 1, 8) if tp else plain), (rank, tp)
            assert not r["narrows"]  # the parameters are this rank's slices: the graph reads them whole
            loaded = r["loaded"]
            # Two other members released; with TP the 4 blocks outside groups, the LM head and the
            # embedding hold halves. (a released parameter keeps one element: 4 bytes)
            expected = whole - 2 * layer + 4 * len(loaded.released) - (
                4 * linears // 2 + head // 2 + table // 2 if tp else 0)
            assert loaded.bytes_loaded == expected and loaded.bytes_whole == whole, (rank, tp, loaded)
        assert by_tp[True]["loaded"].fraction < 0.6


@pytest.fixture(scope="module")
def compile_errors(tmp_path_factory):
    return run_ranks("compile_errors", tmp_path_factory.mktemp("spmd"))


def test_parallel_different_from_world_size_is_an_error_on_every_rank(compile_errors):
    for rank, results in enumerate(compile_errors):
        kind, message = results["parallel_not_world"]["error"]
        assert kind == "CQILPlanError", results
        assert f"rank {rank}" in message and "3 members" in message and "parallel=2" in message


def test_tensor_parallel_head_counts_that_do_not_divide_are_an_error_naming_them(compile_errors):
    for results in compile_errors:
        kind, message = results["kv_heads_3"]["error"]
        assert kind == "CQILPlanError", results
        assert "3 heads" in message and "world size 2" in message
        kind, message = results["heads_3"]["error"]
        assert kind == "CQILPlanError", results
        assert "3 heads" in message and "world size 2" in message
        kind, message = results["conv1d"]["error"]
        assert kind == "CQILUnsupportedError" and "Conv1D" in message, results
        kind, message = results["dynamic"]["error"]
        assert kind == "CQILUnsupportedError" and "dynamic=False" in message and "shard_rank_weights" in message, results


def test_load_rank_weights_keeps_attention_whole_only_with_tp_fallback(tmp_path):
    from spmd_worker import _heads

    from cqil_fx import CQILConfig, CQILPlanError
    from cqil_fx.graph.weights import load_rank_weights

    model = _heads("llama", 6, 3)
    model.save_pretrained(tmp_path)
    config = CQILConfig(start=2, end=6, mode="spmd", tensor_parallel=True)
    with pytest.raises(CQILPlanError, match="6 attention heads and 3 key/value heads .* world size 2"):
        load_rank_weights(model.config, tmp_path, config, rank=0, world_size=2)
    mine, loaded = load_rank_weights(model.config, tmp_path, CQILConfig(start=2, end=6, mode="spmd",
                                                                       tensor_parallel=True, tp_fallback=True), 1, 2)
    assert mine.model.layers[0].self_attn.k_proj.weight.shape == (24, 48)  # whole: 3 KV heads of 8
    assert torch.equal(mine.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight[32:])
    assert all("self_attn" not in name for name in loaded.sharded) and loaded.sharded
    assert loaded.peak_bytes is not None and "while loading" in repr(loaded)


def test_peak_memory_sees_what_the_block_touched():
    from cqil_fx.graph.weights import PeakMemory

    # A fresh anonymous mapping, not a tensor: after earlier tests free large models, the allocator
    # serves 64 MiB from free heap pages that are already resident, and the resident size never moves.
    with PeakMemory() as peak:
        block = mmap.mmap(-1, 64 * 2**20)
        for page in range(0, len(block), mmap.PAGESIZE):  # written: resident while the block runs
            block[page] = 1
        time.sleep(0.05)  # 50 sampling periods with it resident (writing it can take under one)
        block.close()
    with PeakMemory() as idle:
        pass
    assert peak.bytes >= 48 * 2**20, peak.bytes
    assert idle.bytes < 16 * 2**20, idle.bytes


def test_ranks_that_disagree_on_the_plan_raise_instead_of_hanging(compile_errors):
    for results in compile_errors:
        kind, message = results["plans_disagree"]["error"]
        assert kind == "CQILDistributedError", results
        assert "disagree" in message and "[2-3]" in message and "[4-5]" in message


def test_ranks_called_with_different_shapes_raise_on_every_rank_naming_them(compile_errors):
    for rank, r in enumerate(r["ranks_disagree"] for r in compile_errors):
        kind, message = r["compile"]["error"]
        assert kind == "CQILDistributedError" and "disagree" in message, r
        assert "[1, 16]" in message and "[1, 20]" in message  # the token ids' shapes on each rank
        kind, message = r["collective"]["error"]
        assert kind == "CQILDistributedError", r
        assert f"rank {rank}" in message and "rank 0: [1, 16, 8], rank 1: [1, 20, 8]" in message
        assert torch.equal(r["after"], torch.full((2, 3), 2.0))


@pytest.mark.parametrize("scenario", ["rank_dies", "rank_hangs"])  # over gloo, over shared memory
def test_a_lost_rank_raises_on_the_others_within_the_timeout(tmp_path, scenario):
    result = run_ranks(scenario, tmp_path)[0]
    kind, message = result["error"]
    assert kind == "CQILDistributedError", result
    assert "rank 0" in message and "collective_timeout" in message
    assert result["seconds"] < 4 + 6  # collective_timeout=4 plus slack for a loaded machine


def test_spmd_without_a_process_group_is_a_clear_error():
    from cqil_fx import CQILUnsupportedError, make_backend
    from tiny_models import tiny_model, tokens

    fast = torch.compile(tiny_model("llama"), backend=make_backend(start=2, end=6, mode="spmd", inner="eager"))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        fast(tokens(), use_cache=False)
    assert isinstance(info.value.inner_exception, CQILUnsupportedError)
    assert "torchrun" in str(info.value)


def test_input_descriptions_tell_token_ids_apart_and_floats_by_shape():
    from cqil_fx.graph.distributed import describe_input

    ids = torch.arange(12).view(1, 12)
    assert describe_input("ids", ids) == describe_input("ids", ids.clone())
    assert describe_input("ids", ids) != describe_input("ids", ids.flip(-1))  # same shape, other values
    assert describe_input("ids", ids).startswith("ids: [1, 12] values ")
    assert describe_input("pos", torch.tensor(3)) != describe_input("pos", torch.tensor(4))  # 0-dim
    assert describe_input("cache", torch.randn(2, 3)) == "cache: [2, 3]"  # floats: sizes only


def test_ranks_that_pass_other_inputs_raise_before_any_collective(tmp_path):
    results = run_ranks("inputs_disagree", tmp_path)
    for rank, r in enumerate(results):
        kind, message = r["values"]["error"]  # same shape, other token ids: the collectives cannot see it
        assert kind == "CQILDistributedError", r
        assert "disagree on what to call the compiled model with" in message and " values " in message, message
        kind, message = r["shapes"]["error"]  # one dynamic graph, 16 and 20 tokens, over gloo
        assert kind == "CQILDistributedError", r
        assert "call the compiled model with" in message and "[1, 16]" in message and "[1, 20]" in message, message


def test_ranks_whose_dynamo_compiled_different_graphs_raise_naming_the_cause(tmp_path):
    for rank, r in enumerate(run_ranks("compile_histories_differ", tmp_path)):
        kind, message = r["error"]
        assert kind == "CQILDistributedError", (rank, r)
        assert "some ranks compile a graph where others call one" in message and "torch._dynamo.reset()" in message


@pytest.mark.parametrize("scenario", ["loaded_tp_generation", "loaded_tp_dynamic_generation",
                                      "sharded_tp_dynamic_generation"])
def test_the_cache_of_a_rank_loaded_tp_model_holds_only_its_heads(tmp_path, scenario):
    results = run_ranks(scenario, tmp_path)
    if scenario == "sharded_tp_dynamic_generation":  # sharded in memory: what loading would have read
        (tmp_path / "loaded").mkdir()
        loaded = run_ranks("loaded_tp_generation", tmp_path / "loaded")
        for rank, (r, again) in enumerate(zip(results, loaded)):
            assert r["parameters"] == again["parameters"], rank
            assert (r["weights"].sharded, r["weights"].released) == (again["weights"].sharded,
                                                                     again["weights"].released)
            assert r["weights"].fraction == again["weights"].fraction < 0.6, r["weights"]
            marks = {n: mark for n, (_, _, mark) in r["parameters"].items()}  # what the pass reads as sharded
            assert {n for n, m in marks.items() if m} == set(r["weights"].sharded), marks
            assert {marks[n] for n in r["weights"].sharded} == {"colwise", "rowwise"}
    for rank, r in enumerate(results):
        assert torch.equal(r["tokens"], r["expected"]), (rank, r["tokens"], r["expected"], r["reports"])
        heads = r["kv_heads"]
        # blocks 0 and 3 tensor-parallel: their caches hold this rank's heads only; the group's members whole
        assert [r["cache_heads"][i] for i in (0, 3)] == [heads // 2] * 2, r["cache_heads"]
        assert r["cache_heads"][1 + rank] == heads, r["cache_heads"]
        assert r["cache_elements"][2 - rank] == 1, r["cache_elements"]  # the other member's: no cache at all


@pytest.mark.parametrize("scenario", ["generation", "tp_generation", "dynamic_generation",
                                      "dynamic_generation_gemma2", "dynamic_generation_gpt2"])
def test_cache_generation_on_two_ranks(tmp_path, scenario):
    results = run_ranks(scenario, tmp_path)
    for rank, r in enumerate(results):
        assert torch.equal(r["tokens"], r["expected"]), (rank, r["tokens"], r["expected"])
        assert torch.equal(r["again"], r["expected"])  # a second generate() resets and reuses the cache
        assert all(p is not None and p.kept == (1 + rank,) for p in r["placements"]), r["reports"]
        # the other member's layer (group [1, 2]): its cache holds one element on this rank, the others whole
        other = 2 - rank
        assert r["cache_elements"][other] == 1, r["cache_elements"]
        assert all(n > 1 for i, n in enumerate(r["cache_elements"]) if i != other), r["cache_elements"]
        assert not any(r["other_projections"]), r["other_projections"]  # nor does any graph compute its K/V
        assert all(r["own_projections"]), r["own_projections"]  # (as it does its own member's)
        if scenario.startswith("dynamic_generation"):  # prefill, the first decode step, then one graph of any length:
            # every graph hands back a new cache tensor, and no graph computes the other member's K/V
            assert [p.caches_released for p in r["placements"]] == [2, 2, 2], r["reports"]
        else:  # prefill, decode: keys and values are allocated once, in the prefill graph
            assert [p.caches_released for p in r["placements"]] == [2, 0], r["reports"]


def test_released_cache_inputs_are_one_element_expanded():
    from cqil_fx.graph.modes.spmd import released_inputs

    whole, released = torch.zeros(2, 3, 4), torch.zeros(()).expand(2, 3, 4)
    inputs = [whole, released, torch.zeros(()).expand(1, 1), torch.tensor(5), 7]
    named = {0: "keys_0", 1: "keys_1", 2: "one", 3: "scalar", 4: "int"}
    assert released_inputs(named, inputs) == ["keys_1"]


def _one_rank_channel(capacity: int = 1 << 16):
    """A shared-memory channel of one rank (no process group): the collectives' own arithmetic, in-process."""
    from cqil_fx.graph import shm

    size = shm._FLAG_STRIDE * 8 + 2 * capacity
    shm._CHANNELS["test:one-rank"] = shm.Channel("test:one-rank", 0, 1, capacity, 5.0, mmap.mmap(-1, size))
    return "test:one-rank"


@pytest.mark.parametrize("bias", [False, True])
def test_linear_all_gather_computes_the_linear_in_its_slot(bias):
    """``cqil::shm_linear_all_gather`` equals linear-then-gather (one rank: the linear itself), for a batch of
    sequences and with a bias, call after call (the slots alternate)."""
    channel = _one_rank_channel()
    torch.manual_seed(0)
    x, weight = torch.randn(2, 5, 8), torch.randn(12, 8)
    b = torch.randn(12) if bias else None
    for _ in range(3):
        out = torch.ops.cqil.shm_linear_all_gather(x, weight, b, channel)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, b))
        torch.testing.assert_close(torch.ops.cqil.shm_all_gather(out, channel, None, -1), out)


def test_fold_linear_gathers_takes_only_a_linear_gathered_along_its_features():
    """The fold needs the gather along the linear's last dim, the linear used by the gather alone, and the
    linear's output in its inputs' dtype."""
    from cqil_fx.passes.spmd import fold_linear_gathers

    gather, fused = torch.ops.cqil.shm_all_gather.default, torch.ops.cqil.shm_linear_all_gather.default

    def graph(dim: int, second_use: bool, dtype: torch.dtype = torch.float32) -> torch.fx.GraphModule:
        g = torch.fx.Graph()
        x, w, b = (g.placeholder(n) for n in ("x", "w", "b"))
        x.meta["example_value"] = torch.empty(2, 5, 8)
        y = g.call_function(torch._C._nn.linear, (x, w, b))
        y.meta["example_value"] = torch.empty(2, 5, 12, dtype=dtype)  # bfloat16 from float32: autocast
        out = g.call_function(gather, (y, "channel", None, dim))
        g.output((out, y) if second_use else out)
        return torch.fx.GraphModule(torch.nn.Module(), g)

    folded = graph(2, False)
    assert fold_linear_gathers(folded, gather, fused) == 1
    (node,) = folded.graph.find_nodes(op="call_function", target=fused)
    assert [a.name if isinstance(a, torch.fx.Node) else a for a in node.args] == ["x", "w", "b", "channel", None]
    assert not folded.graph.find_nodes(op="call_function", target=torch._C._nn.linear)
    for dim, second_use, dtype in ((0, False, torch.float32), (2, True, torch.float32), (2, False, torch.bfloat16)):
        kept = graph(dim, second_use, dtype)
        assert fold_linear_gathers(kept, gather, fused) == 0
        assert len(kept.graph.find_nodes(op="call_function", target=gather)) == 1


# --------------------------------------------------------------------------- planning under torch.distributed


def test_rank0_plans_and_the_other_ranks_receive_the_plan_past_the_collective_timeout(tmp_path):
    """cqil_fx.plan under torchrun: only rank 0 searches, for longer than collective_timeout, while rank 1
    waits outside any collective and gets the same plan; backend="cqil" then compiles that plan on both."""
    ranks = run_ranks("plan_on_rank0", tmp_path)
    assert ranks[0]["plan"] == ranks[1]["plan"] and '"groups": [[' in ranks[0]["plan"]
    assert [r["searches"] for r in ranks] == [1, 0]
    assert ranks[1]["waited"] > 2 * spmd_worker.PLAN_TIMEOUT  # past the timeout, and no error
    for rank, r in enumerate(ranks):
        assert (r["mode"], r["source"]) == ("spmd", "chosen"), rank
        assert r["error"] < TOLERANCE, rank


def test_a_rank_waiting_for_a_plan_gives_up_when_rank0_dies(tmp_path):
    result = run_ranks("plan_rank0_dies", tmp_path)[1]
    kind, message = result["error"]
    assert kind == "CQILDistributedError", result
    assert "rank 0" in message and "collective_timeout" in message
    assert result["seconds"] < spmd_worker.PLAN_TIMEOUT + 10  # the timeout plus slack for a loaded machine


# --------------------------------------------------------------------------- quantized weights (torchao)


def test_quantized_weights_on_two_ranks_equal_the_quantized_reference(tmp_path):
    """int8 weight-only models of three families under mode="spmd": each rank's logits equal the plan's
    reference on the quantized model, with the other members' quantized weights released; with tensor
    parallelism (the LM head's fold left out for a quantized weight) too; int4 weights, which cannot be
    sliced, are refused under tensor parallelism with an error naming them."""
    pytest.importorskip("torchao")
    for rank, results in enumerate(run_ranks("quantized", tmp_path)):
        for family in spmd_worker.QUANTIZED_FAMILIES:
            r = results[family]
            assert r["error"] < TOLERANCE, (rank, family)
            assert r["released"] > 0.1, (rank, family)  # two of eight blocks' weights, quantized ones included
            assert "tp_refused" not in r, (rank, family, r.get("tp_refused"))
            assert r["tp_error"] < TOLERANCE and r["tp_blocks"], (rank, family)
        kind, message = results["int4_tp"]
        assert kind == "CQILUnsupportedError" and "Int4OpaqueTensor (cannot be sliced)" in message, results["int4_tp"]
