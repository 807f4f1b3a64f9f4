"""The README and docs/ cannot drift from the code: the flag reference is the parsers' (generated), every flag
they mention exists, every file, command and module they name exists, every link resolves, the README stays a
short front door with a map of every docs page, and its test command is the one CI runs."""

import importlib.util
import re
from pathlib import Path

import pytest

from transformers_language.arguments import DROPPED_FLAGS
from transformers_language.jobs.flag_docs import FLAGS_PAGE, flag_tables, generated_section, parsers

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((REPO / "docs").glob("*.md"))}
PAGES = {"README.md": README} | {f"docs/{name}": text for name, text in DOCS.items()}
README_MAX_LINES = 300
# Flags of other tools that the commands use (accelerate, torchrun, pip, docker, the presets' own, the demo, the
# benchmarks, the comparison and the flag-doc generator).
OTHER_TOOLS = {
    "--config_file", "--multi_gpu", "--num_processes", "--nproc_per_node", "--index-url", "--gpus", "--build-arg",
    "--accelerate_config", "--full", "--methods", "--rounds", "--json", "--steps", "--models", "--write", "--cpu",
    "--bits", "--recipes", "--reduced", "--resume", "--device", "--precision", "--table", "--draws", "--glue_dir",
    "--checkpoint", "--name", "--tasks", "--family", "--tokens", "--repeats", "--validation_tasks",
}  # fmt: skip


def test_flag_reference_matches_the_parsers():
    assert generated_section(DOCS[Path(FLAGS_PAGE).name]) == flag_tables(), (
        f"{FLAGS_PAGE} is stale: run python -m transformers_language.jobs.flag_docs --write {FLAGS_PAGE}"
    )


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_flag_a_page_mentions_exists(page):
    known = {flag for parser in parsers().values() for action in parser._actions for flag in action.option_strings}
    known |= set(DROPPED_FLAGS)  # the paper's flags the docs name as refused, with their replacements
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", PAGES[page]))
    assert mentioned - known - OTHER_TOOLS == set()


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_path_a_page_names_exists(page):
    text = PAGES[page]
    paths = set(re.findall(r"(?:scripts|model_configs|accelerate_configs|benchmarks|docker|tests)/[\w.*-]+", text))
    paths |= {f"transformers_language/{p}" for p in re.findall(r"transformers_language/([\w/]+\.py)", text)}
    paths |= set(re.findall(r"(?<![\w/])(?:run|validate)_\w+\.py", text))
    missing = [p for p in paths if "*" not in p and not (REPO / p.rstrip(".")).exists()]
    assert not missing


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_module_a_page_runs_exists(page):
    modules = set(re.findall(r"python -m ((?:transformers_language|quantization)[\w.]*)", PAGES[page]))
    assert all(importlib.util.find_spec(module) is not None for module in modules), modules


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_link_resolves(page):
    base = (REPO / page).parent
    for target in re.findall(r"\]\(([^)\s]+)\)", PAGES[page]):
        if target.startswith(("http://", "https://", "#")):
            continue
        assert (base / target.split("#")[0]).exists(), f"{page} links to {target}, which does not exist"


def test_the_readme_is_a_short_front_door_that_maps_every_docs_page():
    assert len(README.splitlines()) <= README_MAX_LINES
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", README))
    assert linked == set(DOCS), f"docs pages missing from the README's map: {sorted(set(DOCS) - linked)}"


def test_readme_commands_are_the_ones_that_run():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in README
    assert "```bash\nbash scripts/demo.sh\n```" in README
