"""qkv_vit: XCiT and the SNE / P-SNE / F-SNE query-key-value embeddings in JAX/Flax."""

__version__ = "0.1.0"
