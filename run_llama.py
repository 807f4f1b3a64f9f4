"""Pre-train a Llama-style decoder (pre-RMSNorm, SwiGLU, RoPE, grouped-query attention) with causal-LM loss and an
attention variant.

accelerate launch run_llama.py --help      (or: python run_llama.py ...)
"""

from transformers_language.errors import run_cli
from transformers_language.jobs.pretrain import pretrain


def main(argv: list[str] | None = None) -> dict:
    return pretrain("clm", argv, family_name="llama")


if __name__ == "__main__":
    run_cli(main)
