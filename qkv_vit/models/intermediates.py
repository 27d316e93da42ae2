"""What a forward pass computes on the way, captured: each XCA block's output, XCA's cross-covariance attention maps,
class attention's maps over the tokens, and the pre-logit features, as timm's `forward_intermediates` gives them.

The model `sow`s them into the "intermediates" collection, which flax keeps only when a caller makes it mutable:
an ordinary apply (training, evaluation) computes and keeps nothing more. Maps are float32 softmax outputs, before
attention dropout.
"""

import dataclasses
from typing import Any

import jax

from qkv_vit.models.xcit import XCiT


@dataclasses.dataclass(frozen=True)
class Intermediates:
    blocks: list[jax.Array]  # per XCA block: its output, the residual stream (B, N, C), float32
    xca_attention: list[jax.Array]  # per XCA block: (B, heads, C/h, C/h), each row sums to 1 over the last axis
    class_attention: list[jax.Array]  # per class-attention block: (B, heads, 1, 1 + N), the class token's weights
    # over the class token (index 0) and the N patch tokens, which sum to 1
    pre_logits: jax.Array  # (B, embed_dim): the features the head sees


def capture(model: XCiT, variables: dict[str, Any], images: jax.Array) -> tuple[jax.Array, Intermediates]:
    """(logits, Intermediates) of `images` (B, H, W, 3) in eval mode; the logits are model.apply's, unchanged."""
    logits, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    found = state["intermediates"]
    return logits, Intermediates(
        blocks=list(found["blocks"]),
        xca_attention=[found[f"blocks_{i}"]["attn"]["attention"][0] for i in range(model.depth)],
        class_attention=[found[f"cls_attn_blocks_{i}"]["attn"]["attention"][0] for i in range(model.cls_attn_layers)],
        pre_logits=found["pre_logits"][0],
    )
