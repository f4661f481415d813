"""python -m segjax.evaluate --config <experiment> --workdir <dir> [--step N] [--crf_grid GRID]

Dataset-level metrics of a checkpoint on the config's eval split: prints a per-class table,
writes <workdir>/eval/metrics.json and <workdir>/eval/confusion_matrix.png. The metrics: those of
the confusion matrix (mIoU, accuracy, Dice, ...) and Boundary IoU (metrics.boundary_counts).

With --crf_grid 'appearance_weight=3,4,5;theta_alpha=60,121' it searches the dense CRF's
parameters instead (DeepLab's way of setting them): the split is evaluated without the CRF, then
once per combination of the listed config.eval.crf values (the others from the config), printing
mIoU and boundary mIoU for each and the best setting as --config.eval.crf.* overrides; the
results go to <workdir>/eval/crf_grid.json. The weights are traced, so settings that differ only
in weights share one compiled program; each iterations/theta_* value compiles its own.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax import cli, experiment, logs, metrics, optim, pretrained, sharding, step, visualize
from segjax import config as config_lib
from segjax.data import pipeline, prepare

# Device-side int32 counts are moved to a host int64 total this often, far below overflow.
FLUSH_EVERY = 64
# A progress line this often (seconds) while a split is evaluated; shorter evaluations print none.
PROGRESS_EVERY_S = 10.0


def make_eval_fn(config: ml_collections.ConfigDict, model, mesh):
    """Jitted (state, global batch) -> replicated counts (step.eval_step's dict), summed over
    the global batch, so every process holds the counts of all hosts."""
    fn = functools.partial(step.eval_step, model=model, num_classes=config.data.num_classes,
                           ignore_index=config.data.ignore_index,
                           inference_options=experiment.inference_options(config),
                           boundary_dilation_ratio=config.eval.boundary_dilation_ratio)
    return jax.jit(fn, out_shardings=sharding.replicated(mesh))


def eval_batches(builder, config: ml_collections.ConfigDict):
    """This process's eval batches; every process yields the same number (padded, valid=False)."""
    return pipeline.eval_batches(
        builder, pipeline.EvalRecipe.from_config(config.data), split=config.data.eval_split,
        local_batch_size=sharding.local_batch_size(config.eval_batch_size, 'eval_batch_size'),
        process_index=jax.process_index(), process_count=jax.process_count())


def progress_line(done: int, total: int, elapsed: float) -> str:
    """'eval: 480/1,449 images | 12.3 img/s | ETA 1m18s'."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = logs.format_seconds((total - done) / rate) if rate > 0 else '?'
    return f'eval: {done:,}/{total:,} images | {rate:.1f} img/s | ETA {eta}'


def counts_over_split(state, eval_fn, builder, config: ml_collections.ConfigDict, mesh,
                         progress_every_s: float | None = PROGRESS_EVERY_S):
    """Streams the eval split through `eval_fn` and sums the counts it returns: int64 numpy
    arrays in the same structure (make_eval_fn's dict of confusion matrix and Boundary IoU
    counts, or a single array).

    Process 0 prints a progress line every `progress_every_s` seconds (None: never), and a last
    line with the time taken if it printed any.
    """
    total = None
    num_images = builder.info.splits[config.data.eval_split].num_examples
    show = progress_every_s is not None and jax.process_index() == 0
    start = last_shown = time.time()
    done, shown = 0, False
    pending = None
    for i, batch in enumerate(eval_batches(builder, config)):
        counts = eval_fn(state, sharding.to_global(batch, mesh))
        pending = counts if pending is None else jax.tree.map(jnp.add, pending, counts)
        # Every process holds an equal share (its slice, padded): this one's count scaled.
        done = min(num_images, done + int(batch['valid'].sum()) * jax.process_count())
        if (i + 1) % FLUSH_EVERY == 0:
            total, pending = _add_to_host(total, pending), None
        if show and time.time() - last_shown >= progress_every_s:
            jax.block_until_ready(pending)  # count images evaluated, not only queued
            print(progress_line(done, num_images, time.time() - start), flush=True)
            last_shown, shown = time.time(), True
    if pending is not None:
        total = _add_to_host(total, pending)
    if total is None:
        raise ValueError(f'config.data.eval_split={config.data.eval_split!r} has no examples '
                         'to evaluate')
    if shown:
        elapsed = time.time() - start
        print(f'eval: {num_images:,} images in {logs.format_seconds(elapsed)} '
              f'({num_images / elapsed:.1f} img/s)', flush=True)
    return total


def _add_to_host(total, pending):
    """total + the device counts `pending`, as int64 numpy (total None: the first flush)."""
    pending = jax.tree.map(lambda x: np.asarray(x, np.int64), jax.device_get(pending))
    return pending if total is None else jax.tree.map(np.add, total, pending)


def summarize_counts(counts: dict, class_names: Sequence[str] | None = None) -> dict:
    """metrics.summarize of make_eval_fn's counts summed over a split (Boundary IoU included)."""
    return metrics.summarize(counts['confusion_matrix'], class_names,
                             boundary_intersection=counts['boundary_intersection'],
                             boundary_union=counts['boundary_union'])


def count_lists(counts: dict) -> dict:
    """The summed counts as JSON lists, for metrics.json (summable across runs)."""
    return {key: np.asarray(value).tolist() for key, value in counts.items()}


def json_safe(value):
    """NaN (classes absent from ground truth and prediction) becomes null in JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str, payload: dict) -> None:
    """Atomic write: a crash never leaves a half-written metrics file."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(json_safe(payload), f, indent=2)
    os.replace(tmp, path)


# config.eval.crf's keys that are traced (one compiled program for all their values).
CRF_WEIGHTS = ('appearance_weight', 'smoothness_weight')


def parse_crf_grid(text: str, crf: ml_collections.ConfigDict) -> list[dict]:
    """'a=1,2;b=3' -> every combination as config.eval.crf with those keys replaced, each
    checked by config.check_crf; a ConfigError names a bad key or value."""
    axes = []
    for part in filter(None, (p.strip() for p in text.split(';'))):
        key, _, values = part.partition('=')
        key = key.strip()
        if key not in crf:
            raise config_lib.ConfigError(
                f'--crf_grid: unknown key {key!r}; expected some of {sorted(crf.keys())}')
        cast = int if key == 'iterations' else float
        try:
            axes.append([(key, cast(v)) for v in values.split(',')])
        except ValueError:
            raise config_lib.ConfigError(
                f'--crf_grid: {part!r}: expected {key}=<{cast.__name__}>,<{cast.__name__}>,...'
            ) from None
    if not axes:
        raise config_lib.ConfigError(f"--crf_grid {text!r}: expected 'key=v1,v2;key=v1,...'")
    settings = []
    for combination in itertools.product(*axes):
        setting = crf.copy_and_resolve_references()
        setting.update(dict(combination))
        config_lib.check_crf(setting, f'--crf_grid {dict(combination)}')
        if setting.iterations == 0:
            raise config_lib.ConfigError(
                '--crf_grid: iterations is 0 (no CRF); list it in the grid or set '
                '--config.eval.crf.iterations (DeepLab: 10)')
        settings.append(setting.to_dict())
    return settings


def make_crf_eval_fn(config: ml_collections.ConfigDict, model, mesh, static: dict):
    """Jitted (state, global batch, weights) -> counts as make_eval_fn's with the CRF at the
    static options `static` (iterations, theta_*) and the traced `weights` (CRF_WEIGHTS)."""
    options = experiment.inference_options(config, crf=False) or {}
    normalisation = {'mean': tuple(config.data.mean), 'std': tuple(config.data.std)}

    def fn(state, batch, weights):
        crf = {**static, **weights, **normalisation}
        return step.eval_step(state, batch, model=model, num_classes=config.data.num_classes,
                              ignore_index=config.data.ignore_index,
                              inference_options={**options, 'crf': crf},
                              boundary_dilation_ratio=config.eval.boundary_dilation_ratio)

    return jax.jit(fn, out_shardings=sharding.replicated(mesh))


def crf_grid_search(state, model, builder, config: ml_collections.ConfigDict, mesh,
                    settings: Sequence[dict]) -> list[dict]:
    """[{'crf': setting or None (no CRF), 'miou', 'boundary_miou'}] on the eval split, the
    no-CRF baseline first; process 0 prints a line per setting as it finishes."""
    plain = copy.deepcopy(config)
    plain.eval.crf.iterations = 0
    runs = [(None, make_eval_fn(plain, model, mesh))]
    compiled = {}
    for setting in settings:
        static = {k: v for k, v in setting.items() if k not in CRF_WEIGHTS}
        key = tuple(sorted(static.items()))
        if key not in compiled:
            compiled[key] = make_crf_eval_fn(config, model, mesh, static)
        weights = {k: jnp.float32(setting[k]) for k in CRF_WEIGHTS}
        runs.append((setting, functools.partial(compiled[key], weights=weights)))
    results = []
    for setting, eval_fn in runs:
        summary = summarize_counts(counts_over_split(state, eval_fn, builder, config, mesh,
                                                        progress_every_s=None))
        results.append({'crf': setting, 'miou': summary['miou'],
                        'boundary_miou': summary['boundary_miou']})
        if jax.process_index() == 0:
            name = ('no CRF' if setting is None
                    else ' '.join(f'{k}={v:g}' for k, v in setting.items()))
            print(f'crf grid: {name} | mIoU {summary["miou"]:.4f} | boundary mIoU '
                  f'{summary["boundary_miou"]:.4f}', flush=True)
    return results


def crf_overrides(setting: dict) -> str:
    """The command-line overrides that select `setting`."""
    return ' '.join(f'--config.eval.crf.{k}={v}' for k, v in setting.items())


def main(argv: Sequence[str]) -> dict:
    parser = cli.argument_parser('segjax.evaluate', __doc__.splitlines()[2])
    parser.add_argument('--step', type=int, default=None, help='checkpoint step (default latest)')
    parser.add_argument('--crf_grid', default=None,
                        help="search config.eval.crf instead: 'appearance_weight=3,4,5;"
                        "theta_alpha=60,121' (every combination; see the module docstring)")
    args, config = cli.parse(parser, argv)
    settings = None
    try:
        pipeline.EvalRecipe.from_config(config.data)  # a malformed value: one line, up front
        if args.crf_grid is not None:
            settings = parse_crf_grid(args.crf_grid, config.eval.crf)
    except config_lib.ConfigError as e:
        parser.exit(2, f'segjax.evaluate: error: {e}\n')
    mesh = sharding.make_mesh()
    try:
        model, state = experiment.restore_state(config, args.workdir, mesh, args.step)
    except (FileNotFoundError, pretrained.PretrainedError) as e:
        parser.exit(1, f'segjax.evaluate: error: {e}\n')
    try:
        builder = experiment.dataset_builder(config)
    except prepare.PrepareError as e:
        parser.exit(1, f'segjax.evaluate: error: {e}\n')
    trainer = experiment.make_trainer(config, model, optim.make(config)[0])
    if trainer.evaluate is not None:  # the trainer's own metrics (instance segmentation: COCO AP)
        if settings is not None:
            parser.exit(2, 'segjax.evaluate: error: --crf_grid tunes a dense CRF on semantic '
                        'predictions; this experiment\'s trainer evaluates its own metrics\n')
        return report_trainer_metrics(trainer, state, builder, config, mesh, args.workdir)
    if settings is not None:
        return search_and_report(state, model, builder, config, mesh, settings, args.workdir)
    counts = counts_over_split(state, make_eval_fn(config, model, mesh), builder, config,
                                  mesh)
    names = experiment.class_names(config)
    summary = summarize_counts(counts, names)
    result = {'step': int(state.step), 'split': config.data.eval_split, **summary,
              'class_names': names, 'boundary_dilation_ratio': config.eval.boundary_dilation_ratio,
              **count_lists(counts)}
    cm = counts['confusion_matrix']
    if jax.process_index() == 0:
        print(metrics.format_table(summary, names))
        eval_dir = os.path.join(args.workdir, 'eval')
        write_json(os.path.join(eval_dir, 'metrics.json'), result)
        visualize.plot_confusion_matrix(cm, names, os.path.join(eval_dir, 'confusion_matrix.png'))
        print(f'wrote {eval_dir}/metrics.json and {eval_dir}/confusion_matrix.png')
    return result


def format_grouped(summary: dict[str, float]) -> str:
    """{'bbox/AP': .., 'segm/AP': ..} -> a table, one row per prefix, one column per metric."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in summary.items():
        group, _, name = key.rpartition('/')
        rows.setdefault(group, {})[name] = value
    columns = list(dict.fromkeys(name for row in rows.values() for name in row))
    lines = [f'{"":<8}' + ''.join(f'{c:>9}' for c in columns)]
    lines += [f'{group:<8}' + ''.join(f'{row.get(c, float("nan")):>9.4f}' for c in columns)
              for group, row in rows.items()]
    return '\n'.join(lines)


def report_trainer_metrics(trainer, state, builder, config, mesh, workdir: str) -> dict:
    """The trainer's own metrics of the checkpoint (trainers.Trainer.evaluate), printed and
    written to <workdir>/eval/metrics.json (-1: no ground truth of that kind, COCO's rule)."""
    summary = trainer.evaluate(state, builder, config, mesh)
    result = {'step': int(state.step), 'split': config.data.eval_split, **summary}
    if jax.process_index() == 0:
        print(format_grouped(summary))
        write_json(os.path.join(workdir, 'eval', 'metrics.json'), result)
        print(f'wrote {workdir}/eval/metrics.json')
    return result


def search_and_report(state, model, builder, config, mesh, settings, workdir: str) -> dict:
    """crf_grid_search, then the best setting (by mIoU) printed and all written as JSON."""
    results = crf_grid_search(state, model, builder, config, mesh, settings)
    best = max(results[1:], key=lambda r: r['miou'])
    result = {'step': int(state.step), 'split': config.data.eval_split, 'results': results,
              'best': best}
    if jax.process_index() == 0:
        print(f'crf grid: best mIoU {best["miou"]:.4f} (no CRF {results[0]["miou"]:.4f}): '
              f'{crf_overrides(best["crf"])}')
        write_json(os.path.join(workdir, 'eval', 'crf_grid.json'), result)
    return result


def run() -> None:
    main(sys.argv[1:])


if __name__ == '__main__':
    run()
