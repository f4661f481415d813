"""A loss written right here, named in the config: prototyping without touching the library.

    python -m segjax.train --config experiments/custom_loss_example.py --workdir runs/focal
    python -m segjax.train --config experiments/custom_loss_example.py --workdir runs/focal1 \
        --config.loss.gamma=1.0

Everything else is the unet_synthetic experiment.
"""

import jax
import jax.numpy as jnp

from experiments.unet_synthetic import get_config as unet_synthetic_config


def focal_loss(logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255,
               gamma: float = 2.0) -> jax.Array:
    """Focal loss (Lin et al., 2017): mean over valid pixels of -(1 - p_y)**gamma * log p_y."""
    valid = labels != ignore_index
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    safe_labels = jnp.where(valid, labels, 0)  # any in-range index; masked out below
    log_p = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    per_pixel = -((1.0 - jnp.exp(log_p)) ** gamma) * log_p
    return jnp.sum(jnp.where(valid, per_pixel, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def get_config():
    config = unet_synthetic_config()
    config.loss = {'fn': focal_loss, 'gamma': 2.0}
    return config
