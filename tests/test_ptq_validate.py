"""The post-training methods through validate_*.py: every method at W8A8, W6A6, W4A8 and W6A8 end to end with
its settings and figures in all_results.json, the point list, and one clear error per senseless combination."""

import json
import math

import pytest

from tests.test_validate import CALIBRATION_DATA, REPO, checkpoints, run_validate, validate_argv  # noqa: F401
from transformers_language.quant_args import BIT_SETTINGS, PTQ_METHODS

METHODS = {name: list(flags) for name, flags in PTQ_METHODS.items()}
BITS = {name: (str(n_bits), str(n_bits_act)) for name, (n_bits, n_bits_act) in BIT_SETTINGS.items()}


def _quantized(model_type, checkpoints, tmp_path, data_cache, *flags):  # noqa: F811
    extra = ["--quantize", "--est_num_batches", "2", *CALIBRATION_DATA, *flags]
    out = tmp_path / "val"
    returned = run_validate(model_type, validate_argv(model_type, checkpoints[model_type], out, data_cache, *extra))
    return returned, json.loads((out / "all_results.json").read_text())


@pytest.mark.parametrize("bits", sorted(BITS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_end_to_end_and_records_its_settings(
    model_type,
    method,
    bits,
    checkpoints,  # noqa: F811
    tmp_path,
    data_cache,
):
    n_bits, n_bits_act = BITS[bits]
    returned, results = _quantized(
        model_type, checkpoints, tmp_path, data_cache, "--n_bits", n_bits, "--n_bits_act", n_bits_act, *METHODS[method]
    )
    assert math.isfinite(returned["perplexity"]) and returned["perplexity"] > 1
    setup = results["settings"]["quantization"]
    assert (setup["n_bits"], setup["n_bits_act"]) == (int(n_bits), int(n_bits_act))
    points = setup["points"]
    granularity = {
        "per_tensor": ("per_tensor", "per_tensor"),
        "per_channel": ("per_channel", "per_tensor"),
        "per_token": ("per_channel", "per_token"),
    }
    if method in granularity:
        weights, acts = granularity[method]
        assert f"activation {n_bits_act} bits {acts}" in points
        assert any(key.startswith(f"weight {n_bits} bits {weights}") for key in points)
    if method == "peg":
        assert setup["act_granularity"] == "per_embedding_group" and setup["peg_permute"] is True
        assert points[f"activation {n_bits_act} bits per_embedding_group(K=6, permuted)"] == 3 * 2  # 3 per layer
        assert len(setup["peg_points"]) == 3
    if method == "mp_ptq":
        assert points["activation 16 bits per_tensor"] == 3 * 2
        assert all(bits == 16 for _, bits in setup["point_bits"])
    if method == "llm_int8":
        assert setup["llm_int8_threshold"] == 6.0
        shares = returned["llm_int8_float_channel_share"]
        assert shares and all(0 <= share <= 1 for share in shares.values())
        assert returned["llm_int8_mean_float_channel_share"] == pytest.approx(sum(shares.values()) / len(shares))
        assert set(points) == {f"activation {n_bits_act} bits per_token", f"weight {n_bits} bits per_channel"}
    else:
        assert "llm_int8_float_channel_share" not in returned


def test_fewer_bits_lose_more(checkpoints, tmp_path, data_cache):  # noqa: F811
    fp = run_validate("opt", validate_argv("opt", checkpoints["opt"], tmp_path / "fp", data_cache))["perplexity"]
    gaps = {}
    for name, (n_bits, n_bits_act) in BITS.items():
        low, _ = _quantized(
            "opt", checkpoints, tmp_path / name, data_cache, "--n_bits", n_bits, "--n_bits_act", n_bits_act
        )
        assert math.isfinite(low["perplexity"])
        gaps[name] = abs(low["perplexity"] - fp)
    assert gaps["W4A8"] > gaps["W8A8"] and gaps["W6A6"] > gaps["W8A8"]


def test_list_quant_points_prints_every_point_with_its_bits(checkpoints, tmp_path, data_cache, capsys):  # noqa: F811
    argv = validate_argv("opt", checkpoints["opt"], tmp_path / "val", data_cache, "--list_quant_points")
    argv[argv.index("--validation_file") + 1] = str(tmp_path / "missing.txt")  # listing reads no data
    listed = run_validate("opt", [*argv, "--point_bits", "**.fc2.output=16", "--weight_granularity", "per_channel"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(listed["points"]) > 0
    names = [line.split()[0] for line in lines]
    for expected in (
        "model.decoder.layers.0.input",
        "model.decoder.layers.1.ffn_residual_sum",
        "model.decoder.layers.0.self_attn.attention_variant.probs",
        "model.decoder.layers.1.fc2.output",
        "model.decoder.layers.1.fc1.weight",
    ):
        assert expected in names
    fc2 = next(line for line in lines if line.startswith("model.decoder.layers.1.fc2.output "))
    assert "16 bits" in fc2
    assert "per_channel" in next(line for line in lines if line.startswith("model.decoder.layers.1.fc1.weight "))
    assert not (tmp_path / "val" / "all_results.json").exists()  # nothing ran


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--peg_groups", "4"], r"--peg_groups configure PEG: add --act_granularity per_embedding_group"),
        (["--peg_permute", "--act_granularity", "per_token"], r"--peg_permute configure PEG"),
        (["--llm_int8_threshold", "4"], r"--llm_int8_threshold sets the LLM.int8\(\) threshold: add --llm_int8"),
        (["--llm_int8", "--act_granularity", "per_token"], r"--act_granularity do not apply with --llm_int8"),
        (["--llm_int8", "--llm_int8_threshold", "-1"], r"--llm_int8_threshold must be >= 0"),
        (["--llm_int8", "--quant_setup", "fp32_head+int16_all_LN"], r"--llm_int8 quantizes only the Linears"),
        (["--act_granularity", "per_token", "--ranges_acts", "MSE"], r"--ranges_acts do not apply with --act_gr"),
        (["--no_act_quant", "--act_granularity", "per_token"], r"which --no_act_quant turns off"),
        (["--no_weight_quant", "--weight_granularity", "per_channel"], r"which --no_weight_quant turns off"),
        (["--point_bits", "fc2=16=3"], r"--point_bits 'fc2=16=3': write POINT=BITS"),
        (["--point_bits", "**.fc3.output=16"], r"--point_bits '\*\*\.fc3\.output' matches no quantization point"),
        (["--point_bits", "**.fc2.output=1"], r"--point_bits \*\*\.fc2\.output=1: Bit width 1 is out of range"),
        (
            ["--act_granularity", "per_embedding_group", "--peg_points", "**.probs"],
            r"self_attn\.attention_variant\.probs has no embedding channels to group",
        ),
        (
            ["--act_granularity", "per_embedding_group", "--peg_groups", "33", "--peg_points", "**.fc2.output"],
            r"--peg_groups 33 exceeds the 32 channels of model\.decoder\.layers\.0\.fc2\.output",
        ),
        (["--act_granularity", "per_embedding_group", "--peg_groups", "0"], r"--peg_groups must be positive"),
    ],
)
def test_each_senseless_combination_is_one_clear_error(flags, message, checkpoints, tmp_path, data_cache):  # noqa: F811
    argv = validate_argv("opt", checkpoints["opt"], tmp_path / "val", data_cache, "--quantize", *CALIBRATION_DATA)
    with pytest.raises(ValueError, match=message):
        run_validate("opt", [*argv, *flags])


def test_the_ptq_table_script_writes_one_row_per_method_and_bit_setting(checkpoints, tmp_path, data_cache):  # noqa: F811
    import importlib.util

    spec = importlib.util.spec_from_file_location("ptq_table", REPO / "scripts" / "ptq_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "table"
    # The script passes the checkpoint and each run's output folder itself.
    passed = [*validate_argv("bert", checkpoints["bert"], tmp_path / "unused", data_cache)[2:-2], *CALIBRATION_DATA]
    argv = ["--model_name_or_path", str(checkpoints["bert"]), "--output_dir", str(out), "--bits", "W8A8", "W4A8"]
    rows = module.main([*argv, "--methods", "per_tensor", "llm_int8", "--", *passed, "--est_num_batches", "2"])
    assert [(r["bits"], r["method"]) for r in rows] == [
        ("FP", "fp"),
        ("W8A8", "per_tensor"),
        ("W8A8", "llm_int8"),
        ("W4A8", "per_tensor"),
        ("W4A8", "llm_int8"),
    ]
    written = json.loads((out / "ptq_table.json").read_text())["rows"]
    assert written == json.loads(json.dumps(rows)) and rows[0]["gap"] == 0
    for row in rows[1:]:
        results = json.loads((out / row["bits"] / row["method"] / "all_results.json").read_text())
        assert results["perplexity"] == row["perplexity"]
        assert row["gap"] == pytest.approx(row["perplexity"] - rows[0]["perplexity"])
        assert results["settings"]["quantization"]["n_bits"] == int(row["bits"][1])
    assert "llm_int8_mean_float_channel_share" in rows[2]
    markdown = (out / "ptq_table.md").read_text().splitlines()
    assert len(markdown) == 2 + len(rows) and markdown[3].startswith("| W8A8 | per_tensor |")
