"""The README cannot drift from the code: its flag reference is the parsers' (generated), every flag it
mentions exists, every file it points at exists, and its test command is the one CI runs."""

import re
from pathlib import Path

from transformers_language.arguments import DROPPED_FLAGS
from transformers_language.jobs.flag_docs import flag_tables, parsers, readme_section

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# Flags of other tools that the README's commands use (accelerate, torchrun, pip, docker, the presets' own,
# the demo, the benchmarks and the flag-doc generator).
OTHER_TOOLS = {
    "--config_file", "--multi_gpu", "--num_processes", "--nproc_per_node", "--index-url", "--gpus", "--build-arg",
    "--accelerate_config", "--full", "--methods", "--rounds", "--json", "--steps", "--models", "--write", "--cpu",
    "--bits", "--recipes", "--reduced", "--resume",
}  # fmt: skip


def test_flag_reference_matches_the_parsers():
    assert readme_section(README) == flag_tables(), (
        "README flag reference is stale: run python -m transformers_language.jobs.flag_docs --write README.md"
    )


def test_every_flag_the_readme_mentions_exists():
    known = {flag for parser in parsers().values() for action in parser._actions for flag in action.option_strings}
    known |= set(DROPPED_FLAGS)  # the paper's flags the README names as refused, with their replacements
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", README))
    assert mentioned - known - OTHER_TOOLS == set()


def test_every_path_the_readme_names_exists():
    paths = set(re.findall(r"(?:scripts|model_configs|accelerate_configs|benchmarks|docker)/[\w.*-]+", README))
    missing = [p for p in paths if "*" not in p and not (REPO / p.rstrip(".")).exists()]
    assert not missing


def test_readme_commands_are_the_ones_that_run():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in README
    assert "```bash\nbash scripts/demo.sh\n```" in README
