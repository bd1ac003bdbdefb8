"""scalign: scalable alignment in JAX/Flax (easy-to-hard generalization, eva self-play)."""

__version__ = "0.1.0"
