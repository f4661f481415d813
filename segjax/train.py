"""python -m segjax.train --config experiments/<name>.py --workdir <dir> [--config.key=value]

Trains, evaluates, checkpoints and logs an experiment. Run the same command again to resume from
the latest checkpoint in <workdir>; Ctrl-C or SIGTERM saves at the next step and exits cleanly.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from segjax import (
    checkpoint,
    cli,
    experiment,
    logs,
    metrics,
    optim,
    pretrained,
    sharding,
    step,
    visualize,
)
from segjax import config as config_lib
from segjax.data import prepare
from segjax.evaluate import (
    count_lists,
    counts_over_split,
    eval_batches,
    make_eval_fn,
    summarize_counts,
    write_json,
)
from segjax.summary import Writer, Writers, make_writers

# The dataset-level metrics every evaluation writes as `val/<name>` (`val_ema/<name>` with EMA);
# a sweep's objective is one of these (or a class's `val/iou/<class>`).
EVAL_SCALARS = ('miou', 'pixel_accuracy', 'mean_accuracy', 'mdice', 'fwiou', 'boundary_miou')


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class StopRequest:
    """Turns SIGTERM / the first Ctrl-C into a flag the loop checks at each step boundary.

    With several processes, JAX's preemption service (started by jax.distributed.initialize)
    owns SIGTERM and every process stops at the same step via `reached_preemption_sync_point`.
    """

    def __init__(self):
        self.requested = False
        signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = True
        print(f'\n{signal.Signals(signum).name}: saving a checkpoint at the next step, '
              'then exiting (Ctrl-C again to abort)', flush=True)

    def should_stop(self, step_number: int) -> bool:
        if jax.process_count() > 1:
            self.requested |= multihost_utils.reached_preemption_sync_point(step_number)
        return self.requested

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def weights_memory(state: step.TrainState, mode: str) -> str:
    """'<MiB> MiB params + optimizer state per device (<mode>[; <MiB> MiB in all])', measured on
    the arrays' shards on this process's devices (the whole named where a device holds less)."""
    weights = (state.params, state.opt_state)
    whole = sum(x.nbytes for x in jax.tree.leaves(weights))
    per_device = sharding.bytes_per_device(weights)
    in_all = f'; {whole / 2**20:.3g} MiB in all' if per_device < whole else ''
    return (f'{per_device / 2**20:.3g} MiB params + optimizer state per device '
            f'({mode}{in_all})')


def summary_images(state, batch: dict, predict_fn, config: ml_collections.ConfigDict,
                   mesh) -> np.ndarray:
    """Input | ground truth | prediction, colour-coded, for the first few eval images."""
    n = config.num_summary_images
    pred = sharding.to_local(predict_fn(state, sharding.to_global(batch, mesh)['image']), mesh)
    palette = experiment.palette(config)
    rows = []
    for image, label, p in zip(batch['image'][:n], batch['label'][:n], pred[:n], strict=False):
        rgb = visualize.denormalize(image, config.data.mean, config.data.std)
        rows.append(visualize.side_by_side(
            rgb, visualize.overlay(rgb, visualize.color_mask(label, palette)),
            visualize.overlay(rgb, visualize.color_mask(p, palette))))
    return np.stack(rows)


def train(config: ml_collections.ConfigDict, workdir: str,
          extra_writers: Sequence[Writer] = ()) -> dict:
    """Runs (or resumes) the experiment to config.num_steps; returns the final metrics.

    `extra_writers` receive every scalar and image TensorBoard does (a sweep reports the
    validation mIoU to its study through one).
    """
    start_time = time.time()
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh()
    local_batch = sharding.local_batch_size(config.batch_size,
                                           micro_batches=config.grad_accum_steps)
    model = experiment.make_model(config)
    tx, schedule = optim.make(config)
    trainer = experiment.make_trainer(config, model, tx)
    builder = experiment.dataset_builder(config)
    names = experiment.class_names(config)

    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    init, abstract_state = experiment.initial_state(trainer, mesh, config)
    mngr = checkpoint.manager(experiment.checkpoint_dir(workdir),
                              max_to_keep=config.keep_checkpoints)
    state = checkpoint.restore(mngr, abstract_state)
    if state is None:
        state = init(init_rng)
        if config.pretrained:
            state = experiment.load_pretrained(state, config.pretrained)
    first_step = int(state.step)
    if is_main:
        num_params = sum(x.size for x in jax.tree.leaves(state.params))
        print(f'{"resuming at" if first_step else "starting"} step {first_step}/{config.num_steps}'
              f' | {num_params:,} parameters | {weights_memory(state, config.sharding)} | '
              f'{jax.device_count()} devices, {jax.process_count()} processes | global batch '
              f'{config.batch_size}', flush=True)

    state_shardings = experiment.state_shardings(mesh, state, config)
    # What the trainer holds fixed (a distillation teacher's weights), on its own shardings.
    frozen = () if trainer.load_frozen is None else (trainer.load_frozen(mesh),)
    train_step = jax.jit(
        trainer.step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh),
                      *[jax.tree.map(lambda x: x.sharding, f) for f in frozen]),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0)
    eval_fn = make_eval_fn(config, model, mesh)
    predict_fn = jax.jit(functools.partial(
        step.predict_step, model=model, inference_options=experiment.inference_options(config)))
    if trainer.train_batches is not None:  # the trainer's own data (instance annotations)
        batches = trainer.train_batches(config, builder, local_batch_size=local_batch,
                                        start_step=first_step)
    else:
        batches = experiment.train_batches(config, builder, local_batch_size=local_batch,
                                           start_step=first_step,
                                           unlabelled_images=trainer.unlabelled_images)
    writer = Writers([*make_writers(config, workdir), *extra_writers])

    def evaluate_weights(weights, step_number: int, prefix: str) -> dict:
        if trainer.evaluate is not None:  # the trainer's own metrics (COCO AP)
            summary = trainer.evaluate(weights, builder, config, mesh)
            writer.scalars(step_number, {f'{prefix}/{k}': v for k, v in summary.items()})
            if is_main:
                print(f'eval{"" if prefix == "val" else " (EMA weights)"} @ {step_number}: '
                      + ' | '.join(f'{k} {v:.4f}' for k, v in summary.items()), flush=True)
            return {'step': step_number, **summary}
        counts = counts_over_split(weights, eval_fn, builder, config, mesh)
        summary = summarize_counts(counts, names)
        writer.scalars(step_number, {f'{prefix}/{k}': summary[k] for k in EVAL_SCALARS})
        writer.scalars(step_number, {f'{prefix}/iou/{name}': iou for name, iou in zip(
            names, summary['per_class_iou'], strict=True)})
        writer.scalars(step_number, {f'{prefix}/boundary_iou/{name}': iou for name, iou in zip(
            names, summary['per_class_boundary_iou'], strict=True)})
        if config.num_summary_images > 0:
            writer.images(step_number, f'{prefix}/input_truth_prediction', summary_images(
                weights, next(eval_batches(builder, config)), predict_fn, config, mesh))
        if is_main:
            print(f'eval{"" if prefix == "val" else " (EMA weights)"} @ {step_number}: '
                  f'mIoU {summary["miou"]:.4f} | pixel acc {summary["pixel_accuracy"]:.4f} | '
                  f'mDice {summary["mdice"]:.4f} | boundary mIoU {summary["boundary_miou"]:.4f}',
                  flush=True)
        return {'step': step_number, 'counts': counts, **summary}

    def run_eval(step_number: int) -> dict:
        result = evaluate_weights(state, step_number, 'val')
        if config.ema_decay:
            result['ema'] = evaluate_weights(step.ema_view(state), step_number, 'val_ema')
        return result

    stop = StopRequest()
    last_eval, previous_stats = None, None
    window_start, window_steps = time.time(), 0
    try:
        for step_number in range(first_step + 1, config.num_steps + 1):
            batch = sharding.to_global(next(batches), mesh)
            state, stats = train_step(state, batch, train_rng, *frozen)
            window_steps += 1
            # The previous step's counter: reading it does not wait for the step just queued.
            if previous_stats is not None and (
                    int(previous_stats['nonfinite_run']) >= config.max_nonfinite_steps):
                raise NonFiniteError(
                    f'{config.max_nonfinite_steps} consecutive steps had a non-finite loss or '
                    f'gradient (skipped, parameters unchanged), the last at step '
                    f'{step_number - 1}; the newest checkpoint is step {mngr.latest_step()}. '
                    'Lower config.optimizer.lr, check the data, or raise '
                    'config.max_nonfinite_steps.')
            previous_stats = stats
            is_last = step_number == config.num_steps
            stopping = stop.should_stop(step_number)
            if step_number % config.log_every == 0 or is_last or stopping:
                stats = {k: float(v) for k, v in jax.device_get(stats).items()}
                elapsed = time.time() - window_start
                images_per_s = window_steps * config.batch_size / elapsed
                stats.update(lr=float(schedule(step_number - 1)), images_per_s=images_per_s)
                writer.scalars(step_number, {f'train/{k}': v for k, v in stats.items()})
                if is_main:
                    eta = (config.num_steps - step_number) * elapsed / window_steps
                    terms = ''.join(f' | {k[5:]} {v:.4f}' for k, v in stats.items()
                                    if k.startswith('loss/'))
                    skipped = (f' | skipped {int(stats["skipped_steps"])}'
                               if stats['skipped_steps'] else '')
                    if 'discriminator/real_accuracy' in stats:
                        terms += (f' | D acc real {stats["discriminator/real_accuracy"]:.2f} '
                                  f'fake {stats["discriminator/fake_accuracy"]:.2f}')
                    # Trainers without pixel labels (instance segmentation) report none.
                    accuracy = (f' | acc {stats["pixel_accuracy"]:.3f}'
                                if 'pixel_accuracy' in stats else '')
                    print(f'step {step_number}/{config.num_steps} | loss {stats["loss"]:.4f}'
                          f'{terms}{accuracy} | lr {stats["lr"]:.2e} | '
                          f'{images_per_s:.1f} img/s | ETA {logs.format_seconds(eta)}{skipped}',
                          flush=True)
                window_start, window_steps = time.time(), 0
            if is_last or (config.eval_every and step_number % config.eval_every == 0):
                last_eval = run_eval(step_number)
                window_start, window_steps = time.time(), 0  # eval time is not training speed
            if is_last or stopping or step_number % config.checkpoint_every == 0:
                checkpoint.save(mngr, step_number, state)
            if stopping:
                break
        if last_eval is None and not stop.requested:
            # Resumed an already finished run, or 0 steps: evaluate what is there, while the
            # writers are open.
            last_eval = run_eval(int(state.step))
    finally:
        stop.restore()
        mngr.wait_until_finished()  # never exit with a save half-written
        mngr.close()
        writer.close()

    if stop.requested:
        if is_main:
            print(f'stopped at step {int(state.step)}; run the same command to resume', flush=True)
        return {}
    result = {key: value for key, value in last_eval.items() if key != 'counts'}
    if 'ema' in result:
        result['ema'] = {k: v for k, v in result['ema'].items() if k != 'counts'}
    counts = count_lists(last_eval['counts']) if 'counts' in last_eval else {}
    result.update(class_names=names, **counts,
                  skipped_steps=int(state.skipped_steps),
                  wall_seconds_this_run=time.time() - start_time)
    if is_main:
        write_json(os.path.join(workdir, 'metrics.json'), result)
        if counts:  # a confusion matrix's per-class table (instance metrics print at eval)
            print(metrics.format_table(last_eval, names))
        print(f'done in {logs.format_seconds(time.time() - start_time)}; metrics in '
              f'{workdir}/metrics.json, TensorBoard: tensorboard --logdir {workdir}', flush=True)
    return result


def main(argv: Sequence[str]) -> dict:
    parser = cli.argument_parser('segjax.train', __doc__.splitlines()[2])
    args, config = cli.parse(parser, argv)
    os.makedirs(args.workdir, exist_ok=True)
    try:
        return train(config, args.workdir)
    except config_lib.ConfigError as e:
        parser.exit(2, f'segjax.train: error: {e}\n')
    except (NonFiniteError, pretrained.PretrainedError, prepare.PrepareError) as e:
        parser.exit(1, f'segjax.train: error: {e}\n')


def run() -> None:
    main(sys.argv[1:])


if __name__ == '__main__':
    run()
