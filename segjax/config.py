"""Experiment configs: loading an experiment module, command-line overrides, validation.

An experiment module exports `get_config()` returning a ConfigDict built on `defaults()`. Every
field can be overridden with `--config.a.b=value`; a key the code does not know is an error that
names it. Sections that hold a callable under `fn` (model, loss, optimizer, schedule) pass their
other fields as keyword options to it, checked against its signature.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence

import ml_collections

# Sections whose fields (other than `fn`) are keyword options of the callable in `fn`.
CALLABLE_SECTIONS = ('model', 'loss', 'optimizer', 'schedule', 'trainer')

# config.sharding: how the train state is laid out over the devices (segjax.sharding).
SHARDING_MODES = ('replicated', 'fsdp')

# config.quantization.mode: segjax.quantization.MODES (not imported here: it loads jax).
QUANTIZATION_MODES = (None, 'qat', 'weight_only_int8')

# config.wandb.mode: 'auto' = online when an API key is configured and the server answers.
WANDB_MODES = ('auto', 'online', 'offline')

# What segjax passes each section's callable itself: (leading positional arguments, keywords,
# where the value comes from). A config that sets one of these is an error, not an option.
SUPPLIED = {
    'model': (0, ('num_classes', 'dtype'), 'config.data.num_classes and config.dtype'),
    'loss': (2, ('ignore_index', 'with_denominators'), 'the model output, the batch labels, '
             'config.data.ignore_index and config.grad_accum_steps'),
    'optimizer': (1, (), 'config.optimizer.lr through config.schedule'),
    'schedule': (2, (), 'config.optimizer.lr and config.num_steps'),
    'trainer': (0, ('model', 'tx', 'loss_fn', 'num_classes', 'ignore_index', 'image_shape',
                    'grad_accum_steps', 'ema_decay'),
                'config.model, config.optimizer, config.loss, config.data, '
                'config.grad_accum_steps and config.ema_decay'),
}


class ConfigError(ValueError):
    """A config that names an unknown key or an unusable value."""


def defaults() -> ml_collections.ConfigDict:
    """Every key the library reads, with its default. Experiments start from this."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 1000
    c.batch_size = 16  # global batch over all devices and hosts
    c.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16'; params stay float32
    c.grad_accum_steps = 1  # micro-batches per step; batch_size stays the global batch
    c.ema_decay = 0.0  # > 0: keep, evaluate and checkpoint an EMA of the weights
    c.remat = False  # recompute activations in the backward pass (models with a remat option)
    c.max_nonfinite_steps = 10  # stop after this many consecutive non-finite (skipped) steps
    # 'replicated': the train state on every device; 'fsdp': parameters, optimizer state and EMA
    # split over the devices, each leaf of more than fsdp_min_bytes along its largest divisible
    # dimension (segjax.sharding.state_shardings; the default is sharding.FSDP_MIN_BYTES).
    c.sharding = 'replicated'
    c.fsdp_min_bytes = 2**16
    # .pth / .safetensors weights, or a segjax workdir (its latest checkpoint), loaded into a
    # fresh run's initial state (not when resuming).
    c.pretrained = None
    # int8 quantization (segjax.quantization, docs/export.md): None; 'qat' (weights and
    # activations fake-quantized in training and evaluation); 'weight_only_int8' (weights only,
    # exported as int8). A float checkpoint resumes into either: fine-tuning is a resume.
    c.quantization = ml_collections.ConfigDict({'mode': None})

    c.data = ml_collections.ConfigDict()
    c.data.builder = None  # a tfds.core.DatasetBuilder class
    c.data.builder_config = None  # name of its BuilderConfig, or None for the default
    c.data.data_dir = None  # TFDS data_dir; None = TFDS's default (~/tensorflow_datasets)
    c.data.num_classes = 0
    c.data.class_names = ()
    c.data.palette = None  # uint8 [num_classes, 3] or None for the VOC palette
    c.data.ignore_index = 255
    c.data.train_split = 'train'
    c.data.eval_split = 'validation'
    c.data.crop_size = (64, 64)
    c.data.scale_range = (1.0, 1.0)
    c.data.flip = True
    c.data.eval_pad_size = None  # (H, W) every eval image is padded to, or None
    # 256-entry table: stored label value -> class or ignore_index, applied in the input graph
    # before augmentation (Cityscapes: segjax.data.cityscapes.LABEL_ID_TO_TRAIN_ID); None: the
    # stored labels are the classes.
    c.data.label_map = None
    # (long, short) edge bound the scale_range ratios apply to, aspect ratio kept
    # (mmsegmentation's `scale`: (2048, 512) VOC, (2048, 1024) Cityscapes); None: ratios of
    # each image's own size.
    c.data.base_size = None
    c.data.cat_max_ratio = 1.0  # < 1: retry the crop (10x) until no class covers this share
    c.data.rotation = 0.0  # > 0: random rotation uniform in [-rotation, rotation] degrees
    c.data.photometric = False  # mmsegmentation's brightness/contrast/saturation/hue distortion
    c.data.eval_base_size = None  # (long, short): eval images resized into it, aspect kept
    c.data.mean = (123.675, 116.28, 103.53)
    c.data.std = (58.395, 57.12, 57.375)
    # Share of the train split whose labels training uses, drawn with labelled_seed (fixed
    # whatever the run's seed); a semi-supervised trainer sees the rest as unlabelled images.
    c.data.labelled_fraction = 1.0
    c.data.labelled_seed = 0

    c.model = ml_collections.ConfigDict({'fn': None})
    c.loss = ml_collections.ConfigDict({'fn': None})
    c.optimizer = ml_collections.ConfigDict({'fn': None})
    c.schedule = ml_collections.ConfigDict({'fn': None})
    # What kind of training: None = segjax.trainers.supervised; trainers.adversarial.trainer,
    # trainers.semisupervised.trainer, or your own (docs/extending.md).
    c.trainer = ml_collections.ConfigDict({'fn': None})

    c.eval = ml_collections.ConfigDict()
    c.eval.mode = 'whole'  # 'whole' image, or 'slide': overlapping windows
    c.eval.window = None  # (h, w) of a sliding window
    c.eval.stride = None  # (h, w) between window starts
    c.eval.window_batch = 8  # windows run together; bounds memory in 'slide' mode
    c.eval.scales = (1.0,)  # test-time scales; probabilities averaged at full resolution
    c.eval.flip = False  # also average the horizontally flipped image
    # Boundary IoU's band: this fraction of the image diagonal (Cheng et al. 2021's 0.02).
    c.eval.boundary_dilation_ratio = 0.02
    # Dense CRF (segjax.crf.dense_crf) after inference, on the un-normalised image; defaults
    # DeepLab-CRF-LargeFOV's. iterations = 0 turns it off; DeepLab ran 10.
    c.eval.crf = ml_collections.ConfigDict()
    c.eval.crf.iterations = 0  # mean-field iterations; 0 = no CRF
    c.eval.crf.appearance_weight = 4.0  # w1: Gaussian in position and RGB
    c.eval.crf.theta_alpha = 121.0  # appearance kernel's position scale (pixels)
    c.eval.crf.theta_beta = 5.0  # appearance kernel's colour scale (0..255 levels)
    c.eval.crf.smoothness_weight = 3.0  # w2: Gaussian in position only
    c.eval.crf.theta_gamma = 3.0  # smoothness kernel's position scale (pixels)

    c.log_every = 50
    c.eval_every = 500  # 0 = only at the end
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.eval_batch_size = 32
    c.num_summary_images = 4

    # Weights & Biases (segjax.wandb_writer, docs/tracking.md), next to TensorBoard: off while
    # project is None. mode 'auto': online with an API key and a reachable server, else offline.
    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = None
    c.wandb.entity = None  # W&B user or team; None = the API key's default
    c.wandb.name = None  # run name; None = the workdir's name
    c.wandb.group = None  # e.g. a sweep's study name
    c.wandb.tags = ()  # e.g. ('study:<name>', 'trial:<n>')
    c.wandb.mode = 'auto'  # one of WANDB_MODES
    c.wandb.dir = None  # where W&B's local files go (a wandb/ folder in it); None = the workdir
    return c


def load(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from the experiment file at `path`, applies and validates overrides.

    While the file runs, its own directory, the one above it and the working directory lead the
    import path: an experiment imports its sibling modules (`import base`), the modules of the
    package directory it is in by package name (`from experiments.unet_synthetic import ...`
    from any working directory), and, run from the repository root, `experiments.*` from
    anywhere.
    """
    if not os.path.isfile(path):
        raise ConfigError(f'config file {path!r} does not exist')
    module = _import_experiment(path)
    if not hasattr(module, 'get_config'):
        raise ConfigError(f'config file {path!r} defines no get_config()')
    config = module.get_config()
    for item in overrides:
        apply_override(config, item)
    validate(config, source=path)
    return config


def _import_experiment(path: str):
    """Runs the experiment file as a module, with the import path of `load`'s docstring."""
    directory = os.path.dirname(os.path.abspath(path))
    module_name = '_segjax_experiment_' + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so pickling/inspect can find callables defined there
    saved_path = list(sys.path)
    sys.path[:0] = [directory, os.path.dirname(directory), os.getcwd()]
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        del sys.modules[module_name]
        what = (f'no module named {e.name!r}' if isinstance(e, ModuleNotFoundError) and e.name
                else str(e))
        raise ConfigError(f'config file {path!r} cannot be imported: {what}; an experiment can '
                          'import installed packages, the modules beside it and, by package '
                          'name, the modules of the directory it is in') from None
    except SyntaxError as e:
        del sys.modules[module_name]
        raise ConfigError(f'config file {path!r}: syntax error at {e.filename}:{e.lineno}: '
                          f'{e.msg}') from None
    finally:
        sys.path[:] = saved_path
    return module


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Applies one `a.b.c=value` override; the value is parsed as a Python literal if it can be."""
    if '=' not in item:
        raise ConfigError(f'override {item!r} must look like --config.key=value')
    path, text = item.split('=', 1)
    *parents, leaf = path.split('.')
    node = config
    for i, key in enumerate(parents):
        if key not in node or not isinstance(node[key], ml_collections.ConfigDict):
            raise ConfigError(_unknown_key('.'.join(parents[: i + 1]), key, node))
        node = node[key]
    # Options of a callable (a node with `fn`) may be new: validate() checks them against it.
    adds_option = 'fn' in node and callable(node['fn'])
    if leaf not in node and not adds_option:
        raise ConfigError(_unknown_key(path, leaf, node))
    old = node.get(leaf)
    value = _parse_value(text, old, path)
    with node.ignore_type():
        node[leaf] = value


def _parse_value(text: str, old, path: str):
    if isinstance(old, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if old is None:
            return text
        raise ConfigError(
            f'config key {path!r}: cannot parse {text!r} as a {type(old).__name__}') from None
    if isinstance(old, bool) and not isinstance(value, bool):
        raise ConfigError(f'config key {path!r}: expected True or False, got {text!r}')
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if old is not None and not isinstance(value, type(old)) and not callable(old):
        raise ConfigError(
            f'config key {path!r}: expected a {type(old).__name__}, got {text!r}')
    return value


def _unknown_key(path: str, key: str, node) -> str:
    close = difflib.get_close_matches(key, list(node.keys()), n=1)
    hint = f' (did you mean {close[0]!r}?)' if close else ''
    return f'unknown config key {path!r}{hint}; known keys here: {sorted(node.keys())}'


def validate(config: ml_collections.ConfigDict, source: str = 'config') -> None:
    """Raises ConfigError naming the first key the library does not know or cannot use."""
    _check_known(config, defaults(), prefix='', source=source)
    for section in CALLABLE_SECTIONS:
        fn = config[section].get('fn')
        if section == 'trainer' and fn is None:  # supervised: takes no options
            if options(config.trainer):
                raise ConfigError(f'{source}: config.trainer.{next(iter(options(config.trainer)))}'
                                  ' is an option of a trainer, and config.trainer.fn is None '
                                  '(supervised training, which takes none)')
            continue
        if section == 'loss' and fn is None and config.trainer.fn is not None:
            if options(config.loss):  # a trainer whose model computes its own losses
                raise ConfigError(f'{source}: config.loss.{next(iter(options(config.loss)))} is '
                                  'an option of a loss, and config.loss.fn is None')
            continue
        if not callable(fn):
            raise ConfigError(f'{source}: config.{section}.fn must be a callable, got {fn!r}')
        opts = options(config[section])
        if section == 'optimizer':
            if 'lr' not in opts:
                raise ConfigError(f'{source}: config.optimizer.lr (the peak learning rate) is '
                                  'missing')
            del opts['lr']  # the schedule's peak value, not an option of the optimizer
        check_options(fn, opts, f'{source}: config.{section}', section)
        _check_nested_callables(config[section], f'{source}: config.{section}', section)
    if config.eval.mode not in ('whole', 'slide'):
        raise ConfigError(f"{source}: config.eval.mode={config.eval.mode!r}: expected 'whole' or "
                          "'slide'")
    if config.eval.mode == 'slide' and (config.eval.window is None or config.eval.stride is None):
        raise ConfigError(
            f"{source}: config.eval.mode='slide' needs config.eval.window and config.eval.stride,"
            " e.g. --config.eval.window='(512, 1024)' --config.eval.stride='(341, 683)'")
    if not 0 < config.eval.boundary_dilation_ratio <= 1:
        raise ConfigError(f'{source}: config.eval.boundary_dilation_ratio='
                          f'{config.eval.boundary_dilation_ratio!r}: expected a fraction of the '
                          'image diagonal in (0, 1], e.g. 0.02')
    check_crf(config.eval.crf, f'{source}: config.eval.crf')
    check_wandb(config.wandb, f'{source}: config.wandb')
    if config.quantization.mode not in QUANTIZATION_MODES:
        raise ConfigError(f'{source}: config.quantization.mode={config.quantization.mode!r}: '
                          f'expected one of {list(QUANTIZATION_MODES)}')
    fraction = config.data.labelled_fraction
    if (isinstance(fraction, bool) or not isinstance(fraction, int | float)
            or not 0 < fraction <= 1):
        raise ConfigError(f'{source}: config.data.labelled_fraction={fraction!r}: expected a '
                          'share of the train split in (0, 1], e.g. 0.125')
    if config.sharding not in SHARDING_MODES:
        raise ConfigError(f'{source}: config.sharding={config.sharding!r}: expected one of '
                          f'{list(SHARDING_MODES)}')
    min_bytes = config.fsdp_min_bytes
    if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
        raise ConfigError(f'{source}: config.fsdp_min_bytes={min_bytes!r}: expected an integer '
                          '>= 0 (leaves of at most this many bytes stay replicated)')
    if config.data.builder is None:
        raise ConfigError(f'{source}: config.data.builder must name a TFDS builder class')
    if config.data.num_classes < 2:
        raise ConfigError(f'{source}: config.data.num_classes must be >= 2')


def check_wandb(wandb: ml_collections.ConfigDict, where: str = 'config.wandb') -> None:
    """Raises ConfigError for W&B settings segjax.wandb_writer cannot use, or that are set while
    W&B is off (project None), where they would silently do nothing."""
    if wandb.mode not in WANDB_MODES:
        raise ConfigError(f'{where}.mode={wandb.mode!r}: expected one of {list(WANDB_MODES)}')
    if wandb.project is None:
        default = defaults().wandb
        for key in ('entity', 'name', 'group', 'tags', 'mode', 'dir'):
            if (bool(wandb[key]) if key == 'tags' else wandb[key] != default[key]):
                raise ConfigError(f'{where}.{key}={wandb[key]!r} is set but config.wandb.project'
                                  ' is None, so W&B is off; set --config.wandb.project=NAME too')
        return
    for key in ('project', 'entity', 'name', 'group', 'dir'):
        value = wandb[key]
        if (value is not None or key == 'project') and (not isinstance(value, str) or not value):
            raise ConfigError(f'{where}.{key}={value!r}: expected a non-empty string'
                              f'{"" if key == "project" else " or None"}')
    tags = wandb.tags
    if not isinstance(tags, tuple | list) or not all(isinstance(t, str) and t for t in tags):
        raise ConfigError(f'{where}.tags={tags!r}: expected a tuple of non-empty strings, e.g. '
                          "--config.wandb.tags=\"('study:lr', 'trial:3')\"")


def check_crf(crf: ml_collections.ConfigDict, where: str = 'config.eval.crf') -> None:
    """Raises ConfigError for a dense-CRF setting segjax.crf.dense_crf cannot use."""
    iterations = crf.iterations
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ConfigError(f'{where}.iterations={iterations!r}: expected an integer >= 0 '
                          '(0 = no CRF; DeepLab used 10)')
    for key in ('appearance_weight', 'smoothness_weight', 'theta_alpha', 'theta_beta',
                'theta_gamma'):
        value, positive = crf[key], key.startswith('theta')  # a zero weight drops a kernel
        number = (isinstance(value, int | float) and not isinstance(value, bool)
                  and math.isfinite(value))
        if not number or value < 0 or (positive and value == 0):
            raise ConfigError(f'{where}.{key}={value!r}: expected a finite number '
                              f'{"> 0" if positive else ">= 0"}')


def _check_nested_callables(node, where: str, section: str) -> None:
    """Options of callables nested in a section (e.g. the terms of losses.weighted_sum), given
    as {'fn': f, 'weight': w, **options}, are checked against f's signature too, with what
    segjax passes a callable of that section itself."""
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            if callable(value.get('fn')):
                nested = {k: v for k, v in options(value).items() if k != 'weight'}
                check_options(value['fn'], nested, f'{where}.{key}', section)
            _check_nested_callables(value, f'{where}.{key}', section)


def _check_known(config, reference, prefix: str, source: str) -> None:
    for key in config.keys():
        path = prefix + key
        if key not in reference:
            raise ConfigError(f'{source}: ' + _unknown_key(path, key, reference))
        if path.split('.')[0] in CALLABLE_SECTIONS:
            continue  # options are checked against the callable's signature instead
        if isinstance(config[key], ml_collections.ConfigDict):
            _check_known(config[key], reference[key], path + '.', source)


def options(section: ml_collections.ConfigDict) -> dict:
    """The keyword options of a callable section: every field but `fn`, as plain Python."""
    return {k: _plain(v) for k, v in section.items() if k != 'fn'}


def _plain(value):
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    if isinstance(value, list):
        return tuple(value)
    return value


def supplied_parameters(fn: Callable, section: str) -> tuple[str, ...]:
    """Names of `fn`'s parameters that segjax sets itself for a callable of `section`."""
    count, keywords, _ = SUPPLIED[section]
    params = [name for name, p in inspect.signature(fn).parameters.items()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
              and name not in ('self', 'parent', 'name')]
    return tuple(params[:count]) + keywords


def check_options(fn: Callable, opts: dict, where: str, section: str | None = None) -> None:
    """Raises ConfigError if `fn` does not accept every option in `opts` as a keyword, or if an
    option is one segjax passes itself to a callable of `section`."""
    supplied = supplied_parameters(fn, section) if section else ()
    name = getattr(fn, '__name__', fn)
    for key in opts:
        if key in supplied:
            raise ConfigError(f'{where}.{key}: segjax sets {name}\'s {key!r} itself, from '
                              f'{SUPPLIED[section][2]}; it is not a config option')
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in ('self', 'parent', 'name', *supplied)]
    if section == 'optimizer':
        accepted.insert(0, 'lr')  # a field of the section, the schedule's peak value
    for key in opts:
        if key not in params:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f' (did you mean {close[0]!r}?)' if close else ''
            raise ConfigError(f'{where}.{key}: {name} takes no option {key!r}{hint}; it takes '
                              f'{accepted}')


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits `--config.a=b` overrides from the other command-line arguments."""
    overrides, rest = [], []
    for arg in argv:
        if arg.startswith('--config.'):
            overrides.append(arg[len('--config.'):])
        else:
            rest.append(arg)
    return overrides, rest
