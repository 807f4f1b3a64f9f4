"""Method strings, value ranges, flag contradictions and the config.json round trip of the settings."""

import pytest

from transformers_language import AttentionConfig, add_attention_args, attention_config_from_args
from transformers_language.arguments import FlagParser
from transformers_language.models.attention_config import CONFIG_KEY
from transformers_language.models.softmax import softmax_variant

from .conftest import tiny_config


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("vanilla", (0.0, 1.0)),
        ("clipped(-.025:1)", (-0.025, 1.0)),
        ("clipped(0:1.003)", (0.0, 1.003)),
        ("clipped(-0.03:1.03)", (-0.03, 1.03)),
        ("clipped( -1e-2 : 1.5 )", (-0.01, 1.5)),
        ("clipped(-0.0234375:1)", (-0.0234375, 1.0)),
        ("softmax1", (0.0, 1.0)),
        ("clipped_softmax1(-.1:1.2)", (-0.1, 1.2)),
        ("clipped_sink(-0.05:1)", (-0.05, 1.0)),
    ],
)
def test_softmax_forms_accept_any_decimals(method, expected):
    config = AttentionConfig(softmax=method)
    assert (config.gamma, config.zeta) == pytest.approx(expected)


@pytest.mark.parametrize(
    "method", ["softmax", "clipped(-0.1)", "clipped(a:b)", "clip(-0.1:1)", "clipped[-0.1:1]", "", "softmax1(-0.1:1)"]
)
def test_unknown_softmax_method_lists_accepted_forms(method):
    with pytest.raises(ValueError, match=r"accepted forms: 'vanilla' or 'softmax1' .* 'clipped\(GAMMA:ZETA\)'"):
        softmax_variant(method)


@pytest.mark.parametrize("method", ["clipped_softpick(-0.1:1)", "clipped_sigmoid(-0.1:1)", "clipped_vanilla(-0.1:1)"])
def test_only_clippable_normalisers_clip(method):
    with pytest.raises(ValueError, match="not clippable; clippable: vanilla, softmax1, sink"):
        softmax_variant(method)


def test_sigmoid_needs_the_training_length_and_the_flags_give_it():
    with pytest.raises(ValueError, match="sigmoid needs the training sequence length"):
        AttentionConfig(softmax="sigmoid")
    config = parse(["--attn_softmax", "sigmoid"], train_seq_length=64)
    assert config.train_seq_length == 64 and config.normaliser == "sigmoid" and not config.plain_softmax
    vanilla = parse([], train_seq_length=64)
    assert vanilla.train_seq_length is None  # only what reads it stores it


def test_output_gates_keep_their_own_network_and_init():
    for gate_type in ("headwise", "elementwise"):
        with pytest.raises(ValueError, match="does not use"):
            AttentionConfig(gate_type=gate_type, init_prob=0.25)
        with pytest.raises(ValueError, match="does not use"):
            AttentionConfig(gate_type=gate_type, fine_tuning=True)
        with pytest.raises(ValueError, match="needs a conditional gate type that takes a network"):
            AttentionConfig(gate_type=gate_type, gate_network="mlp")
    with pytest.raises(ValueError, match="has its own network"):
        parse(["--attn_gate_type", "headwise", "--attn_gate_mlp"], None)
    config = parse(["--attn_gate_type", "elementwise", "--attn_bias_kv"], None)
    assert config.gate_type == "elementwise" and config.bias_kv and config.plain_softmax


@pytest.mark.parametrize(("method", "word"), [("clipped(0.1:1)", "gamma <= 0"), ("clipped(-0.1:0.9)", "zeta >= 1")])
def test_out_of_range_gamma_zeta(method, word):
    with pytest.raises(ValueError, match=word):
        AttentionConfig(softmax=method)


def test_alpha_form_fixes_gamma_from_train_length():
    config = AttentionConfig(alpha=3.2, train_seq_length=128)
    assert config.gamma == pytest.approx(-0.025) and config.zeta == 1.0 and config.clipped
    with pytest.raises(ValueError, match="training sequence length"):
        AttentionConfig(alpha=3.2)
    with pytest.raises(ValueError, match="must be an unclipped clippable one"):
        AttentionConfig(alpha=3.2, train_seq_length=128, softmax="clipped(-0.1:1)")
    with pytest.raises(ValueError, match="must be an unclipped clippable one"):
        AttentionConfig(alpha=3.2, train_seq_length=128, softmax="clipped(0:1)")
    with pytest.raises(ValueError, match="must be an unclipped clippable one"):
        AttentionConfig(alpha=3.2, train_seq_length=128, softmax="softpick")
    softmax1 = AttentionConfig(alpha=3.2, train_seq_length=128, softmax="softmax1")  # clipped softmax1
    assert softmax1.clipped and softmax1.normaliser == "softmax1" and softmax1.gamma == pytest.approx(-0.025)
    with pytest.raises(ValueError, match=">= 0"):
        AttentionConfig(alpha=-1.0, train_seq_length=128)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"gate_type": "per_token"}, "valid gate types: none, unconditional_per_head"),
        ({"gate_type": "conditional_per_token", "gate_network": "conv"}, "valid gate networks: linear, mlp"),
        ({"gate_type": "conditional_per_token", "init_prob": 1.0}, "strictly between 0 and 1"),
        ({"gate_network": "mlp"}, "needs a conditional gate type"),
        ({"gate_type": "unconditional_per_head", "gate_network": "mlp2"}, "needs a conditional gate type"),
        ({"fine_tuning": True}, "gate_type='none'"),
        ({"skip_attn": True, "gate_type": "conditional_per_token"}, "cannot be combined"),
    ],
)
def test_invalid_settings(values, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(**values)


def test_settings_live_in_config_json(tmp_path):
    settings = AttentionConfig(softmax="clipped(-0.025:1)", gate_type="conditional_per_token", init_prob=0.25)
    config = settings.apply_to(tiny_config("bert"))
    config.save_pretrained(tmp_path)
    reloaded = type(config).from_pretrained(tmp_path)
    assert getattr(reloaded, CONFIG_KEY) == settings.to_dict()
    assert AttentionConfig.from_model_config(reloaded) == settings
    assert AttentionConfig.from_model_config(tiny_config("opt")) == AttentionConfig()  # stock config: vanilla
    with pytest.raises(ValueError, match="Unknown attention settings"):
        AttentionConfig.from_dict({"softmax": "vanilla", "tau": 1.0})


def parse(argv, train_seq_length=128):
    flags = add_attention_args(FlagParser()).parse(argv)
    return attention_config_from_args(flags.attention, train_seq_length)


def test_flags_to_config():
    assert parse([]) == AttentionConfig()
    assert parse(["--attn_softmax", "clipped(-.025:1)"]).gamma == pytest.approx(-0.025)
    assert parse(["--alpha", "12"], train_seq_length=512).gamma == pytest.approx(-12 / 512)
    gated = parse(
        ["--attn_gate_type", "conditional_per_token", "--attn_gate_init", "0.25", "--attn_gate_mlp", "--fine_tuning"]
    )
    assert (gated.gate_network, gated.init_prob, gated.fine_tuning, gated.gate_scale) == ("mlp", 0.25, True, 4.0)
    assert parse(["--attn_gate_type", "conditional_per_head", "--attn_gate_linear_all_features"]).gate_network == (
        "all_heads_linear"
    )
    assert parse(["--attn_gate_type", "conditional_per_token", "--attn_gate_mlp2"]).gate_network == "mlp2"
    assert parse(["--skip_attn"]).skip_attn


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--attn_gate_mlp"], "--attn_gate_mlp configure the attention gate, but --attn_gate_type is 'none'"),
        (["--attn_gate_init", "0.3"], "--attn_gate_type conditional_per_token"),
        (["--fine_tuning"], "--fine_tuning configure the attention gate"),
        (
            ["--attn_gate_type", "conditional_per_token", "--attn_gate_mlp", "--attn_gate_mlp2"],
            "Choose one gate network",
        ),
        (["--attn_gate_type", "unconditional_per_head", "--attn_gate_mlp"], "unconditional_per_head has no network"),
        (["--alpha", "4", "--attn_softmax", "clipped(-0.1:1)"], "unclipped clippable"),
        (["--skip_attn", "--alpha", "4"], "cannot be combined"),
        (["--alpha", "4", "--attn_softmax", "clipped(0:1)"], "unclipped clippable"),
        (["--attn_softmax", "clipped(0.1:1)"], "gamma <= 0"),
    ],
)
def test_contradicting_flags(argv, match):
    with pytest.raises(ValueError, match=match):
        parse(argv)


def test_unknown_gate_type_flag_is_rejected_by_parser():
    with pytest.raises(SystemExit):
        parse(["--attn_gate_type", "per_token"])
