"""segjax: semantic segmentation in JAX/Flax. Import submodules directly (segjax.train, ...)."""

__version__ = '0.1.0'
