"""The table `scripts/gpu_check.sh` prints: each `gpu` test's outcome and time (from pytest's JUnit XML) and the
training benchmark's precision rows (from its `--json`), one Markdown table, also written to OUTPUT_DIR/table.md.
A part that did not run (timed out, crashed) is a row saying so, with the log to read.

    python scripts/gpu_table.py OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers_language.files import write_text_atomic  # noqa: E402


def test_rows(junit: Path) -> list[tuple[str, str, str]]:
    """(check, result, figure) per test case of a JUnit XML report."""
    if not junit.is_file():
        return [("gpu tests", "did not finish", f"see {junit.with_name('tests.log')}")]
    rows = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        detail = next((child.get("message", "") for child in case if child.tag != "system-out"), "")
        name = f"test: {case.get('name')}"
        rows.append((name, outcome, f"{float(case.get('time', 0)):.1f} s {detail[:80]}".strip()))
    return rows


def benchmark_rows(figures_path: Path) -> list[tuple[str, str, str]]:
    """(check, result, figure) per model and precision mode of `bench_train.py --precision --json`."""
    if not figures_path.is_file():
        return [("training benchmark", "did not finish", f"see {figures_path.with_name('bench_train.log')}")]
    rows = []
    for model, result in json.loads(figures_path.read_text()).items():
        for mode, row in result["precision"].items():
            memory = f", {row['peak_gpu_gib']:.2f} GiB GPU" if "peak_gpu_gib" in row else ""
            figure = f"{row['tokens_per_s']:.0f} tokens/s{memory}"
            rows.append((f"train {model} {mode}", f"{row['vs_fp32']:.2f}x fp32", figure))
    return rows


def table(output_dir: Path) -> str:
    rows = test_rows(output_dir / "tests.xml") + benchmark_rows(output_dir / "bench_train.json")
    lines = ["| check | result | figure |", "| --- | --- | --- |"]
    lines += [f"| {check} | {result} | {figure} |" for check, result, figure in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    output_dir = Path(sys.argv[1])
    markdown = table(output_dir)
    write_text_atomic(output_dir / "table.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
