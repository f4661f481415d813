"""Dense CRF refinement: mean-field inference of the fully-connected CRF, as pure JAX.

The model is Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge
Potentials" (NeurIPS 2011), as DeepLab v1/v2 (Chen et al., ICLR 2015 / TPAMI 2017) use it after
the network:

    E(x) = sum_i U_i(x_i) + sum_{i,j} mu(x_i, x_j) k(f_i, f_j)
    U_i(l) = -log softmax(logits_i)(l)
    k = w1 exp(-|p_i-p_j|^2 / 2 theta_alpha^2 - |I_i-I_j|^2 / 2 theta_beta^2)   (appearance)
      + w2 exp(-|p_i-p_j|^2 / 2 theta_gamma^2)                                (smoothness)

with p the pixel position (row, column) and I the RGB value in 0..255. Mean-field updates

    Q_i(l) <- softmax_l( -U_i(l) - sum_m w_m sum_l' mu(l, l') [K~_m Q(l')]_i )

run a fixed number of times; `dense_crf` returns log Q.

Matching the reference code (Krähenbühl's densecrf 2.2 as wrapped by pydensecrf, the code DeepLab
v2 tuned its published parameters with): each kernel is symmetrically normalised,
K~ = D^-1/2 K D^-1/2 with D = diag(K 1) (pydensecrf's default NORMALIZE_SYMMETRIC), and the
self-term j = i is *included* (the reference filters with the lattice, whose output contains the
centre, and never subtracts it; the paper's formula subtracts Q_i). `include_self=False` gives the
paper's form, subtracting the exact self-weight 1 (times the normalisation; the lattice's own
self-weight averages 0.75, so with the lattice this removes a little more than the centre).
`normalization='none'` uses raw Gaussian sums, which the lattice underestimates on images by a
factor 1.16-1.24 (measured; the symmetric normalisation cancels any such factor). Potts is
mu(l, l') = [l != l']; pydensecrf's `-w Q` form differs from it by a per-pixel constant that the
softmax removes.

The appearance kernel (d = 2 + channels = 5 dimensions) is filtered in time linear in pixels with
the permutohedral lattice (`lattice.py`); the smoothness kernel exactly, separably
(`gaussian.py`); `mean_field.py` holds `dense_crf`.
"""

from segjax.crf.gaussian import exact_gaussian_filter, smoothness_filter
from segjax.crf.lattice import (
    Lattice,
    lattice_filter,
    permutohedral_filter,
    permutohedral_lattice,
)
from segjax.crf.mean_field import (
    DEEPLAB_LARGEFOV,
    appearance_feature_bounds,
    appearance_features,
    dense_crf,
)

__all__ = [
    'DEEPLAB_LARGEFOV',
    'Lattice',
    'appearance_feature_bounds',
    'appearance_features',
    'dense_crf',
    'exact_gaussian_filter',
    'lattice_filter',
    'permutohedral_filter',
    'permutohedral_lattice',
    'smoothness_filter',
]
