"""Where a family's tensors are: the activation sites its statistics hook, and the sites of its W8A8 points, its
equivalent transforms and its rotations (families.py gives each family one `Wiring`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Site:
    """A named activation tensor of a model: a module's output, or the first input of a module (a residual sum
    that has no module of its own). Statistics hook here."""

    module_path: str
    kind: str
    """What the tensor is, the same for every layer (e.g. 'ffn_output'); headline figures select by kind."""
    layer: int | None
    tap: str = "output"
    width: int | None = None
    """The tensor's last dimension when it is not the hidden size (Llama's SwiGLU product: the FFN width)."""

    @property
    def name(self) -> str:
        return self.module_path + ("[input]" if self.tap == "input" else "")


LAYER_INPUT = "<layer input>"
"""A `NormReaders.norm` that is not inside the layer: the LayerNorm whose output is the layer's input (post-LN:
the previous layer's `Wiring.layer_output_norm`, or `Wiring.input_norm` for the first layer)."""


@dataclass(frozen=True)
class NormReaders:
    """A LayerNorm and everything that reads its output (paths relative to a layer): the equivalent transforms
    (gamma migration, SmoothQuant, OS+) fold a per-channel scale and shift into all of them."""

    norm: str
    linears: tuple[str, ...]
    gated_attention: str | None = None
    """The attention module whose gate network reads the output too (the attention input)."""
    shortcut: str | None = None
    """The module whose second input, the residual it adds, is this output (post-LN)."""


@dataclass(frozen=True)
class RotationSites:
    """Where QuaRot's rotations go in a pre-norm family (paths relative to a layer unless said otherwise):
    the residual stream's writers and the attention's projections; its readers are the norms' (`norm_readers`,
    the final norm with the head)."""

    embeddings: tuple[str, ...]
    """Model paths of the tables whose rows enter the residual stream."""
    query: str
    key: str
    value: str
    output: str
    """The attention's projections: values rotate per head into the output projection; queries and keys per
    head into their projections, or at run time after RoPE (`online_keys`)."""
    ffn_out: str
    """The FFN's output projection, whose input takes an online Hadamard transform."""
    online_keys: bool = False

    @property
    def writers(self) -> tuple[str, str]:
        """The Linears that add into the residual stream."""
        return self.output, self.ffn_out


@dataclass(frozen=True)
class Wiring:
    """Where the W8A8 points of a family are (paths relative to the model or to a layer)."""

    head: tuple[str, ...]
    """The head's modules (model paths), which the preset may leave in floating point."""
    final_layernorm: str
    """The LayerNorm feeding the head ('{last}' is the index of the last layer)."""
    ffn_in: str
    ffn_activation: str
    residual_layernorms: tuple[str, ...] = ()
    """LayerNorms whose input is a residual sum (post-LN BERT)."""
    residual_sums: tuple[str, ...] = ()
    """The point names of the residual additions inside each layer's forward, in order (pre-LN OPT)."""
    embedding_sums: str | None = None
    """A module whose forward adds the embeddings (BERT: 2 additions)."""
    embedding_sum_names: tuple[str, ...] = ()
    """The point names of those additions, in order."""
    embedding_sum_consumer: str | None = None
    """The module whose only input is the embedding sum (OPT: the first decoder layer, also behind a
    `project_in`, whose own input is a lookup in the quantized table and so already on the weight grid)."""
    product_inputs: tuple[str, ...] = ()
    """Modules (layer paths) whose only input is a product made for them (Llama: the SwiGLU product, the down
    projection's input), quantized by a forward pre-hook as `<module>.input`."""
    attention_points: tuple[str, ...] = ("scores", "probs", "context")
    """The attention points quantized (attention.py): Llama adds `keys`, the RoPE'd keys as the key cache holds
    them (its k_proj output is not what the cache stores)."""
    kv_points: tuple[str, ...] = ()
    """The key / value cache of each layer, as point names relative to the layer (`--n_bits_kv`): the keys as
    the cache holds them (Llama: after RoPE) and the value projection's output."""
    outlier_points: tuple[str, ...] = ()
    """The FFN's outlier tensors of each layer, as point names relative to the layer: the FFN input, the FFN
    output and the residual sum after the FFN (Llama: also the SwiGLU product), where PEG and MP-PTQ apply by
    default."""
    norm_readers: tuple[NormReaders, ...] = ()
    """Each layer's LayerNorms with their readers (the equivalent transforms' sites)."""
    input_norm: str | None = None
    """Post-LN: the LayerNorm (model path) whose output is the first layer's input."""
    layer_output_norm: str | None = None
    """Post-LN: the LayerNorm (layer path) whose output is the layer's output, read by the next layer."""
    transform_requires: tuple[str, bool] | None = None
    """(config key, value) without which the sites above are not the model's (e.g. OPT's pre-LN switch)."""
    rotation: RotationSites | None = None
    """QuaRot's sites (pre-norm families); None: the family takes no rotation."""
    norm_bias: bool = True
    """Whether the norms and their readers carry biases: without them (RMSNorm, bias-free Linears) OS+'s shift
    has nowhere to go."""

    def in_head(self, path: str) -> bool:
        """Whether the module at `path` belongs to the head (which the preset may leave in floating point)."""
        return any(path == head or path.startswith(head + ".") for head in self.head)
