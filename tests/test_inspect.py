"""Inspection: the block table and plan, from Python and from `cqil-fx inspect`."""

import subprocess
import sys

import pytest

from cqil_fx import CQILConfig
from cqil_fx.tools.cli import main
from cqil_fx.tools.inspect import format_blocks, inspect_model

from tiny_models import tiny_model, tokens


def test_inspect_model_reports_blocks_and_plan():
    report = inspect_model(tiny_model("gpt2"), tokens(batch=1), CQILConfig(groups=[[2, 3, 4]], bypass=1))
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "8 decoder blocks"
    assert lines[1].split() == ["block", "module", "kind", "nodes", "params"]
    assert lines[2].split()[:3] == ["0", "transformer.h.0", "sequential"]
    assert int(lines[2].split()[4].replace(",", "")) == report.blocks[0].param_count
    assert lines[10] == "Plan(8 blocks: [2-4], bypass 1, saves 2 block-times)"
    assert lines[11] == "ideal: 2 of 8 block-times saved (25% of block time)"
    assert lines[12].startswith("quality cost: not measured")
    del lines[12]
    nodes = report.nodes_per_block_before
    assert lines[12] == (f"rewrite: {report.report.nodes_before} -> {report.report.nodes_before + 5} nodes, "
                         "1 groups, 2 bypass edges, 0 collectives (mode local)")
    # +3 deltas, +1 group sum... per block: block 3 gains a bypass add, block 4 a bypass add and the sums.
    assert lines[13:] == [f"  block 2: {nodes[2]} -> {nodes[2]} nodes", f"  block 3: {nodes[3]} -> {nodes[3] + 1} nodes",
                          f"  block 4: {nodes[4]} -> {nodes[4] + 4} nodes"]
    assert format_blocks([]) == "no decoder blocks"


def test_inspection_measures_the_quality_cost_on_calibration_batches():
    from cqil_fx.eager.quality import perplexity

    model, config = tiny_model("llama"), CQILConfig(groups=[[1, 2], [5, 6]])
    calibration = [tokens(batch=2, length=12, seed=s) for s in range(2)]
    report = inspect_model(model, tokens(batch=1), config, calibration=calibration)
    base, planned = perplexity(model, calibration), perplexity(model, calibration, plan=config)
    assert report.perplexity == (base, planned)
    assert f"quality cost: calibration perplexity {base:.3f} -> {planned:.3f}" in str(report)


def test_dot_export_draws_groups_around_blocks(tmp_path):
    report = inspect_model(tiny_model("llama"), tokens(batch=1), CQILConfig(groups=[[1, 2], [5, 6]]))
    path = tmp_path / "g.dot"
    report.write_dot(str(path))
    text = path.read_text()
    assert text.startswith("digraph cqil {") and text.rstrip().endswith("}")
    assert 'subgraph "cluster_group_1" { label="group [1, 2]"' in text
    assert 'subgraph "cluster_group_5"' in text and 'subgraph "cluster_group_3"' not in text
    assert text.count('subgraph "cluster_block_') == 8
    assert text.count("->") == sum(
        1 for n in report.graph.graph.nodes if n.op != "placeholder" for u in n.users)


def test_cli_rejects_bad_input_with_a_message(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--start", "3", "--end", "6"])
    assert info.value.code == 2
    assert "(end - start) = 3 is not a multiple of parallel=2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", "--groups", "3-x"])
    assert "write groups as FIRST-LAST" in capsys.readouterr().err
    for command in ("plan", "eval"):
        for width in ("0", "two"):
            with pytest.raises(SystemExit):
                main([command, "--beam", width])
            assert "the beam is a number of plans, 1 or more" in capsys.readouterr().err
    for share in ("0", "1.5", "most"):
        with pytest.raises(SystemExit):
            main(["plan", "--keep-copying", share])
        assert "a share of the original's copying, in (0, 1]" in capsys.readouterr().err


def test_cli_reports_every_cqil_error_as_a_message_not_a_traceback(capsys, tmp_path):
    """A model directory that is not there, or holds no model: exit 2 and a message naming it."""
    for model in ("/no/such/dir", str(tmp_path)):
        with pytest.raises(SystemExit) as info:
            main(["inspect", "--model", model])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("cqil-fx: error: ") and repr(model) in err and "Traceback" not in err


def test_every_exception_raised_to_users_is_a_cqil_error():
    import cqil_fx
    from cqil_fx import errors

    raised = [getattr(errors, name) for name in dir(errors) if name.endswith("Error") and name != "CQILError"]
    assert len(raised) >= 10
    for error in raised:
        assert issubclass(error, cqil_fx.CQILError)
        # still the builtin it was (a bad argument a ValueError, a failed latency assertion an
        # AssertionError, a cache in the way a FileExistsError), so `except ValueError` keeps working
        builtin = [c for c in error.__mro__ if c.__module__ == "builtins" and c not in (Exception, BaseException, object)]
        assert builtin, error


@pytest.mark.real_model
def test_cli_inspect_smollm2(smollm2):
    out = subprocess.run(
        [sys.executable, "-m", "cqil_fx.tools.cli", "inspect", "--start", "12", "--end", "28", "--bypass", "1",
         "--windows", "1"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "30 decoder blocks" in out
    assert "model.layers.29" in out
    assert "Plan(30 blocks: [12-13] [14-15] [16-17] [18-19] [20-21] [22-23] [24-25] [26-27], bypass 1, " \
        "saves 8 block-times)\nideal: 8 of 30 block-times saved (27% of block time)\n" in out
    assert "8 groups, 8 bypass edges, 0 collectives" in out
    assert "quality cost: calibration perplexity " in out
