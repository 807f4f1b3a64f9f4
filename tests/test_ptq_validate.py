"""The post-training methods through validate_*.py: every method end to end (the 2021-23 ones at W8A8 and W4A8, the
2024-26 ones at their settings) with its settings and figures in all_results.json, the point list, the comparison
script, and one clear error per senseless combination."""

import json
import math
import statistics
import sys

import pytest

from tests.test_validate import (  # noqa: F401
    CALIBRATION_DATA,
    REPO,
    checkpoints,
    copy_files,
    run_validate,
    validate_argv,
)
from transformers_language.errors import UsageError
from transformers_language.jobs.validate import validate
from transformers_language.ptq.recipes import BIT_SETTINGS, PTQ_METHODS

# The integer-grid recipes of 2021-23 at the integer settings (every pair); the 2024-26 recipes at theirs.
RECIPES_2024 = ("rtn", "gptq", "quarot", "quarot_gptq", "fp8", "mxfp4")
METHODS = {name: list(method.flags) for name, method in PTQ_METHODS.items() if name not in RECIPES_2024}
INTEGER_SETTINGS = ("W8A8", "W6A8", "W6A6", "W4A8")
BITS = {name: tuple(str(b) for b in BIT_SETTINGS[name][:2]) for name in INTEGER_SETTINGS}


def _quantized(model_type, checkpoints, tmp_path, data_cache, *flags):  # noqa: F811
    extra = ["--quantize", "--est_num_batches", "2", *CALIBRATION_DATA, *flags]
    out = tmp_path / "val"
    returned = run_validate(model_type, validate_argv(model_type, checkpoints[model_type], out, data_cache, *extra))
    return returned, json.loads((out / "all_results.json").read_text())


@pytest.mark.parametrize("bits", ["W8A8", "W4A8"])  # the bit widths pass through; test_fewer_bits_lose_more has all
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


@pytest.mark.parametrize(
    "recipe, bits",
    [
        ("rtn", "W4A4KV4"),
        ("gptq", "W4A4KV4"),
        ("gptq", "W4A16"),
        ("quarot", "W4A4KV4"),
        ("quarot_gptq", "W4A4KV4"),
        ("fp8", "W8A8"),
        ("mxfp4", "W4A4KV4"),
    ],
)
def test_the_2024_recipes_run_end_to_end_at_their_settings(
    model_type,
    recipe,
    bits,
    checkpoints,  # noqa: F811
    tmp_path,
    data_cache,
):
    method, setting = PTQ_METHODS[recipe], BIT_SETTINGS[bits]
    assert method.fits(setting)
    flags = method.validate_flags(setting)[1:]
    if recipe.startswith("quarot") and model_type == "bert":
        with pytest.raises(UsageError, match="--quarot rotates the residual stream of a pre-norm model"):
            _quantized(model_type, checkpoints, tmp_path, data_cache, *flags)
        return
    returned, results = _quantized(model_type, checkpoints, tmp_path, data_cache, *flags)
    assert math.isfinite(returned["perplexity"]) and returned["perplexity"] > 1
    setup = results["settings"]["quantization"]
    points = setup["points"]
    kv_points = 2 * 2  # keys and values of 2 layers
    if recipe in ("rtn", "gptq") and setting.acts is not None:
        assert setup["n_bits_kv"] == 4
        assert points["activation 4 bits per_token"] > kv_points  # the KV points among them
        assert setup["qmethod_acts"] == "symmetric_uniform"
    if recipe.startswith("quarot"):
        assert results["rotation"] == {"seed": 0, "hidden": 32, "ffn": 64, "head": 8, "values_rotated": True}
    if recipe.endswith("gptq"):
        gptq = results["gptq"]
        assert gptq["linears"] == 2 * 6  # query / key / value / output, FFN in and out, per layer
        assert gptq["median_error_vs_rtn"] < 1.0  # GPTQ lowers the layer-wise output error
        if setting.acts is None:
            assert not any(key.startswith("activation") for key in points)
    if recipe == "fp8":
        assert points["weight 8 bits fp8_e4m3 per_channel"] > 0 and points["activation 8 bits fp8_e4m3 per_tensor"] > 0
    if recipe == "mxfp4":
        assert set(points) == {"weight 4 bits mxfp4 per_block(32)", "activation 4 bits mxfp4 per_block(32)"}


def test_a_rotated_checkpoint_evaluates_as_the_float_one(checkpoints, tmp_path, data_cache):  # noqa: F811
    """QuaRot's rotations of a saved OPT checkpoint, reloaded by validate_clm, with nothing quantized: the
    perplexity of the float model."""
    fp = run_validate("opt", validate_argv("opt", checkpoints["opt"], tmp_path / "fp", data_cache))["perplexity"]
    rotated, results = _quantized(
        "opt",
        checkpoints,
        tmp_path,
        data_cache,
        "--quarot",
        "--rotation_seed",
        "5",
        "--no_weight_quant",
        "--no_act_quant",
    )
    assert results["rotation"]["seed"] == 5
    assert rotated["perplexity"] == pytest.approx(fp, rel=1e-5)


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
    rules = ["--point_bits", "**.fc2.output=16", "--point_formats", "**.0.fc1.output=fp8_e4m3"]
    listed = run_validate("opt", [*argv, *rules, "--weight_granularity", "per_channel"])
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
    fc1 = next(line for line in lines if line.startswith("model.decoder.layers.0.fc1.output "))
    assert "8 bits  fp8_e4m3" in fc1  # --point_formats: that point alone in FP8
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
        (["--smoothquant_alpha", "0.7"], r"--smoothquant_alpha configures --smoothquant: add --smoothquant"),
        (["--smoothquant", "--smoothquant_alpha", "1.5"], r"--smoothquant_alpha lies in \[0, 1\]"),
        (["--os_plus_grid", "5"], r"--os_plus_grid configures --os_plus"),
        (["--os_plus", "--os_plus_grid", "0"], r"--os_plus_grid must be positive"),
        (["--token_clipping_fine_steps", "5"], r"--token_clipping_fine_steps configures --token_clipping"),
        (["--token_clipping", "--token_clipping_quantiles", "0.3"], r"each lies in \(0.5, 1\]"),
        (["--token_clipping", "--act_granularity", "per_token"], r"does not combine with per-token"),
        (["--token_clipping", "--llm_int8"], r"does not combine with per-token \(dynamic\) activations or --llm_int8"),
        (["--token_clipping", "--token_clipping_points", "**.fc2.weight"], r"'\*\*\.fc2\.weight' matches no activ"),
        (["--no_act_quant", "--token_clipping"], r"--token_clipping sets activation ranges"),
        (["--weight_format", "fp8_e4m3", "--gptq"], r"fp8_e4m3 has its own scales: --gptq rounds onto integer"),
        (
            ["--act_format", "mxfp4", "--act_granularity", "per_token"],
            r"--act_format mxfp4: number formats have their own",
        ),
        (["--act_format", "fp8_e4m3", "--ranges_acts", "MSE"], r"fp8_e4m3: a float format scales by the maximum"),
        (["--act_format", "mxfp4", "--n_bits_kv", "4"], r"--n_bits_kv sets integer bits"),
        (["--n_bits_kv", "1"], r"--n_bits_kv 1: Bit width 1 is out of range"),
        (["--gptq_act_order"], r"--gptq_act_order configures --gptq: add --gptq"),
        (["--gptq", "--no_weight_quant"], r"--gptq configure weight quantization, which --no_weight_quant"),
        (["--weight_group_size", "16"], r"--weight_group_size sizes per_group weights"),
        (["--weight_granularity", "per_group", "--weight_group_size", "24"], r"groups of 24 do not divide the 32"),
        (["--point_formats", "**.fc2.output"], r"--point_formats '\*\*\.fc2\.output': write POINT=FORMAT"),
        (["--point_formats", "**.fc2.output=fp9"], r"--point_formats \*\*\.fc2\.output=fp9: unknown format"),
        (["--point_formats", "**.fc3.output=mxfp4"], r"--point_formats '\*\*\.fc3\.output' matches no quantization"),
    ],
)
def test_each_senseless_combination_is_one_clear_error(flags, message, checkpoints, tmp_path, data_cache):  # noqa: F811
    argv = validate_argv("opt", checkpoints["opt"], tmp_path / "val", data_cache, "--quantize", *CALIBRATION_DATA)
    with pytest.raises(ValueError, match=message):
        run_validate("opt", [*argv, *flags])


def _compare_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_quantization", REPO / "scripts" / "compare_quantization.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def _compare(checkpoint_list, out, tmp_path, data_cache, *flags):
    # The script passes each checkpoint and each run's output folder itself.
    # (--reduced chooses the share of the validation text itself.)
    passed = validate_argv("opt", checkpoint_list[0], tmp_path / "unused", data_cache)[2:-2]
    share = passed.index("--validation_percentage")
    passed = [*passed[:share], *passed[share + 2 :], *CALIBRATION_DATA]
    paths = [str(c) for c in checkpoint_list]
    return _compare_module().main([*paths, "--output_dir", str(out), "--reduced", *flags, "--", *passed])


def test_compare_quantization_writes_every_recipe_and_bit_width(checkpoints, tmp_path, data_cache):  # noqa: F811
    out = tmp_path / "compare"
    bit_widths = ["W4A4KV4"]  # every recipe but FP8 fits it (FP8 runs through validate_clm in the 2024 test)
    rows = _compare([checkpoints["opt"]], out, tmp_path, data_cache, "--draws", "1", "--bits", *bit_widths)
    name = checkpoints["opt"].name
    fitting = [(bits, r) for bits in bit_widths for r, method in PTQ_METHODS.items() if method.fits(BIT_SETTINGS[bits])]
    assert [recipe for _, recipe in fitting] == [r for r in PTQ_METHODS if r != "fp8"]
    expected = [(name, "FP", "fp")] + [(name, bits, recipe) for bits, recipe in fitting]
    assert [(r["checkpoint"], r["bits"], r["recipe"]) for r in rows] == expected
    written = json.loads((out / "comparison.json").read_text())
    assert written["rows"] == json.loads(json.dumps(rows)) and written["reduced"] is True
    assert written["figure"] == "perplexity" and written["higher_is_better"] is False
    fp = rows[0]["value"]
    for row in rows:
        folder = out / name / row["bits"] / row["recipe"] / ("" if row["bits"] == "FP" else "draw_0")
        results = json.loads((folder / "all_results.json").read_text())
        assert results["perplexity"] == row["value"] == row["draws"][0] and math.isfinite(row["value"])
        assert row["gap"] == pytest.approx(100 * (row["value"] - fp) / fp) and row["spread"] is None
        if row["bits"] != "FP":
            setup = results["settings"]["quantization"]
            assert (setup["n_bits"], setup["n_bits_act"]) == BIT_SETTINGS[row["bits"]][:2]
            assert setup["n_bits_kv"] == (4 if row["bits"] == "W4A4KV4" and row["recipe"] != "mxfp4" else None)
            assert setup["calibration_sequences"] == 16  # --reduced: 2 batches of 8
            assert setup["calibration_seed"] == 0
    by_run = {(r["bits"], r["recipe"]): r for r in rows}
    assert by_run[("W4A4KV4", "os")]["token_clipping_quantile"] <= 1.0
    assert "os_plus_scaled_channels" in by_run[("W4A4KV4", "os_plus")]
    assert "llm_int8_float_channel_share" in by_run[("W4A4KV4", "llm_int8")]
    markdown = (out / "comparison.md").read_text().splitlines()
    assert markdown[0] == f"| bits | recipe | {name} |"
    assert len(markdown) == 2 + 1 + len(fitting)
    assert {line.split(" | ")[1] for line in markdown[3:]} == {PTQ_METHODS[recipe].label for _, recipe in fitting}
    assert (out / "comparison.png").stat().st_size > 10_000


def test_compare_quantization_shows_the_spread_over_calibration_draws(checkpoints, tmp_path, data_cache):  # noqa: F811
    out = tmp_path / "compare"
    flags = ("--bits", "W4A8", "--recipes", "per_tensor", "per_token")
    rows = _compare([checkpoints["opt"]], out, tmp_path, data_cache, *flags)
    quantized = rows[1]
    draws = [
        json.loads(
            (out / checkpoints["opt"].name / "W4A8" / "per_tensor" / f"draw_{k}" / "all_results.json").read_text()
        )
        for k in range(3)
    ]
    assert [d["settings"]["quantization"]["calibration_seed"] for d in draws] == [0, 1, 2]
    values = [d["perplexity"] for d in draws]
    assert quantized["draws"] == values and len(set(values)) > 1  # other calibration batches, other ranges
    assert quantized["value"] == pytest.approx(statistics.mean(values))
    assert quantized["spread"] == pytest.approx(statistics.stdev(values))
    markdown = (out / "comparison.md").read_text()
    cell = markdown.splitlines()[3].split(" | ")[2]
    assert f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" in cell
    # Per-token ranges on round-to-nearest weights read nothing of the sample: one run, no spread, and another
    # calibration seed gives that very model.
    dynamic = rows[2]
    assert dynamic["recipe"] == "per_token" and dynamic["spread"] is None and len(dynamic["draws"]) == 1
    folder = out / checkpoints["opt"].name / "W4A8" / "per_token"
    assert sorted(path.name for path in folder.iterdir()) == ["draw_0"]
    first = json.loads((folder / "draw_0" / "all_results.json").read_text())
    assert first["reads_calibration_sample"] is False and draws[0]["reads_calibration_sample"] is True
    assert "without ± is of a recipe that read no calibration sample" in markdown
    argv = json.loads((folder / "draw_0" / "compare_run.json").read_text())["argv"]
    seed = argv.index("--calibration_seed")
    argv[seed + 1], argv[argv.index("--output_dir") + 1] = "1", str(tmp_path / "seed_1")
    again = validate("clm", argv)
    assert again["perplexity"] == first["perplexity"] == dynamic["value"]


def test_compare_quantization_puts_several_checkpoints_side_by_side(checkpoints, tmp_path, data_cache, monkeypatch):  # noqa: F811
    twin = copy_files(checkpoints["opt"], tmp_path / "twin")  # the same model must give the same numbers
    out = tmp_path / "compare"
    flags = ("--bits", "W6A6", "--recipes", "os_plus", "per_tensor", "--draws", "1")
    rows = _compare([checkpoints["opt"], twin], out, tmp_path, data_cache, *flags)
    first = checkpoints["opt"].name
    assert [(r["checkpoint"], r["recipe"]) for r in rows] == [
        (first, "fp"),
        ("twin", "fp"),
        (first, "os_plus"),
        (first, "per_tensor"),
        ("twin", "os_plus"),
        ("twin", "per_tensor"),
    ]
    assert [r["value"] for r in rows if r["checkpoint"] == first] == [
        r["value"] for r in rows if r["checkpoint"] == "twin"
    ]
    markdown = (out / "comparison.md").read_text().splitlines()
    assert markdown[0] == f"| bits | recipe | {first} | twin |"
    cells = markdown[3].split(" | ")  # W6A6 OS+: one cell per checkpoint, equal
    assert cells[1] == "OS+" and cells[2] == cells[3].rstrip(" |")

    # --resume reads every finished run back instead of repeating it; a changed checkpoint is run again.
    import transformers_language.jobs.validate

    calls = []
    results = json.loads((out / first / "FP" / "fp" / "all_results.json").read_text())
    monkeypatch.setattr(transformers_language.jobs.validate, "validate", lambda *a, **k: calls.append(a) or results)
    resumed = _compare([checkpoints["opt"], twin], out, tmp_path, data_cache, *flags, "--resume")
    assert [r["value"] for r in resumed] == [r["value"] for r in rows] and not calls
    (twin / "config.json").write_text((twin / "config.json").read_text() + "\n")
    _compare([checkpoints["opt"], twin], out, tmp_path, data_cache, *flags, "--resume")
    assert [call[1][1] for call in calls] == [str(twin)] * 3


def test_compare_quantization_puts_opt_and_llama_in_one_table(checkpoints, tmp_path, data_cache):  # noqa: F811
    """OPT and Llama share the causal-LM figure: one table, each through its own validation script; OS+ is not
    run on Llama (no biases for its shift) and its cell says so."""
    from tests.conftest import run_main, train_argv

    llama = tmp_path / "llama"
    run_main("llama", train_argv("llama", llama, data_cache, "--attn_softmax", "softmax1", steps=2))
    out = tmp_path / "compare"
    flags = ("--bits", "W8A8", "--recipes", "os_plus", "smoothquant", "--draws", "1")
    rows = _compare([checkpoints["opt"], llama], out, tmp_path, data_cache, *flags)
    opt = checkpoints["opt"].name
    assert [(r["checkpoint"], r["recipe"]) for r in rows] == [
        (opt, "fp"), ("llama", "fp"), (opt, "os_plus"), (opt, "smoothquant"), ("llama", "smoothquant")
    ]  # fmt: skip
    results = json.loads((out / "llama" / "W8A8" / "smoothquant" / "draw_0" / "all_results.json").read_text())
    assert results["settings"]["script"] == "validate_llama.py" and "max_ffn_product_inf_norm" in results
    assert all(math.isfinite(r["value"]) for r in rows)
    os_plus = next(line for line in (out / "comparison.md").read_text().splitlines() if "| OS+ |" in line)
    assert os_plus.endswith("| n/a |")


def test_compare_quantization_refuses_checkpoints_of_two_families(checkpoints, tmp_path):  # noqa: F811
    module = _compare_module()
    with pytest.raises(ValueError, match="one objective"):
        module.main([str(checkpoints["opt"]), str(checkpoints["bert"]), "--output_dir", str(tmp_path / "out")])


def test_transforms_and_token_clipping_record_what_they_chose(checkpoints, tmp_path, data_cache):  # noqa: F811
    """Every transform with token-wise clipping's two stages on one point pattern, through validate_clm.py."""
    flags = ["--gamma_migration", "--smoothquant", "--smoothquant_alpha", "0.6", "--os_plus", "--os_plus_grid", "4"]
    flags += ["--token_clipping", "--token_clipping_points", "**.fc2.output", "**.scores"]
    flags += ["--token_clipping_quantiles", "1.0", "0.99", "--token_clipping_fine_steps", "3"]
    returned, results = _quantized("opt", checkpoints, tmp_path, data_cache, "--n_bits_act", "6", *flags)
    assert math.isfinite(returned["perplexity"])
    setup = results["settings"]["quantization"]
    assert setup["transforms"] == ["gamma_migration", "smoothquant", "os_plus"] and setup["smoothquant_alpha"] == 0.6
    assert setup["token_clipping_points"] == ["**.fc2.output", "**.scores"] and setup["token_clipping_fine_steps"] == 3
    transforms = results["equivalent_transforms"]
    sites = [
        f"model.decoder.layers.{i}.{norm}" for i in range(2) for norm in ("self_attn_layer_norm", "final_layer_norm")
    ]
    assert sorted(transforms) == ["gamma_migration", "os_plus", "smoothquant"]
    assert all(sorted(transforms[name]) == sorted(sites) for name in transforms)
    assert all(len(site["errors"]) == 4 for site in transforms["os_plus"].values())
    clipping = results["token_clipping"]
    searched = set(clipping["loss_by_quantile"])  # the grid, widened below 0.99 while the loss fell
    assert clipping["quantizers"] == 2 * 2 and {"1.0", "0.99"} <= searched and str(clipping["quantile"]) in searched
    assert clipping["fine_steps"] == 3 and math.isfinite(clipping["fine_loss"])
