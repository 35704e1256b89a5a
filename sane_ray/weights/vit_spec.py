"""The permutation spec of a vision transformer (:class:`sane_ray.zoo.vit.VisionTransformer`).

Three kinds of symmetry leave a pre-norm ViT's function unchanged:

* **Heads**, per block (group ``<block>.self_attention``): attention treats its heads
  alike and concatenates their outputs, so a head permutation moves the head's
  ``head_dim`` rows in each of the q, k and v thirds of ``in_proj_weight``/``in_proj_bias``
  (one :class:`PermutedAxis` with ``parts = 3``) and the matching ``head_dim``-column
  block of ``out_proj.weight``.
* **MLP hidden units**, per block (group ``<block>.mlp.0``): rows of ``mlp.0`` and its
  bias, columns of ``mlp.3``.
* **The residual stream** (group ``stream.conv_proj``), one permutation of the hidden
  dimension shared by every block: ``conv_proj`` rows, the last axis of ``class_token``
  and ``pos_embedding``, every LayerNorm (it is permutation-equivariant: mean and
  variance do not depend on the order), ``in_proj`` and ``mlp.0`` columns, ``out_proj``
  and ``mlp.3`` rows, ``encoder.ln`` and the columns of ``heads.head``.

Not expressed: the units *within* a head (q/k rows jointly, v rows with ``out_proj``
columns). They would permute the same axis as the head group, at a finer level and
differently in the v third, which the spec's one-group-per-axis shape cannot say.
"""

from __future__ import annotations

from sane_ray.weights.perm_spec import PermutationSpec, PermutedAxis, SpecBuilder
from sane_ray.zoo.vit import EncoderBlock, VisionTransformer


def vit_spec(model: VisionTransformer, name: str) -> PermutationSpec:
    """The spec of ``model``'s heads, MLP units and residual stream (see the module doc)."""
    b = SpecBuilder(name, model.state_dict())
    stream = b.group("stream.conv_proj", model.hidden_dim)
    b.param("conv_proj.weight", stream, None)
    b.param("conv_proj.bias", stream)
    b.tensor("class_token", None, None, stream)
    b.tensor("encoder.pos_embedding", None, None, stream)
    for child, block in model.encoder.layers.named_children():
        prefix = f"encoder.layers.{child}"
        if not isinstance(block, EncoderBlock):
            raise ValueError(f"{name}: {prefix} is a {type(block).__name__}; only EncoderBlock is supported")
        attn = block.self_attention
        if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError(f"{name}: {prefix}.self_attention needs one in_proj_weight, no bias_k/v, no zero attention")
        b.layernorm(f"{prefix}.ln_1", stream)
        heads = b.group(f"{prefix}.self_attention", attn.num_heads).group
        qkv = PermutedAxis(heads, attn.head_dim, parts=3)
        b.param(f"{prefix}.self_attention.in_proj_weight", qkv, stream)
        b.param(f"{prefix}.self_attention.in_proj_bias", qkv)
        b.param(f"{prefix}.self_attention.out_proj.weight", stream, PermutedAxis(heads, attn.head_dim))
        b.param(f"{prefix}.self_attention.out_proj.bias", stream)
        b.layernorm(f"{prefix}.ln_2", stream)
        hidden = b.group(f"{prefix}.mlp.0", block.mlp[0].out_features)
        b.param(f"{prefix}.mlp.0.weight", hidden, stream)
        b.param(f"{prefix}.mlp.0.bias", hidden)
        b.param(f"{prefix}.mlp.3.weight", stream, hidden)
        b.param(f"{prefix}.mlp.3.bias", stream)
    b.layernorm("encoder.ln", stream)
    b.param("heads.head.weight", None, stream)
    return b.build()
