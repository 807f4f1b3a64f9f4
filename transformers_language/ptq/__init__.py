"""The post-training wing: the W8A8 flags, the quantized model (quantizers swapped in at the family's points),
the equivalent transforms, the validation-time calibration, and the recipes compared side by side."""
