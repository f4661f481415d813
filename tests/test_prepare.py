"""Preparing a data set from several processes at once: one prepares, the others wait (saying so)
and reuse it; all of them read the same data. And the prepare command (prepare.cli)."""

import fcntl
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from segjax.data import prepare, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = synthetic.SyntheticShapesConfig(name='tiny_race', image_size=16, num_train=24,
                                       num_validation=8, min_object_size=6, max_object_size=12,
                                       seed=5)

# One run: builds TINY into data_dir through prepare.prepared, starting at `start_at` (so that
# two processes begin at the same moment, after their imports), then reads it.
WORKER = '''
import sys, time
from segjax.data import prepare, synthetic
data_dir, start_at = sys.argv[1], float(sys.argv[2])
config = synthetic.SyntheticShapesConfig(name='tiny_race', image_size=16, num_train=24,
                                         num_validation=8, min_object_size=6,
                                         max_object_size=12, seed=5)
make = lambda: synthetic.SyntheticShapes(config=config, data_dir=data_dir)
make()
print('ready', flush=True)
time.sleep(max(0.0, start_at - time.time()))
builder = prepare.prepared(make)
print('train examples', builder.info.splits['train'].num_examples, flush=True)
'''


def start_worker(tmp_path, data_dir, start_at: float) -> subprocess.Popen:
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), str(data_dir), str(start_at)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def starts(output: str, prefix: str) -> int:
    """How many lines of `output` start with `prefix`."""
    return sum(line.startswith(prefix) for line in output.splitlines())


def assert_data_is_tiny(data_dir) -> None:
    """Every stored example is exactly the one the generator makes (PNG is lossless)."""
    builder = synthetic.SyntheticShapes(config=TINY, data_dir=str(data_dir))
    for split, split_id in (('train', 0), ('validation', 1)):
        examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
        assert len(examples) == (TINY.num_train if split == 'train' else TINY.num_validation)
        for ex in examples:
            index = int(ex['image/filename'].decode().split('_')[-1].split('.')[0])
            image, label = synthetic.generate_example(TINY, split_id, index)
            np.testing.assert_array_equal(ex['image'], image)
            np.testing.assert_array_equal(ex['label'][..., 0], label)


@pytest.mark.slow  # a whole run or several processes: CI's slow line
def test_two_processes_prepare_one_fresh_data_dir_at_once(tmp_path):
    data_dir = tmp_path / 'tfds'
    start_at = time.time() + 25  # after both have imported TFDS (slow on a busy machine)
    workers = [start_worker(tmp_path, data_dir, start_at) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
        assert 'train examples 24' in output
        assert 'FileExistsError' not in output and 'Traceback' not in output
    # Exactly one prepared; the other waited for it or found it done.
    assert sum(starts(out, 'preparing synthetic_shapes/tiny_race/1.0.0') for out in outputs) == 1
    assert sum(starts(out, 'waiting for') for out in outputs) <= 1
    assert not [p for p in data_dir.rglob('incomplete*')]
    assert_data_is_tiny(data_dir)


def test_waiting_run_says_so_once_then_prepares(tmp_path):
    data_dir = tmp_path / 'tfds'
    lock = data_dir / '.synthetic_shapes.lock'
    assert os.fspath(prepare.lock_path(synthetic.SyntheticShapes(
        config=TINY, data_dir=str(data_dir)))) == os.fspath(lock)
    data_dir.mkdir()
    with open(lock, 'a') as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run preparing
        worker = start_worker(tmp_path, data_dir, 0.0)
        lines = []
        deadline = time.time() + 240
        while not any(line.startswith('waiting for') for line in lines):
            line = worker.stdout.readline()
            assert line and time.time() < deadline, ''.join(lines)
            lines.append(line)
        time.sleep(1.0)
        assert not (data_dir / 'synthetic_shapes' / 'tiny_race' / '1.0.0').exists()
        fcntl.flock(held, fcntl.LOCK_UN)
    output = ''.join(lines) + worker.communicate(timeout=300)[0]
    assert worker.returncode == 0, output[-3000:]
    waiting = [line for line in output.splitlines() if line.startswith('waiting for')]
    assert waiting == [f'waiting for {lock}: another process is preparing '
                       f'synthetic_shapes/tiny_race/1.0.0 in {data_dir}']
    assert starts(output, 'preparing synthetic_shapes/tiny_race/1.0.0') == 1
    assert_data_is_tiny(data_dir)


def test_prepared_data_is_reused_without_the_lock(tmp_path, capsys):
    make = lambda: synthetic.SyntheticShapes(config=TINY, data_dir=str(tmp_path))  # noqa: E731
    builder = prepare.prepared(make)
    assert builder.info.splits['validation'].num_examples == 8
    assert 'preparing synthetic_shapes/tiny_race/1.0.0' in capsys.readouterr().out
    with open(tmp_path / '.synthetic_shapes.lock', 'a') as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # would block if a prepared data set took the lock
        assert prepare.prepared(make).info.splits['train'].num_examples == 24
    assert capsys.readouterr().out == ''


def test_failure_is_one_line_and_stale_incomplete_dirs_go(tmp_path):
    class Broken(synthetic.SyntheticShapes):
        def _generate_examples(self, split, num_examples):
            yield from super()._generate_examples(split, 2)
            raise OSError(f'disk full while writing {split}\nsecond line')

    stale = tmp_path / 'broken' / 'tiny_race' / 'incomplete.KILLED_1.0.0'
    stale.mkdir(parents=True)  # left by a run that was killed
    with pytest.raises(prepare.PrepareError) as error:
        prepare.prepared(lambda: Broken(config=TINY, data_dir=str(tmp_path)))
    assert str(error.value) == (f'preparing broken/tiny_race/1.0.0 in {tmp_path}: disk full '
                                'while writing train second line')
    assert not [p for p in tmp_path.rglob('incomplete*')]


# ----------------------------------------------------------------------------------------------
# The prepare command every builder's `main` is (prepare.cli).


def test_cli_prepares_then_prints_splits_report_and_where(tmp_path, capsys, default_log_state):
    seen = []

    def make_builder(args):
        seen.append((args.config, args.manual_dir))  # the builder's own flag reaches it
        return synthetic.SyntheticShapes(config=TINY, data_dir=args.data_dir)

    prepare.cli(['--data_dir', str(tmp_path), '--config', 'tiny', '--manual_dir', 'm'],
                prog='python -m tiny', description='Prepare tiny.', manual_files='nothing',
                add_arguments=lambda parser: parser.add_argument('--config'),
                make_builder=make_builder,
                report=lambda builder: print('report:', builder.info.full_name))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f'preparing synthetic_shapes/tiny_race/1.0.0 in {tmp_path} (once; later '
                        'runs reuse it)')
    assert lines[1].startswith('prepared synthetic_shapes/tiny_race/1.0.0 in ')
    # Quiet by default: no TFDS banner between segjax's lines.
    assert lines[2:] == ['train: 24 examples', 'validation: 8 examples',
                         'report: synthetic_shapes/tiny_race/1.0.0',
                         f'prepared in {tmp_path}/synthetic_shapes/tiny_race/1.0.0']
    assert set(seen) == {('tiny', 'm')}


def test_cli_failure_is_one_line_and_exit_code_1(tmp_path, capsys, default_log_state):
    def make_builder(args):
        raise prepare.PrepareError(f'{args.data_dir}/x.zip is truncated; download it again')

    with pytest.raises(SystemExit) as exit_:
        prepare.cli(['--data_dir', str(tmp_path)], prog='python -m broken',
                    description='Prepare broken.', manual_files='x.zip',
                    make_builder=make_builder)
    assert exit_.value.code == 1
    output = capsys.readouterr()
    assert output.out == ''
    assert output.err == (f'python -m broken: error: {tmp_path}/x.zip is truncated; download it '
                          'again\n')


def test_cli_help_names_the_manual_files(capsys):
    with pytest.raises(SystemExit) as exit_:
        prepare.cli(['--help'], prog='python -m tiny', description='Prepare tiny.',
                    manual_files='the two zips', make_builder=None)
    assert exit_.value.code == 0
    help_text = ' '.join(capsys.readouterr().out.split())
    assert ('usage: python -m tiny [-h] [--data_dir DATA_DIR] [--manual_dir MANUAL_DIR] '
            '[--verbose] Prepare tiny.') in help_text
    assert 'directory holding the two zips (default <data_dir>/downloads/manual)' in help_text
