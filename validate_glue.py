"""Evaluate a GLUE fine-tuned checkpoint: the task's GLUE figures, activation outliers, attention diagnostics, in
floating point or simulated W8A8 (--quantize).

accelerate launch validate_glue.py --help      (or: python validate_glue.py ...)
"""

from transformers_language.errors import run_cli
from transformers_language.jobs.validate import validate


def main(argv: list[str] | None = None) -> dict:
    return validate("glue", argv)


if __name__ == "__main__":
    run_cli(main)
