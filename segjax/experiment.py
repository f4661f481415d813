"""Turning a validated config into the objects the loops use: model, loss, data, state.

Shared by train, evaluate and predict so that all three build exactly the same model and
restore exactly the same state.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from segjax import (
    checkpoint,
    logs,  # noqa: F401  (before pipeline loads TensorFlow: the CLIs stay quiet)
    optim,
    pretrained,
    quantization,
    sharding,
    trainers,
)
from segjax import config as config_lib
from segjax import step as step_lib
from segjax.data import pipeline, prepare
from segjax.visualize import default_palette

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict):
    if config.dtype not in DTYPES:
        raise config_lib.ConfigError(
            f'config.dtype={config.dtype!r}: expected one of {sorted(DTYPES)}')
    return DTYPES[config.dtype]


def make_model(config: ml_collections.ConfigDict):
    """The linen module named by config.model.fn with its options, at config.dtype."""
    options = config_lib.options(config.model)
    if config.remat:
        config_lib.check_options(config.model.fn, {'remat': True},
                                 'config.remat=True: config.model')
        options['remat'] = True
    model = config.model.fn(num_classes=config.data.num_classes, dtype=compute_dtype(config),
                            **options)
    return quantization.quantization_aware(model, config.quantization.mode)


def make_loss(config: ml_collections.ConfigDict) -> Callable | None:
    """loss(logits, labels) -> scalar, with the config's options bound; None where config.loss.fn
    is None (a trainer whose model computes its own losses, e.g. trainers.instance)."""
    if config.loss.fn is None:
        return None
    return functools.partial(config.loss.fn, ignore_index=config.data.ignore_index,
                             **config_lib.options(config.loss))


def inference_options(config: ml_collections.ConfigDict, *, crf: bool = True) -> dict | None:
    """Keyword options of step.predict_step's inference: those of inference.probabilities
    (absent for one plain whole-image pass) and, under 'crf' when config.eval.crf.iterations > 0
    and `crf`, crf_options(config); None when all are off."""
    options = config.eval
    result = {}
    if not (options.mode == 'whole' and tuple(options.scales) == (1.0,) and not options.flip):
        result = {'mode': options.mode, 'scales': tuple(options.scales), 'flip': options.flip,
                  'window': None if options.window is None else tuple(options.window),
                  'stride': None if options.stride is None else tuple(options.stride),
                  'window_batch': options.window_batch}
    if crf and options.crf.iterations > 0:
        result['crf'] = crf_options(config)
    return result or None


def crf_options(config: ml_collections.ConfigDict) -> dict:
    """segjax.crf.dense_crf's keyword options from config.eval.crf, plus the 'mean' and 'std'
    (config.data's) that un-normalise the images back to RGB 0..255 for its appearance kernel."""
    return {**config.eval.crf.to_dict(), 'mean': tuple(config.data.mean),
            'std': tuple(config.data.std)}


def palette(config: ml_collections.ConfigDict) -> np.ndarray:
    if config.data.palette is not None:
        return np.asarray(config.data.palette, np.uint8)
    return default_palette(config.data.num_classes)


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    names = list(config.data.class_names)
    return names if len(names) == config.data.num_classes else [
        str(i) for i in range(config.data.num_classes)]


def dataset_builder(config: ml_collections.ConfigDict):
    """The TFDS builder, prepared: process 0 first, then the others (a no-op on a shared disk).

    Preparation holds a lock in the data_dir (prepare.prepared), so runs started together on
    one machine prepare once; a failure is a prepare.PrepareError with a one-line message.
    """

    def make():
        return config.data.builder(data_dir=config.data.data_dir,
                                   config=config.data.builder_config)

    builder = prepare.prepared(make) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices('segjax: dataset prepared')
    # The other processes: a no-op where process 0 prepared; generates on a host-local disk.
    return builder if builder is not None else prepare.prepared(make)


def state_shardings(mesh, abstract_state, config: ml_collections.ConfigDict):
    """The train state's shardings by config.sharding: 'replicated' on every device, or 'fsdp'
    (parameters, optimizer state and EMA split over the devices; sharding.state_shardings)."""
    return sharding.state_shardings(mesh, abstract_state, config.sharding,
                                    min_bytes=config.fsdp_min_bytes)


def make_trainer(config: ml_collections.ConfigDict, model, tx):
    """The trainers.Trainer named by config.trainer.fn (None: supervised), given what segjax
    supplies it."""
    make = config.trainer.fn or trainers.supervised
    return make(
        model=model, tx=tx, loss_fn=make_loss(config), num_classes=config.data.num_classes,
        ignore_index=config.data.ignore_index, image_shape=(1, *config.data.crop_size, 3),
        grad_accum_steps=config.grad_accum_steps, ema_decay=config.ema_decay,
        **config_lib.options(config.trainer))


def initial_state(trainer, mesh, config: ml_collections.ConfigDict):
    """(init function, abstract state with shardings): init runs jitted, straight to devices,
    each leaf created on its config.sharding shards (an FSDP state is never whole on one)."""
    abstract = jax.eval_shape(trainer.init, jax.random.key(0))
    shardings = state_shardings(mesh, abstract, config)
    init = jax.jit(trainer.init, out_shardings=shardings)
    return init, checkpoint.abstract_with_shardings(abstract, shardings)


def train_batches(config: ml_collections.ConfigDict, builder, *, local_batch_size: int,
                  start_step: int, unlabelled_images: bool):
    """This process's train batches from batch `start_step` on: {'image', 'label'} of the
    labelled share of the train split (config.data.labelled_fraction) and, with
    `unlabelled_images`, 'unlabelled_image' from the rest (their labels never loaded)."""
    data = config.data
    recipe = pipeline.TrainRecipe.from_config(data)
    stream = dict(split=data.train_split, local_batch_size=local_batch_size,
                  start_step=start_step, process_index=jax.process_index(),
                  process_count=jax.process_count())
    if data.labelled_fraction == 1 and not unlabelled_images:
        return pipeline.train_batches(builder, recipe, seed=config.seed, **stream)
    if data.labelled_fraction == 1:
        raise config_lib.ConfigError(
            f'config.trainer.fn={config.trainer.fn.__module__}.{config.trainer.fn.__name__} '
            'trains on unlabelled images too, and config.data.labelled_fraction=1.0 leaves '
            'none: set it below 1, e.g. --config.data.labelled_fraction=0.125')
    num_examples = builder.info.splits[data.train_split].num_examples
    labelled, unlabelled = pipeline.labelled_split(num_examples, data.labelled_fraction,
                                                   data.labelled_seed)
    batches = pipeline.train_batches(builder, recipe, seed=config.seed, examples=labelled,
                                     **stream)
    if not unlabelled_images:
        return batches
    # Its own seed, so that its augmentation draws are not the labelled stream's.
    images = pipeline.train_batches(builder, recipe, seed=config.seed + 1, examples=unlabelled,
                                    with_labels=False, **stream)
    return ({**batch, 'unlabelled_image': other['image']}
            for batch, other in zip(batches, images, strict=True))


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, 'checkpoints')


def load_pretrained(state: step_lib.TrainState, path: str) -> step_lib.TrainState:
    """The initial state with published weights (a .pth / .safetensors file) or another
    segjax run's (its workdir) loaded into it, on the same shardings."""
    if os.path.isdir(path):
        params, batch_stats = load_run_weights(state.params, state.batch_stats, path)
    elif os.path.isfile(path):
        loaded = pretrained.load_into(
            {'params': state.params, 'batch_stats': state.batch_stats}, path)
        params, batch_stats = loaded['params'], loaded['batch_stats']
    else:
        raise pretrained.PretrainedError(
            f'config.pretrained={path!r} is neither a file (a .pth or .safetensors state dict) '
            'nor a directory (a segjax workdir)')
    params, batch_stats = jax.device_put((params, batch_stats), jax.tree.map(
        lambda x: x.sharding, (state.params, state.batch_stats)))
    ema = {'params': params, 'batch_stats': batch_stats} if state.ema else {}
    return state.replace(params=params, batch_stats=batch_stats, ema=ema)


def _flat_shapes(tree) -> dict[tuple, tuple]:
    """{path: shape} of a nested dict's arrays."""
    flat = traverse_util.flatten_dict(tree) if tree else {}
    return {path: tuple(np.shape(leaf)) for path, leaf in flat.items()}


def _under(shapes: dict[tuple, tuple], prefix: tuple) -> dict[tuple, tuple]:
    """The entries of `_flat_shapes` below `prefix`, their paths relative to it."""
    return {path[len(prefix):]: shape for path, shape in shapes.items()
            if path[:len(prefix)] == prefix}


def load_run_weights(params, batch_stats, workdir: str) -> tuple[dict, dict]:
    """(params, batch_stats) with the latest checkpoint of the run in `workdir` put where its
    model fits: the whole model, or the one sub-module of the same structure and shapes (a
    U-Net's weights into a CRF-as-RNN's `inner`). Its params, not its EMA; no optimizer state."""
    mngr = checkpoint.manager(checkpoint_dir(workdir), read_only=True)
    loaded = checkpoint.restore_weights(mngr, sharding.replicated(sharding.make_mesh()))
    if loaded is None:
        raise pretrained.PretrainedError(
            f'config.pretrained={workdir!r}: a directory, but no checkpoint in '
            f'{checkpoint_dir(workdir)} (expected a segjax workdir)')
    want, have = _flat_shapes(loaded['params']), _flat_shapes(params)
    prefixes = {path[:i] for path in have for i in range(len(path))}
    fits = sorted(p for p in prefixes if _under(have, p) == want)
    if len(fits) != 1:
        raise pretrained.PretrainedError(
            f'config.pretrained={workdir!r}: its model ({len(want)} parameter arrays) fits '
            + ('neither this model nor any one of its sub-modules' if not fits else
               f'{len(fits)} places of this model ({", ".join("/".join(p) for p in fits)})')
            + ' (expected the same model, or one wrapped, e.g. as CRF-as-RNN\'s inner)')
    prefix = fits[0]
    if _flat_shapes(loaded['batch_stats']) != _under(_flat_shapes(batch_stats), prefix):
        raise pretrained.PretrainedError(
            f'config.pretrained={workdir!r}: its BatchNorm statistics do not match this '
            f'model\'s at {"/".join(prefix) or "the top"}')

    def put(target, source):
        if not source:
            return target
        # Empty sub-dicts kept, so that the tree keeps its structure.
        flat = traverse_util.flatten_dict(target, keep_empty_nodes=True)
        for path, leaf in traverse_util.flatten_dict(source).items():
            flat[prefix + path] = jnp.asarray(leaf, flat[prefix + path].dtype)
        return traverse_util.unflatten_dict(flat)

    return put(params, loaded['params']), put(batch_stats, loaded['batch_stats'])


def restore_state(config: ml_collections.ConfigDict, workdir: str, mesh, step_number=None):
    """The model and the checkpointed state at `step_number` (default latest); errors if none.

    A workdir without checkpoints and a `config.pretrained` file give the initial state with
    that file's weights: published weights are evaluated or applied without training.
    """
    model = make_model(config)
    tx, _ = optim.make(config)
    # The checkpoint's own layout does not matter: it is read onto config.sharding's on `mesh`.
    init, abstract = initial_state(make_trainer(config, model, tx), mesh, config)
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory) and config.pretrained and step_number is None:
        state = init(jax.random.key(config.seed))
        return model, load_pretrained(state, config.pretrained)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f'no checkpoints in workdir {workdir!r} (expected {directory}); train first with '
            f'python -m segjax.train --config <experiment> --workdir {workdir}, or give '
            '--config.pretrained=<weights file> to use published weights')
    mngr = checkpoint.manager(directory, read_only=True)
    state = checkpoint.restore(mngr, abstract, step_number)
    mngr.close()
    if state is None:
        raise FileNotFoundError(f'no complete checkpoint in {directory}')
    return model, state
