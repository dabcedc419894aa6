"""neox_jax: GPT-NeoX and Pythia in JAX/Flax."""

__version__ = "0.1.0"
