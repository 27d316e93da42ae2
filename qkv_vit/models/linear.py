"""A Dense layer over the last axis that multiplies the tokens as one matrix."""

import flax.linen as nn
import jax.numpy as jnp


def token_matrix(x: jnp.ndarray) -> jnp.ndarray:
    """x (..., features) as one (tokens, features) matrix. A leading axis of one is kept as it is: merging
    it away would drop a batch axis that is sharded over a mesh (explicit sharding, batch of one)."""
    if x.ndim <= 2 or x.shape[0] == 1:
        return x
    return x.reshape(-1, x.shape[-1])


class Dense(nn.Dense):
    """flax.linen.Dense (same parameters, same function) applied to the inputs flattened to (tokens, features).

    On 3-d inputs nn.Dense contracts one axis and keeps two batch axes, so the kernel gradient contracts two
    axes, which XLA's CPU backend computes with a transposed copy of an activation. As a matrix product the
    gradient is a plain transposed-operand matmul: about 15% less time for an MLP (benchmarks/README.md).
    """

    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        return super().__call__(token_matrix(inputs)).reshape(*inputs.shape[:-1], self.features)
