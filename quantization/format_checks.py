"""What the number formats, grouped weights, KV-cache bits, GPTQ and QuaRot settings of a QuantConfig need and
refuse, checked once when the config is made (each error names the flags and the fix); names and ranges of the
single settings are QuantConfig's own checks."""

from __future__ import annotations

from .float_quantizers import FLOAT_ESTIMATORS, FORMAT_NAMES, INTEGER, NUMBER_FORMATS


def check_formats(config) -> None:
    """Raise ValueError for a senseless combination in the QuantConfig `config`."""
    for pattern, value in config.point_formats:
        if value not in FORMAT_NAMES:
            raise ValueError(f"--point_formats {pattern}={value}: unknown format; valid: {', '.join(FORMAT_NAMES)}.")
    if config.weight_granularity == "per_group" and config.llm_int8_threshold is not None:
        raise ValueError("--llm_int8 quantizes weights per output channel: drop --weight_granularity per_group.")
    by_rule = any(fmt != INTEGER for _, fmt in config.point_formats)
    if config.weight_format in NUMBER_FORMATS or by_rule:
        flag = f"--weight_format {config.weight_format}" if not by_rule else "--point_formats"
        if config.weight_granularity == "per_group" or config.llm_int8_threshold is not None:
            raise ValueError(
                f"{flag}: number formats have their own scales and do not combine with per_group weights or "
                "--llm_int8 (integer grids); use --weight_format int."
            )
        if config.weight_estimator not in FLOAT_ESTIMATORS:
            raise ValueError(f"{flag}: a float format scales by the maximum: use --ranges_weights minmax.")
        if config.gptq and not by_rule:
            raise ValueError(f"{flag} has its own scales: --gptq rounds onto integer grids; use --weight_format int.")
    if config.act_format in NUMBER_FORMATS or by_rule:
        flag = f"--act_format {config.act_format}" if not by_rule else "--point_formats"
        if config.act_granularity != "per_tensor" or config.token_clipping_points or config.llm_int8_threshold:
            raise ValueError(
                f"{flag}: number formats have their own scales and do not combine with per-token or PEG activations, "
                "token-wise clipping or --llm_int8; use --act_format int."
            )
        if config.n_bits_kv is not None and not by_rule:
            raise ValueError(f"--n_bits_kv sets integer bits; under {flag} the key / value points take that format.")
        if config.ranges_acts not in FLOAT_ESTIMATORS or config.percentile is not None:
            raise ValueError(
                f"{flag}: a float format scales by the maximum: use --ranges_acts running_minmax or current_minmax, "
                "without --percentile."
            )
    if config.quarot and config.transforms:
        raise ValueError(
            f"--quarot does not combine with the equivalent transforms ({', '.join(config.transforms)}): the rotation "
            "spreads the outliers they migrate; use one or the other."
        )
    if config.gptq:
        if not config.weight_quant or config.llm_int8_threshold is not None:
            raise ValueError("--gptq rounds quantized weights: drop --no_weight_quant and --llm_int8.")
        if config.gptq_block_size < 1 or not config.gptq_damping > 0:
            raise ValueError("--gptq_block_size must be positive and --gptq_damping above 0.")
