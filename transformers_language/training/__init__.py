"""The training wing: the loop (accumulation, clipping, the non-finite guard), optimizers and schedules,
checkpoints and exact resume, and what a run logs while it trains."""
