"""The prepared GPU lease without a GPU: the weights' transfer in parts (benchmarks/smollm2_transfer.py),
the user's path in its dry form (benchmarks/gpu_user_path.py --dry-run: a tiny model on the CPU, Dynamo's
eager compiler) and the session script's plumbing (benchmarks/gpu_session_user.sh dry).

The transfer is checked against gguf-py's own dequantisation on synthetic blocks, and on SmolLM2's real
GGUF against ``load_smollm2``'s cache, bit for bit; the dry run's JSON is checked for every phase's keys
and for the exactness that holds on the CPU in float32 (CQIL's tokens equal the plan's eager reference).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import smollm2_transfer as transfer  # noqa: E402

gguf = pytest.importorskip("gguf")


def _env(tmp_path: Path) -> dict:
    """The scripts' environment here: this checkout first, a plan cache and a stash of the test's own."""
    return dict(os.environ, PYTHONPATH=str(ROOT), CQIL_FX_PLAN_CACHE=str(tmp_path / "plans"),
                CQIL_XFER_STASH=str(tmp_path / "stash"), PYTHONUNBUFFERED="1")


# ------------------------------------------------------------------------------------------------ transfer


def synthetic_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """GGUF blocks of random numbers (finite fp16 scales), flat uint8."""
    if kind == "F32":
        return rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint8).reshape(-1)
    blocks = rows * cols // 32
    d = (rng.random(blocks) * 0.05 + 1e-3).astype(np.float16).view(np.uint8).reshape(blocks, 2)
    if kind == "Q8_0":
        q = rng.integers(-127, 128, (blocks, 32), dtype=np.int8).view(np.uint8)
        return np.concatenate([d, q], axis=1).reshape(-1)
    m = (-rng.random(blocks) * 0.4).astype(np.float16).view(np.uint8).reshape(blocks, 2)
    q = rng.integers(0, 256, (blocks, 16), dtype=np.uint8)
    return np.concatenate([d, m, q], axis=1).reshape(-1)


def synthetic_tensors(rng: np.random.Generator) -> tuple[list[transfer.Tensor], dict[str, np.ndarray]]:
    """Tensors of each packed type, one with the query rows' permutation; what gguf-py decodes them to."""
    specs = [("model.layers.0.self_attn.q_proj.weight", "Q4_1", 16, 64, 2),
             ("model.layers.0.mlp.down_proj.weight", "Q4_1", 8, 96, 0),
             ("model.embed_tokens.weight", "Q8_0", 12, 64, 0),
             ("model.norm.weight", "F32", 1, 64, 0)]
    tensors, expected = [], {}
    for name, kind, rows, cols, heads in specs:
        raw = synthetic_blocks(kind, rows, cols, rng)
        qtype = gguf.GGMLQuantizationType[kind]
        values = gguf.quants.dequantize(raw.reshape(rows, -1), qtype).reshape(rows, cols).astype(np.float32)
        values = np.ascontiguousarray(transfer.reverse_permute(values, heads) if heads else values)
        shape = (cols,) if rows == 1 else (rows, cols)
        values = values.reshape(shape)
        expected[name] = values
        tensors.append(transfer.Tensor(name, kind, shape, raw, heads, hashlib.sha256(values.tobytes()).hexdigest()))
    return tensors, expected


FILES = {"config.json": b'{"model_type": "llama"}', "cqil_fx_manifest.json": b'{"source": "synthetic"}'}


def carried(parts: Path, numbers: list[int], call: Path) -> Path:
    """A call's copy of the tree: the named parts' folders, as ``carry`` brings them."""
    for number in numbers:
        shutil.copytree(parts / str(number), call / str(number))
    return call


def test_parts_stashed_call_by_call_unpack_to_what_gguf_py_decodes(tmp_path):
    tensors, expected = synthetic_tensors(np.random.default_rng(0))
    whole = transfer.pack_bytes(tensors, FILES, {"source": "synthetic"})
    index = transfer.write_parts(whole, 3, tmp_path / "parts")
    assert [p["number"] for p in index["parts"]] == [1, 2, 3] and sum(p["bytes"] for p in index["parts"]) == len(whole)
    stash = tmp_path / "stash"
    for number in (1, 2, 3):  # each call brings one part; the stash keeps the earlier ones
        assert transfer.stash(carried(tmp_path / "parts", [number], tmp_path / f"call{number}"), stash) == list(
            range(1, number + 1))
    info = transfer.unpack(tmp_path / "cache", stash, tmp_path / "call3")
    assert info["tensors"] == len(tensors) and info["parts"] == 3

    from safetensors.numpy import load_file

    written = load_file(str(tmp_path / "cache" / "model.safetensors"))
    assert written.keys() == expected.keys()
    for name, values in expected.items():
        assert written[name].dtype == np.float32 and np.array_equal(written[name], values), name
    assert (tmp_path / "cache" / "config.json").read_bytes() == FILES["config.json"]
    assert (tmp_path / "cache" / "cqil_fx_manifest.json").is_file()  # written last: the cache is complete


def test_a_missing_part_is_named(tmp_path):
    tensors, _ = synthetic_tensors(np.random.default_rng(1))
    transfer.write_parts(transfer.pack_bytes(tensors, FILES, {}), 3, tmp_path / "parts")
    call = carried(tmp_path / "parts", [1, 3], tmp_path / "call")
    assert transfer.held(tmp_path / "stash", call) == [1, 3]
    with pytest.raises(transfer.TransferError, match=r"parts \[2\] of 3 are missing"):
        transfer.unpack(tmp_path / "cache", tmp_path / "stash", call)
    assert not (tmp_path / "cache").exists()


def test_numbers_other_than_were_packed_are_refused(tmp_path):
    tensors, _ = synthetic_tensors(np.random.default_rng(2))
    tensors[1] = transfer.Tensor(**{**tensors[1].__dict__, "sha256": "0" * 64})
    transfer.write_parts(transfer.pack_bytes(tensors, FILES, {}), 1, tmp_path / "parts")
    with pytest.raises(transfer.TransferError, match="down_proj.weight decodes to other numbers"):
        transfer.unpack(tmp_path / "cache", tmp_path / "stash", tmp_path / "parts")


def test_a_stash_of_another_pack_is_replaced(tmp_path):
    for seed, count in ((3, 2), (4, 2)):
        tensors, _ = synthetic_tensors(np.random.default_rng(seed))
        transfer.write_parts(transfer.pack_bytes(tensors, FILES, {}), count, tmp_path / f"parts{seed}")
    assert transfer.stash(carried(tmp_path / "parts3", [1], tmp_path / "a"), tmp_path / "stash") == [1]
    assert transfer.stash(carried(tmp_path / "parts4", [2], tmp_path / "b"), tmp_path / "stash") == [2]


def test_the_parts_fit_a_call_beside_the_tree_and_the_wheel():
    mb = 1_000_000
    count = transfer.parts_needed(87_500_000, tree_bytes=23 * mb, carried_with_last=3_400_000)
    assert count == 3  # two parts cannot hold 87.5 MB beside a 23 MB tree: 2 x (64 MiB - 4 MiB - 23 MB) < 91 MB
    sizes = transfer._part_sizes(87_500_000, count, 3_400_000)
    room = transfer.CALL_LIMIT - transfer.MARGIN - 23 * mb
    assert sum(sizes) == 87_500_000 and max(sizes[:-1]) <= room and sizes[-1] + 3_400_000 <= room
    with pytest.raises(transfer.TransferError, match="leaves no room"):
        transfer.parts_needed(10, tree_bytes=70 * mb)


@pytest.mark.real_model
@pytest.mark.slow
def test_real_gguf_blocks_decode_to_load_smollm2s_numbers(smollm2, tmp_path):
    """Name mapping, the query/key rows' permutation and the dequantisation, on SmolLM2's own tensors:
    unpack checks every tensor's SHA-256 against load_smollm2's cache."""
    from cqil_fx.tools.models import smollm2_cache_dir, smollm2_gguf_path

    wanted = {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
              "model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
              "model.layers.3.self_attn.v_proj.weight", "model.layers.29.mlp.down_proj.weight"}
    tensors = [t for t in transfer.gguf_tensors(smollm2_gguf_path(), smollm2_cache_dir()) if t.name in wanted]
    assert {t.name for t in tensors} == wanted
    assert {t.kind for t in tensors} == {"Q8_0", "Q4_1", "F32"}
    files = {name: (smollm2_cache_dir() / name).read_bytes() for name in ("config.json", "cqil_fx_manifest.json")}
    transfer.write_parts(transfer.pack_bytes(tensors, files, {}), 2, tmp_path / "parts")
    transfer.unpack(tmp_path / "cache", tmp_path / "stash", tmp_path / "parts")  # raises on any other number
    from safetensors.numpy import load_file

    written = load_file(str(tmp_path / "cache" / "model.safetensors"))
    model, _ = smollm2
    state = model.state_dict()
    for name in wanted:
        assert np.array_equal(written[name], state[name].numpy()), name


# ------------------------------------------------------------------------------------------------ user path


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The user's path, dry: a tiny model on the CPU, every phase (about 1.5 minutes on two cores)."""
    out = tmp_path_factory.mktemp("user-path")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_user_path.py"), "--dry-run", "--out",
                           str(out)], env=_env(out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "user_path.json").read_text()), done.stdout


def test_dry_run_runs_every_phase(dry_run):
    result, stdout = dry_run
    assert list(result["phases"]) == ["load", "plan", "generate", "exact-float32", "int8", "int4"]
    assert result["skipped"] == [] and result["errors"] == []
    meta = result["meta"]
    assert meta["device"].startswith(os.uname().machine) and meta["dtype"] == "float32" and meta["weights"] == "tiny"
    assert meta["prompt_tokens"] > 0 and "done in" in stdout


def test_dry_run_plans_then_compiles_with_the_chosen_plan(dry_run):
    phases = dry_run[0]["phases"]
    plan = phases["plan"]
    assert plan["plan_s"] > 0 and plan["saved_blocks"] > 0  # the tiny model's blocks are quasi-independent
    assert plan["forwards"]["model_calls"] > 0 and plan["forwards"]["layer_calls"] > plan["forwards"]["model_calls"]
    generate = phases["generate"]
    assert generate["first_calls"]["cqil"]["plan_sources"] == ["chosen"]  # backend="cqil" took cqil_fx.plan's
    assert generate["time_to_first_answer_s"] > plan["plan_s"]


def test_dry_run_times_every_column_with_spreads_and_ratios(dry_run):
    phases = dry_run[0]["phases"]
    expected = {"generate": ("reduce-overhead", "cqil", "ideal"), "int8": ("int8", "int8-cqil", "int8-ideal"),
                "int4": ("int4", "int4-cqil", "int4-ideal")}
    for phase, columns in expected.items():
        assert set(phases[phase]["columns"]) == set(columns), phase
        for entry in phases[phase]["columns"].values():
            token = entry["token_ms"]
            assert token["p10"] <= token["median"] <= token["p90"] and token["n"] == 2
        ratios = phases[phase]["ratios"][columns[1]]
        assert {"reduction", "ideal_reduction", "realised"} <= ratios.keys()
        assert "ratio_to_base" in phases[phase]["columns"][columns[1]]


def test_dry_run_cqil_tokens_equal_the_plans_reference(dry_run):
    phases = dry_run[0]["phases"]
    assert phases["generate"]["agreement"]["cqil_vs_plan_reference"]["equal_share"] == 1.0
    assert phases["generate"]["agreement"]["reduce-overhead_vs_eager_original"]["equal_share"] == 1.0
    exact = phases["exact-float32"]
    assert exact["tokens_equal"] and exact["logits_relative_error"]["max"] < 1e-5
    assert "(given)" in exact["report"] and "groups rewritten" in exact["report"]
    for name in ("int8", "int4"):
        assert 0.0 <= phases[name]["agreement"][f"{name}-cqil_vs_plan_reference"]["equal_share"] <= 1.0


def test_missing_work_lists_the_cells_the_leases_left(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_sweep.py"), "--dry-run", "--work",
                           "missing", "--big-layers", "32"], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cells = [line.split() for line in done.stdout.splitlines() if line[:3].strip().isdigit()]
    assert [(c[2], c[4]) for c in cells] == [("smollm2-135m", "8"), ("llama-3.1-8b", "1"), ("llama-3.2-1b", "1")]
    assert "P4" in " ".join(cells[2]) and "ideal|P4" in " ".join(cells[2]) and "inductor-graphs," in cells[2]
    assert "llama-3.1-8b   llama      32" in done.stdout


@pytest.mark.slow
def test_session_script_dry_runs_each_calls_steps(tmp_path):
    """The session script's plumbing (stash, sweeps, user path, logs), each step in its tiny CPU form."""
    out = tmp_path / "out"
    env = dict(_env(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session_user.sh"), "dry", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (out / "calldry.log").read_text()
    assert "parts held:" in log and "sweep sweep1 exit 0" in log and "sweep sweep2 exit 0" in log
    assert "user path exit 0" in log
    first = json.loads((out / "sweep1" / "gpu_sweep_small.json").read_text())
    assert {(c["model"], c["batch"]) for c in first["cells"]} == {("tiny-llama", 8), ("tiny-llama", 1)}
    second = json.loads((out / "sweep2" / "gpu_sweep_small.json").read_text())
    assert {(c["model"], c["batch"]) for c in second["cells"]} == {("tiny-qwen2", 1)}
    user = json.loads((out / "user" / "user_path.json").read_text())
    assert list(user["phases"]) == ["load", "plan", "generate"]
    assert not list(out.glob("*/*.png"))  # the device tool brings back eight files at most


def test_session_script_calls_keep_their_files_for_the_last(tmp_path):
    """Calls 1-3 on a machine without CUDA: their Python steps refuse at once, and the plumbing shows:
    each call stashes what parts it has and keeps its files; call 3 installs the wheels and brings back
    every call's log."""
    env = dict(_env(tmp_path), PYTHON=sys.executable, CQIL_LEASE_KEEP=str(tmp_path / "keep"),
               CQIL_WHEEL_TARGET=str(tmp_path / "site"))
    for call in ("1", "2", "3"):
        done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session_user.sh"), call, str(tmp_path / call)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"call {call} ended" in done.stdout and "no CUDA device here" in (tmp_path / call / f"call{call}.log"
                                                                              ).read_text()
    assert sorted(p.name for p in (tmp_path / "3").glob("call*.log")) == ["call1.log", "call2.log", "call3.log"]
    assert "parts held:" in (tmp_path / "3" / "call3.log").read_text()
