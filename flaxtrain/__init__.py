"""flaxtrain: train JAX/Flax models from config files."""

__version__ = "0.1.0"
