"""Knowledge-distillation losses: a student's logits are pulled toward a (frozen) teacher's.

  pixelwise_kd            Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in a Neural
                          Network"), per pixel as in Liu et al. 2019's pixel-wise distillation:
                          T^2 x the mean over valid pixels of KL(softmax(t/T) || softmax(s/T))
  pairwise_similarity_kd  Liu, Chen, Liu, Qin, Luo & Wang 2019 ("Structured Knowledge
                          Distillation for Semantic Segmentation"), pair-wise distillation: the
                          squared difference of the two networks' pairwise cosine-similarity
                          maps over pooled nodes, here of the logits

Both take `(student_logits, teacher_logits, labels, *, ..., ignore_index=255)`: the loss
library's rules with a teacher next to the logits. They compute in float32 whatever the input
dtype, are jit-safe, average over what the labels leave valid (label != ignore_index and in
[0, C)): nothing of an ignored pixel, student's or teacher's, reaches the value or the
gradient, whatever it holds (even inf/NaN), and a batch with no valid pixel gives 0.0 with zero,
finite gradients. The labels serve as a mask only: which class a pixel is does not matter.
Neither function cuts the teacher's gradient; a trainer passes `stop_gradient` teacher logits
(segjax.trainers.distillation does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from segjax.losses._common import _count, _prepare, _safe_div

# Added to a node's norm before dividing, as Liu et al.'s code does (it keeps 0/0 away).
_NORM_EPSILON = 1e-8


def _student_teacher(student_logits, teacher_logits, labels, ignore_index: int):
    """(student, teacher) float32 logits zeroed at invalid pixels, and the valid mask."""
    student, valid, _ = _prepare(student_logits, labels, ignore_index)
    teacher, _, _ = _prepare(teacher_logits, labels, ignore_index)
    if student.shape != teacher.shape:
        raise ValueError(f'teacher logits {teacher.shape} do not match student logits '
                         f'{student.shape}: the two networks must predict the same classes '
                         'at the same resolution')
    return student, teacher, valid


def _check_positive(value, name: str) -> None:
    if isinstance(value, int | float) and not value > 0:
        raise ValueError(f'{name}={value!r}: expected a number > 0')


def pixelwise_kd(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *,
                 temperature: float, ignore_index: int = 255) -> jax.Array:
    """Hinton et al.'s soft-target loss per pixel, averaged over the valid pixels:

        T^2 / |V| * sum_{p in V} sum_c q_pc (log q_pc - log s_pc),
        q_p = softmax(teacher_p / T),  s_p = softmax(student_p / T)

    V = pixels whose label is neither `ignore_index` nor outside [0, C). The T^2 keeps the
    gradient's scale, T (s - q) / |V| per pixel, comparable across temperatures (Hinton et al.).
    torch's equivalent: ``F.kl_div(F.log_softmax(s[V] / T, -1), F.softmax(t[V] / T, -1),
    reduction='batchmean') * T**2`` with s[V], t[V] the [|V|, C] valid rows.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[[2 * jnp.log(3.0), 0.0]]])  # softmax(s / 2) = (3/4, 1/4)
    >>> t = jnp.zeros((1, 1, 2))                     # softmax(t / 2) = (1/2, 1/2)
    >>> round(float(pixelwise_kd(s, t, jnp.array([[0]]), temperature=2.0)), 6)  # 2 ln(4/3)
    0.575364
    """
    _check_positive(temperature, 'temperature')
    student, teacher, valid = _student_teacher(student_logits, teacher_logits, labels,
                                               ignore_index)
    log_student = jax.nn.log_softmax(student / temperature, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher / temperature, axis=-1)
    # exp(log q) rather than softmax: a q that underflows to 0 gives 0 * finite, never 0 * -inf.
    kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)
    total = jnp.sum(jnp.where(valid, kl, 0.0))
    return temperature**2 * _safe_div(total, _count(valid))


def _max_pool_nodes(logits: jax.Array, valid: jax.Array, pool_size: int):
    """([B, N, C] node vectors, [B, N] node validity): the channel-wise max over each
    pool_size x pool_size patch's valid pixels (the last row/column of patches may be partial,
    as torch's ceil_mode=True); a node with no valid pixel is a zero vector, not valid."""
    batch, height, width, channels = logits.shape
    pad_h, pad_w = -height % pool_size, -width % pool_size
    lowest = jnp.finfo(jnp.float32).min
    masked = jnp.where(valid[..., None], logits, lowest)
    masked = jnp.pad(masked, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=lowest)
    valid = jnp.pad(valid, ((0, 0), (0, pad_h), (0, pad_w)))
    rows, cols = (height + pad_h) // pool_size, (width + pad_w) // pool_size
    patches = masked.reshape(batch, rows, pool_size, cols, pool_size, channels)
    nodes = jnp.max(patches, axis=(2, 4)).reshape(batch, rows * cols, channels)
    node_valid = jnp.any(valid.reshape(batch, rows, pool_size, cols, pool_size),
                         axis=(2, 4)).reshape(batch, rows * cols)
    return jnp.where(node_valid[..., None], nodes, 0.0), node_valid


def _cosine_similarities(nodes: jax.Array) -> jax.Array:
    """[B, N, N]: a_ij = f_i . f_j / ((|f_i| + eps)(|f_j| + eps)), with a finite gradient at a
    zero vector (where sqrt's is not)."""
    squared = jnp.sum(nodes * nodes, axis=-1, keepdims=True)
    positive = squared > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    unit = nodes / (norm + _NORM_EPSILON)
    return jnp.einsum('bic,bjc->bij', unit, unit)


def pairwise_similarity_kd(student_logits: jax.Array, teacher_logits: jax.Array,
                           labels: jax.Array, *, pool_size: int,
                           ignore_index: int = 255) -> jax.Array:
    """Liu et al.'s pair-wise distillation on the logits, averaged over the valid node pairs:

        1 / |P| * sum_b sum_{(i, j) in P_b} (a^s_bij - a^t_bij)^2,
        a_bij = f_bi . f_bj / ((|f_bi| + 1e-8)(|f_bj| + 1e-8))

    Nodes f_bi: image b's logits max-pooled over pool_size x pool_size patches (the authors'
    code max-pools too), over the patch's valid pixels only; P_b: the ordered pairs (i, j),
    i = j included, of image b's nodes that hold a valid pixel. With every pixel valid this is
    the authors' sim_dis_compute: sum (a^s - a^t)^2 / N^2 / B.

    What differs from the paper: the nodes are the logits (what every segjax model returns),
    not the last feature map, so the student and teacher need no feature of a shared name;
    and the gradient is the formula's, while the authors' code treats the norms as constants
    in the backward pass. Cost: (H W / pool_size^2)^2 pairs per image (64 x 64 logits at
    pool_size 8: 4,096).

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # 2x1 nodes at right angles: a^s = I
    >>> t = jnp.array([[[[1.0, 0.0]], [[1.0, 0.0]]]])  # parallel: a^t = all ones
    >>> float(pairwise_similarity_kd(s, t, jnp.zeros((1, 2, 1), int), pool_size=1))  # 2 / 4
    0.5
    """
    if not (isinstance(pool_size, int) and pool_size >= 1):
        raise ValueError(f'pool_size={pool_size!r}: expected an integer >= 1 (pixels per node '
                         'side)')
    student, teacher, valid = _student_teacher(student_logits, teacher_logits, labels,
                                               ignore_index)
    if student.ndim != 4:
        raise ValueError(f'logits {student.shape}: expected [B, H, W, C]')
    student_nodes, node_valid = _max_pool_nodes(student, valid, pool_size)
    teacher_nodes, _ = _max_pool_nodes(teacher, valid, pool_size)
    difference = _cosine_similarities(student_nodes) - _cosine_similarities(teacher_nodes)
    pairs = node_valid[:, :, None] & node_valid[:, None, :]
    total = jnp.sum(jnp.where(pairs, difference * difference, 0.0))
    return _safe_div(total, _count(pairs))
