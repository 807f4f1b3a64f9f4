"""The model families (BERT, OPT, ViT, Llama): every fact that makes one family differ from the other, in one table.

A family names its pre-training objective, its sequence-length flag, its Adam betas, its dropout config keys
and from-scratch config defaults, where its layers and measured tensors are and which headline figures the
paper reports for it, the module paths the losses use, where the W8A8 quantizers go, and the paper's weight
range estimator. Code asks the family instead of branching on a name: a new family is one entry here plus a
model class (models.py) that names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .errors import UsageError
from .glue_tasks import TASK_KEY
from .wiring import LAYER_INPUT, NormReaders, RotationSites, Wiring


@dataclass(frozen=True)
class Headline:
    """A headline outlier figure: `reduce` ('max' or 'mean') of one statistic over the sites of some kinds."""

    key: str
    label: str
    """The paper's name for it, used in the log line."""
    statistic: str
    """'inf_norm', 'kurtosis', 'first_token_inf_norm' or 'later_tokens_inf_norm' (each the mean over validation
    sequences; the last two: max |x| at the first position, and over every later one)."""
    kinds: tuple[str, ...] | None
    """Site kinds it covers; None: every site."""
    reduce: str = "max"


@dataclass(frozen=True)
class SequenceFlag:
    """The flag of a family's sequence length (the paper's name) with its default and help."""

    name: str
    default: int | None
    help: str


@dataclass(frozen=True)
class Family:
    model_type: str
    objective: str
    """The pre-training objective (objectives.py) of this family's scripts."""
    sequence: SequenceFlag
    adam_betas: tuple[float, float]
    dropout_keys: tuple[str, str | None]
    """(attention dropout, hidden dropout) config keys (None: the family has no such dropout)."""
    scratch_defaults: dict[str, Callable] = field(default_factory=dict)
    """Config values of a from-scratch model unless the config or YAML sets them, each computed from the config
    (after the YAML overrides)."""
    layers_path: str = ""
    """Where the transformer layers (whose outputs are the residual stream) live in the model."""
    layer_sites: tuple[tuple[str, str, str], ...] = ()
    """Per layer, the measured tensors: (kind, module path inside the layer, 'output' or 'input')."""
    model_sites: tuple[tuple[str, str, str], ...] = ()
    """Measured tensors outside the layers: (kind, module path, tap)."""
    stream_kind: str = ""
    """The kind of the residual stream after each layer (the rows of the outlier-dimension heatmap)."""
    headlines: tuple[Headline, ...] = ()
    """The paper's headline figures for this family (metrics.md)."""
    body: str = ""
    """The transformer body whose last hidden state the loss reads."""
    head_transform: str | None = None
    """The head's part before the vocabulary projection (BERT's transform), or None."""
    head_projection: str = ""
    """The vocabulary projection."""
    wiring: Wiring | None = None
    weight_ranges: str = "minmax"
    """The paper's weight range estimator for this family (BERT min-max, OPT MSE)."""
    modality: str = "text"
    """What the model reads (modalities.py): 'text' (token ids) or 'image' (pixels)."""
    scripts: str = ""
    """The entry scripts' suffix: run_<scripts>.py and validate_<scripts>.py."""
    name: str = ""
    """The family's key in FAMILIES (default: the model type; a model type's first family pre-trains it)."""
    config_marker: str | None = None
    """A config key that only this family's saved models carry (a fine-tuned model's task)."""

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.model_type)

    @property
    def train_verb(self) -> str:
        """What its training script does: fine-tune (a task family) or pre-train."""
        return "Fine-tune" if self.config_marker else "Pre-train"

    @property
    def train_script(self) -> str:
        return f"run_{self.scripts}.py"

    @property
    def validate_script(self) -> str:
        return f"validate_{self.scripts}.py"


def pre_ln_layer_sites(attn_layernorm: str, attn_out_proj: str, ffn_layernorm: str, ffn_output: str) -> tuple:
    """The measured tensors of a pre-LN layer (OPT, ViT), given its modules' paths inside the layer: the residual
    stream after the layer, both LayerNorm outputs, the attention output projection and the FFN output."""
    return (
        ("layer_output", "", "output"),  # the residual stream after the layer
        ("attn_layernorm", attn_layernorm, "output"),
        ("attn_out_proj", attn_out_proj, "output"),
        ("ffn_layernorm", ffn_layernorm, "output"),
        ("ffn_output", ffn_output, "output"),
    )


# The residual-stream figures of a pre-LN model (the paper's OPT figures; also its ViT figures, Table 2): max
# inf-norms and the average / max kurtosis over every measured tensor.
PRE_LN_HEADLINES = (
    Headline("max_inf_norm", "Max inf norm", "inf_norm", None),
    Headline("max_ffn_inf_norm", "Max FFN inf norm", "inf_norm", ("ffn_output",)),
    Headline("max_layer_inf_norm", "Max layer inf norm", "inf_norm", ("layer_output",)),
    Headline("avg_kurtosis", "Avg Kurtosis", "kurtosis", None, "mean"),
    Headline("max_kurtosis", "Max Kurtosis", "kurtosis", None),
)


FAMILIES: dict[str, Family] = {
    "bert": Family(
        model_type="bert",
        objective="mlm",
        sequence=SequenceFlag("max_seq_length", 128, "Tokens per MLM sequence."),
        adam_betas=(0.9, 0.999),
        dropout_keys=("attention_probs_dropout_prob", "hidden_dropout_prob"),
        layers_path="bert.encoder.layer",
        layer_sites=(
            ("ffn_output", "output.dense", "output"),
            ("ffn_residual_sum", "output.LayerNorm", "input"),  # FFN input + output
            ("ffn_layernorm", "output.LayerNorm", "output"),  # LN(FFN input + output): the layer output
        ),
        stream_kind="ffn_layernorm",
        headlines=(
            Headline("max_ffn_output_inf_norm", "max FFN output inf norm", "inf_norm", ("ffn_output",)),
            Headline(
                "max_ffn_residual_sum_inf_norm", "max FFN input + output inf norm", "inf_norm", ("ffn_residual_sum",)
            ),
            Headline("max_ffn_layernorm_inf_norm", "max LN(FFN i + o) inf norm", "inf_norm", ("ffn_layernorm",)),
            Headline("avg_kurtosis", "Avg Kurtosis", "kurtosis", ("ffn_output", "ffn_layernorm"), "mean"),
            Headline("max_kurtosis", "Max Kurtosis", "kurtosis", ("ffn_output", "ffn_layernorm")),
        ),
        body="bert",
        head_transform="cls.predictions.transform",
        head_projection="cls.predictions.decoder",
        wiring=Wiring(
            head=("cls",),
            final_layernorm="bert.encoder.layer.{last}.output.LayerNorm",
            ffn_in="intermediate.dense",
            ffn_activation="intermediate.intermediate_act_fn",
            residual_layernorms=("attention.output.LayerNorm", "output.LayerNorm"),
            embedding_sums="bert.embeddings",
            embedding_sum_names=("word_type_sum", "embedding_sum"),  # word + token type, then + position
            kv_points=("attention.self.key.output", "attention.self.value.output"),
            outlier_points=("attention.output.LayerNorm.output", "output.dense.output", "output.LayerNorm.input"),
            norm_readers=(
                NormReaders(
                    LAYER_INPUT,
                    ("attention.self.query", "attention.self.key", "attention.self.value"),
                    gated_attention="attention.self",
                    shortcut="attention.output",
                ),
                NormReaders("attention.output.LayerNorm", ("intermediate.dense",), shortcut="output"),
            ),
            input_norm="bert.embeddings.LayerNorm",
            layer_output_norm="output.LayerNorm",
        ),
        weight_ranges="minmax",
        scripts="mlm",
    ),
    "opt": Family(
        model_type="opt",
        objective="clm",
        sequence=SequenceFlag("block_size", None, "Tokens per CLM block (default: positions, at most 1024)."),
        adam_betas=(0.9, 0.95),  # OPT's, as in the paper
        dropout_keys=("attention_dropout", "dropout"),
        scratch_defaults={"word_embed_proj_dim": lambda config: config.hidden_size},  # no project_in / project_out
        layers_path="model.decoder.layers",
        layer_sites=pre_ln_layer_sites("self_attn_layer_norm", "self_attn.out_proj", "final_layer_norm", "fc2"),
        model_sites=(("final_layernorm", "model.decoder.final_layer_norm", "output"),),
        stream_kind="layer_output",
        headlines=(
            *PRE_LN_HEADLINES,
            Headline("max_kurtosis_layers", "Max Kurtosis layers", "kurtosis", ("layer_output",)),
        ),
        body="model",
        head_projection="lm_head",
        wiring=Wiring(
            head=("lm_head",),
            final_layernorm="model.decoder.final_layer_norm",
            ffn_in="fc1",
            ffn_activation="activation_fn",
            residual_sums=("attn_residual_sum", "ffn_residual_sum"),
            embedding_sum_consumer="model.decoder.layers.0",
            kv_points=("self_attn.k_proj.output", "self_attn.v_proj.output"),
            rotation=RotationSites(
                embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
                query="self_attn.q_proj",
                key="self_attn.k_proj",
                value="self_attn.v_proj",
                output="self_attn.out_proj",
                ffn_out="fc2",
            ),
            outlier_points=("final_layer_norm.output", "fc2.output", "ffn_residual_sum"),
            # The final decoder LayerNorm is left alone: its reader, the LM head, is tied to the embeddings.
            norm_readers=(
                NormReaders(
                    "self_attn_layer_norm",
                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    gated_attention="self_attn",
                ),
                NormReaders("final_layer_norm", ("fc1",)),
            ),
            # Post-LN OPT (350m) adds the LayerNorm outputs as residuals inside the layer's own forward.
            transform_requires=("do_layer_norm_before", True),
        ),
        weight_ranges="MSE",
        scripts="clm",
    ),
    "vit": Family(
        model_type="vit",
        objective="image_classification",
        sequence=SequenceFlag("image_size", None, "Image side in pixels (default: the config's image_size)."),
        adam_betas=(0.9, 0.999),
        dropout_keys=("attention_probs_dropout_prob", "hidden_dropout_prob"),
        layers_path="vit.layers",
        layer_sites=pre_ln_layer_sites("layernorm_before", "attention.o_proj", "layernorm_after", "mlp.fc2"),
        model_sites=(("final_layernorm", "vit.layernorm", "output"),),
        stream_kind="layer_output",
        headlines=PRE_LN_HEADLINES,
        body="vit",
        head_projection="classifier",
        wiring=Wiring(
            head=("classifier",),
            final_layernorm="vit.layernorm",
            ffn_in="mlp.fc1",
            ffn_activation="mlp.activation_fn",
            residual_sums=("attn_residual_sum", "ffn_residual_sum"),
            embedding_sums="vit.embeddings",
            embedding_sum_names=("embedding_sum",),  # [CLS] + patches, + positions
            kv_points=("attention.k_proj.output", "attention.v_proj.output"),
            outlier_points=("layernorm_after.output", "mlp.fc2.output", "ffn_residual_sum"),
            norm_readers=(
                NormReaders(
                    "layernorm_before",
                    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                    gated_attention="attention",
                ),
                NormReaders("layernorm_after", ("mlp.fc1",)),
            ),
        ),
        weight_ranges="minmax",
        modality="image",
        scripts="vit",
    ),
    "llama": Family(
        model_type="llama",
        objective="clm",
        sequence=SequenceFlag("block_size", None, "Tokens per CLM block (default: positions, at most 1024)."),
        adam_betas=(0.9, 0.95),  # Llama's
        dropout_keys=("attention_dropout", None),  # Llama has no hidden-state dropout
        # HF's defaults are Llama-2 7B's (head_dim 128, 32 key-value heads): a smaller YAML size gets heads of
        # hidden / heads and one key-value head per query head unless it says otherwise.
        scratch_defaults={
            "head_dim": lambda config: config.hidden_size // config.num_attention_heads,
            "num_key_value_heads": lambda config: config.num_attention_heads,
        },
        layers_path="model.layers",
        layer_sites=(
            *pre_ln_layer_sites("input_layernorm", "self_attn.o_proj", "post_attention_layernorm", "mlp.down_proj"),
            ("ffn_product", "mlp.down_proj", "input"),  # act(gate) * up: the largest activations of SwiGLU models
        ),
        model_sites=(("final_layernorm", "model.norm", "output"),),
        stream_kind="layer_output",
        headlines=(
            *PRE_LN_HEADLINES,
            Headline("max_kurtosis_layers", "Max Kurtosis layers", "kurtosis", ("layer_output",)),
            Headline("max_ffn_product_inf_norm", "Max down-proj input inf norm", "inf_norm", ("ffn_product",)),
            Headline("max_first_token_inf_norm", "Max first-token inf norm", "first_token_inf_norm", ("layer_output",)),
            Headline(
                "max_later_tokens_inf_norm", "Max later-token inf norm", "later_tokens_inf_norm", ("layer_output",)
            ),
        ),
        body="model",
        head_projection="lm_head",
        wiring=Wiring(
            head=("lm_head",),
            final_layernorm="model.norm",
            ffn_in="mlp.gate_proj",  # SiLU fused into it: the gate's activation is quantized, its pre-activation not
            ffn_activation="mlp.act_fn",
            residual_sums=("attn_residual_sum", "ffn_residual_sum"),
            product_inputs=("mlp.down_proj",),
            attention_points=("keys", "scores", "probs", "context"),
            kv_points=("self_attn.attention_variant.keys", "self_attn.v_proj.output"),
            rotation=RotationSites(
                embeddings=("model.embed_tokens",),
                query="self_attn.q_proj",
                key="self_attn.k_proj",
                value="self_attn.v_proj",
                output="self_attn.o_proj",
                ffn_out="mlp.down_proj",
                online_keys=True,
            ),
            # FFN input, SwiGLU product, FFN output, residual sum: the product is where SwiGLU's outliers peak.
            outlier_points=(
                "post_attention_layernorm.output",
                "mlp.down_proj.input",
                "mlp.down_proj.output",
                "ffn_residual_sum",
            ),
            # The final norm is left alone, as OPT's: the LM head reads it (tied to the embeddings or not).
            norm_readers=(
                NormReaders(
                    "input_layernorm",
                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    gated_attention="self_attn",
                ),
                NormReaders("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            ),
            norm_bias=False,
        ),
        weight_ranges="MSE",
        scripts="llama",
    ),
}


# GLUE (sentence-pair classification and regression): BERT with the pooler and a classifier on [CLS] instead of
# the masked-LM head; the body, its sites and its wiring are BERT's.
FAMILIES["bert_glue"] = replace(
    FAMILIES["bert"],
    name="bert_glue",
    objective="glue",
    sequence=SequenceFlag(
        "max_seq_length",
        None,
        "Longest tokenized sentence (pair); longer ones are truncated (default: 128, at most the position table).",
    ),
    head_transform=None,
    head_projection="classifier",
    wiring=replace(FAMILIES["bert"].wiring, head=("bert.pooler", "classifier")),
    modality="sentence_pairs",
    scripts="glue",
    config_marker=TASK_KEY,
)


def get_family(name: str) -> Family:
    """A family by its key; a model type names the family that pre-trains it."""
    if name not in FAMILIES:
        raise UsageError(f"Unknown model type {name!r}; valid model types: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def job_family(objective: str, name: str | None = None) -> Family:
    """The family a job of `objective` runs: `name`'s, else the objective's first (family_of_objective)."""
    return get_family(name) if name else family_of_objective(objective)


def family_of_objective(objective: str) -> Family:
    """The first family of an objective, the one its scripts are named for (run_mlm / validate_mlm: BERT; run_clm
    / validate_clm: OPT; run_vit / validate_vit: ViT; run_glue / validate_glue: BERT with a classifier); Llama,
    also causal LM, has its own scripts (run_llama / validate_llama)."""
    return next(family for family in FAMILIES.values() if family.objective == objective)
