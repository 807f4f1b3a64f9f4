"""The resolved Plan: `--dry_run` prints the very plan a training run executes (compared with the plan a real
run on a tiny model records; validation: tests/test_validate.py), and every registry name is accepted while an
unknown one is refused with the list."""

import json
import re

import pytest

from tests.conftest import run_main, train_argv
from transformers_language import AttentionConfig
from transformers_language.data.block_layouts import BLOCK_LAYOUTS, get_block_layout
from transformers_language.families import FAMILIES, get_family
from transformers_language.models.gates import GATE_NETWORKS, GATE_TYPES
from transformers_language.models.softmax import SOFTMAX_VARIANTS, softmax_variant
from transformers_language.objectives import OBJECTIVES, get_objective

GATE = ["--attn_gate_type", "conditional_per_token"]
TRAINING_METHODS = {
    "bert": [[], ["--attn_softmax", "clipped(-0.025:1)"], [*GATE, "--attn_gate_mlp"]],
    "opt": [[], ["--alpha", "4"], [*GATE, "--attn_gate_init", "0.25"]],
}


def _json(values: dict) -> dict:
    return json.loads(json.dumps(values, default=str))


@pytest.mark.parametrize("method", range(3))
def test_the_dry_run_prints_the_plan_a_training_run_executes(model_type, method, tmp_path, data_cache, capsys):
    out = tmp_path / "run"
    argv = train_argv(model_type, out, data_cache, *TRAINING_METHODS[model_type][method], steps=1)
    capsys.readouterr()
    dry = run_main(model_type, [*argv, "--dry_run"])
    assert json.loads(capsys.readouterr().out) == _json(dry)  # printed = returned
    assert not out.exists() or not any(out.iterdir())  # a dry run writes nothing
    run_main(model_type, argv)
    executed = json.loads((out / "run_settings.json").read_text())
    assert executed["plan"] == _json(dry)
    assert executed["attention"] == dry["attention"] == dry["config"]["attention_variant"]
    assert executed["seq_length"] == dry["seq_length"] == 32


# Every registry: each name works where users give it, an unknown name is refused with the list.
def test_every_registry_name_is_accepted_and_an_unknown_one_is_refused():
    for name in SOFTMAX_VARIANTS:
        config = AttentionConfig(softmax=name, train_seq_length=8)
        assert softmax_variant(name).normaliser == name == config.normaliser
    with pytest.raises(ValueError, match="accepted forms: 'vanilla' or 'softmax1'"):
        softmax_variant("sparsemax")
    for gate_type in GATE_TYPES:
        assert AttentionConfig(gate_type=gate_type).gated == (gate_type != "none")
    for network in GATE_NETWORKS:
        assert AttentionConfig(gate_type="conditional_per_token", gate_network=network).gate_network == network
    for registry, build, unknown, listing in (
        (GATE_TYPES, lambda n: AttentionConfig(gate_type=n), "per_token", "valid gate types: " + ", ".join(GATE_TYPES)),
        (
            GATE_NETWORKS,
            lambda n: AttentionConfig(gate_type="conditional_per_token", gate_network=n),
            "conv",
            "valid gate networks: " + ", ".join(GATE_NETWORKS),
        ),
        (FAMILIES, get_family, "gpt2", "valid model types: " + ", ".join(FAMILIES)),
        (OBJECTIVES, get_objective, "seq2seq", "valid objectives: " + ", ".join(OBJECTIVES)),
        (BLOCK_LAYOUTS, get_block_layout, "packed", "valid layouts: " + ", ".join(BLOCK_LAYOUTS)),
    ):
        for name in registry:
            build(name)
        with pytest.raises(ValueError, match=re.escape(listing)):
            build(unknown)


def test_quantization_registries():
    from quantization.calibration import CALIBRATION_INPUTS
    from quantization.config import ACT_METHODS, QUANT_PRESETS, QuantConfig
    from quantization.estimators import ESTIMATORS, PERCENTILE_INTERPOLATIONS

    for values in (
        *({"quant_setup": name} for name in QUANT_PRESETS),
        *({"qmethod_acts": name} for name in ACT_METHODS),
        *({"ranges_acts": name} for name in ESTIMATORS),
        *({"calibration_inputs": name} for name in CALIBRATION_INPUTS),
        *({"percentile": 99.9, "percentile_interpolation": name} for name in PERCENTILE_INTERPOLATIONS),
    ):
        QuantConfig(**values)
    for values, listing in (
        ({"quant_setup": "int4"}, "valid presets: " + ", ".join(QUANT_PRESETS)),
        ({"qmethod_acts": "log2"}, "valid methods: " + ", ".join(ACT_METHODS)),
        ({"ranges_acts": "KL"}, "valid estimators: " + ", ".join(ESTIMATORS)),
        ({"calibration_inputs": "both"}, "valid: " + ", ".join(CALIBRATION_INPUTS)),
        ({"percentile_interpolation": "cubic"}, "valid: " + ", ".join(PERCENTILE_INTERPOLATIONS)),
    ):
        with pytest.raises(ValueError, match=re.escape(listing)):
            QuantConfig(**values)
