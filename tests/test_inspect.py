"""Inspection: the block table and plan, from Python and from `cqil-fx inspect`."""

import subprocess
import sys

import pytest

from cqil_fx import CQILConfig
from cqil_fx.cli import main
from cqil_fx.inspect import format_blocks, inspect_model

from tiny_models import tiny_model, tokens


def test_inspect_model_reports_blocks_and_plan():
    report = inspect_model(tiny_model("gpt2"), tokens(batch=1), CQILConfig(groups=[[2, 3, 4]], bypass=1))
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "8 decoder blocks"
    assert lines[1].split() == ["block", "module", "kind", "nodes", "params"]
    assert lines[2].split()[:3] == ["0", "transformer.h.0", "sequential"]
    assert int(lines[2].split()[4].replace(",", "")) == report.blocks[0].param_count
    assert lines[-1] == "Plan(8 blocks: [2-4], bypass 1, saves 2 block-times)"
    assert format_blocks([]) == "no decoder blocks"


def test_cli_rejects_bad_input_with_a_message(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--start", "3", "--end", "6"])
    assert info.value.code == 2
    assert "(end - start) = 3 is not a multiple of parallel=2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", "--groups", "3-x"])
    assert "write groups as FIRST-LAST" in capsys.readouterr().err


@pytest.mark.real_model
def test_cli_inspect_smollm2(smollm2):
    out = subprocess.run(
        [sys.executable, "-m", "cqil_fx.cli", "inspect", "--start", "12", "--end", "28", "--bypass", "1"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "30 decoder blocks" in out
    assert "model.layers.29" in out
    assert out.strip().endswith("Plan(30 blocks: [12-13] [14-15] [16-17] [18-19] [20-21] [22-23] [24-25] [26-27], bypass 1, saves 8 block-times)")
