"""CRF-as-RNN (segjax.models.crf_rnn): the unet_synthetic U-Net with 5 mean-field iterations of
the dense CRF on top, its kernel weights and label compatibility trained with the network.

    python -m segjax.train --config experiments/crf_rnn_unet_synthetic.py --workdir runs/crf_rnn

Every step runs the CRF forward and backward (permutohedral lattice, 5 iterations), so a step
costs several times a plain U-Net step on a CPU. Everything but the model is unet_synthetic's.
"""

from experiments.unet_synthetic import get_config as unet_synthetic_config
from segjax.models import crf_rnn


def get_config():
    config = unet_synthetic_config()
    inner = {'fn': config.model.fn, 'base_width': config.model.base_width,
             'depth': config.model.depth}
    config.model = {'fn': crf_rnn.CRFasRNN, 'inner': inner, 'iterations': 5,
                    'learn_compatibility': True,
                    # The pipeline normalises with these; the CRF maps images back with them.
                    'mean': tuple(config.data.mean), 'std': tuple(config.data.std)}
    return config
