"""`scripts/gpu_check.sh` without a GPU refuses in one line; its table reads pytest's JUnit XML and the training
benchmark's JSON, and names a part that did not finish."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from gpu_table import table  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="2">
<testcase classname="tests.test_gpu" name="test_sdpa_on_cuda[bf16-opt]" time="1.25"/>
<testcase classname="tests.test_gpu" name="test_validation_on_cuda[w8a8-bert]" time="9.5">
<failure message="assert 10.3 == 10.1 +- 1.0e-01">trace</failure></testcase>
</testsuite></testsuites>"""


def test_the_table_holds_each_test_and_each_benchmark_row(tmp_path):
    (tmp_path / "tests.xml").write_text(JUNIT)
    rows = {"fp32": {"tokens_per_s": 1000.0, "vs_fp32": 1.0, "peak_gpu_gib": 0.5}}
    rows["bf16"] = {"tokens_per_s": 2500.0, "vs_fp32": 2.5, "peak_gpu_gib": 0.25}
    (tmp_path / "bench_train.json").write_text(json.dumps({"opt": {"precision": rows}}))
    lines = table(tmp_path).splitlines()
    assert lines[0] == "| check | result | figure |"
    assert lines[2] == "| test: test_sdpa_on_cuda[bf16-opt] | passed | 1.2 s |"
    assert lines[3] == "| test: test_validation_on_cuda[w8a8-bert] | failure | 9.5 s assert 10.3 == 10.1 +- 1.0e-01 |"
    assert lines[4:] == [
        "| train opt fp32 | 1.00x fp32 | 1000 tokens/s, 0.50 GiB GPU |",
        "| train opt bf16 | 2.50x fp32 | 2500 tokens/s, 0.25 GiB GPU |",
    ]
    (tmp_path / "bench_train.json").unlink()
    assert table(tmp_path).splitlines()[-1].startswith("| training benchmark | did not finish | see ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there: the check would run")
def test_the_check_refuses_without_a_gpu_in_one_line(tmp_path):
    env = os.environ | {"PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert done.stderr.strip().splitlines() == [
        "gpu_check: torch sees no CUDA device here; run it on a machine with a GPU"
    ]
