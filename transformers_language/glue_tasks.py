"""The GLUE tasks, one table entry each: the hub's columns, where texts and labels sit in GLUE's TSV files, the
class names, and the task's figures (objectives/glue_metrics.py). Data (data/glue.py) and the objective
(objectives/sequence_classification.py) read it; keys are HF run_glue's task names."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

TASK_KEY = "glue_task"
"""The config.json key of a model fine-tuned on a GLUE task: the task's name (the GLUE family's config marker)."""


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its texts and labels (hub columns, and where they sit in its TSV files) and its metrics."""

    folder: str
    """Its folder in GLUE's data (and in ../shared/data/glue)."""
    text_columns: tuple[str, ...]
    """The hub's text columns: one sentence or a pair."""
    labels: tuple[str, ...] | None
    """Class names in the hub's label order; None: a regression score."""
    metrics: tuple[str, ...]
    """GLUE's figures for the task (evaluation/glue_metrics.py); the task's score is their mean."""
    tsv_texts: tuple[str | int, ...]
    """The text columns of its TSV files: header names, or positions in a file without a header."""
    tsv_label: str | int
    tsv_label_names: tuple[str, ...] | None = None
    """How the TSV writes each class (in `labels` order); None: as its index."""

    @property
    def has_header(self) -> bool:
        return isinstance(self.tsv_label, str)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


# Keyed by HF run_glue's task names.
GLUE_TASKS = {
    "cola": GlueTask("CoLA", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), (3,), 1),
    "sst2": GlueTask("SST-2", ("sentence",), ("negative", "positive"), ("accuracy",), ("sentence",), "label"),
    "mrpc": GlueTask(
        "MRPC",
        ("sentence1", "sentence2"),
        ("not_equivalent", "equivalent"),
        ("f1", "accuracy"),
        ("#1 String", "#2 String"),
        "Quality",
    ),
    "stsb": GlueTask(
        "STS-B", ("sentence1", "sentence2"), None, ("pearson", "spearmanr"), ("sentence1", "sentence2"), "score"
    ),
    "rte": GlueTask(
        "RTE",
        ("sentence1", "sentence2"),
        ("entailment", "not_entailment"),
        ("accuracy",),
        ("sentence1", "sentence2"),
        "label",
        ("entailment", "not_entailment"),
    ),
}


def get_task(name: str) -> GlueTask:
    if name not in GLUE_TASKS:
        raise UsageError(f"Unknown GLUE task {name!r}; valid tasks: {', '.join(GLUE_TASKS)}.")
    return GLUE_TASKS[name]
