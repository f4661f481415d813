"""Every benchmark in one command, collected into one JSON and one markdown file.

    python benchmarks/run_all.py                    # full sizes: 16-25 min on 2 cores
    python benchmarks/run_all.py --quick            # tiny sizes: checks the whole chain runs
    python benchmarks/run_all.py --out /tmp/bench   # default --out: benchmarks/results

Runs, each as its own subprocess (a fresh process: timings do not interfere and each applies
segjax's XLA flags itself):
  train_step.py      training step, inference, FLOPs, MFU of the four models
  peer_pytorch.py    the same against PyTorch (three runs: U-Net and DeepLabV3+ against eager,
                     channels_last and bfloat16 autocast; the U-Net against torch.compile, left
                     out with --quick; FCN and PSPNet against eager); skipped with a note when
                     torch is not installed
  input_pipeline.py  tf.data throughput of the VOC and Cityscapes recipes
  sliding_window.py  batched vs per-window-loop sliding-window inference (+ DeepLabV3+ in full)

and writes <out>/<date>.json (everything each printed, parsed, with its command, exit status
and duration) and <out>/<date>.md (the tables as printed), headed by the date, the machine
(CPU model, cores, RAM), the versions (Python, jax, jaxlib, flax, torch) and the XLA_FLAGS in
effect. --quick writes <date>-quick.*; its figures check that things run, they are not
measurements. A benchmark that fails is recorded with its stderr tail; the others still run.

All of them with tcmalloc preloaded (LD_PRELOAD) when it is installed, and then train_step.py
once more with the system malloc, so the allocator's share is measured too (--malloc system
runs everything with the system malloc).

PyTorch's OpenMP threads slow down badly when another process holds a core: run on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# (name, title, script, full-size arguments, --quick arguments). The full peer comparison is
# split so that it fits in 16-25 minutes on 2 cores: every setting for the two target models,
# torch.compile (minutes of compiling per ResNet model) for the U-Net only, eager for the rest.
QUICK_PEER = ['--batch', '2', '--size', '64', '--repeats', '2']
BENCHMARKS = (
    ('train_step', 'Training step, inference and MFU', 'train_step.py', [],
     ['--batch', '2', '--size', '64', '--repeats', '2', '--matmul_size', '1024']),
    ('peer_pytorch', 'segjax vs PyTorch: U-Net and DeepLabV3+', 'peer_pytorch.py',
     ['--models', 'unet,deeplabv3plus_r50', '--torch', 'eager,channels_last,bf16'],
     ['--models', 'unet,deeplabv3plus_r50', '--torch', 'eager,channels_last', *QUICK_PEER]),
    ('peer_pytorch_compile', 'segjax vs torch.compile: U-Net', 'peer_pytorch.py',
     ['--models', 'unet', '--torch', 'compile'], None),
    ('peer_pytorch_resnets', 'segjax vs PyTorch eager: FCN and PSPNet', 'peer_pytorch.py',
     ['--models', 'fcn_r50,pspnet_r50', '--torch', 'eager', '--repeats', '3'],
     ['--models', 'fcn_r50,pspnet_r50', '--torch', 'eager', *QUICK_PEER]),
    ('input_pipeline', 'Input pipeline', 'input_pipeline.py', [],
     ['--num_train', '4', '--warmup', '1', '--batches', '2']),
    ('sliding_window', 'Sliding-window inference', 'sliding_window.py', ['--deeplab'],
     ['--height', '256', '--width', '256', '--repeats', '1']),
)
WRITES_JSON = ('train_step.py', 'peer_pytorch.py')  # these take --json PATH

# tcmalloc keeps freed memory mapped, so XLA:CPU's large per-step buffers stop page-faulting
# (about 400,000 faults per DeepLabV3+ step with glibc's malloc); Debian: libtcmalloc-minimal4.
TCMALLOC_PATHS = ('/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4',
                  '/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4',
                  '/usr/lib64/libtcmalloc_minimal.so.4', '/usr/lib/libtcmalloc_minimal.so.4')
SYSTEM_MALLOC_ENTRY = ('train_step_system_malloc',
                       "Training step with the system's malloc (glibc), for comparison",
                       'train_step.py', [], None)


def find_tcmalloc() -> str | None:
    return next((path for path in TCMALLOC_PATHS if os.path.exists(path)), None)


def _field(path: str, key: str) -> str | None:
    """The value of the first 'key: value' line of a /proc file."""
    with open(path) as f:
        return next((line.split(':', 1)[1].strip() for line in f if line.startswith(key)), None)


def machine() -> dict:
    cpu = _field('/proc/cpuinfo', 'model name') or platform.processor()
    kib = int(_field('/proc/meminfo', 'MemTotal').split()[0])
    return {'cpu': cpu, 'cores': os.cpu_count(), 'usable_cores': len(os.sched_getaffinity(0)),
            'ram_gib': round(kib / 2**20, 1), 'platform': platform.platform()}


def versions() -> dict:
    found = {'python': platform.python_version()}
    for package in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'torchvision', 'tensorflow',
                    'tensorflow-cpu', 'tensorflow-datasets'):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def git_revision() -> str:
    out = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=REPO,
                         capture_output=True, text=True)
    return out.stdout.strip() or 'unknown'


def run(name: str, command: list[str], env: dict) -> dict:
    """Runs one benchmark, echoing its stdout; returns what it printed, parsed by line kind."""
    print(f'\n== {name}: {" ".join(command)}', flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryFile('w+') as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
        lines = []
        for line in process.stdout:
            print(line, end='', flush=True)
            lines.append(line.rstrip('\n'))
        returncode = process.wait()
        stderr.seek(0)
        stderr_tail = stderr.read().strip().splitlines()[-20:]
    records, table, notes = [], [], []
    for line in lines:
        if line.startswith('{'):
            try:
                records.append(json.loads(line))
                continue
            except json.JSONDecodeError:
                pass
        (table if line.startswith('|') else notes).append(line)
    result = {'command': ' '.join(command), 'returncode': returncode,
              'seconds': round(time.perf_counter() - start, 1), 'records': records,
              'table': table, 'notes': [n for n in notes if n.strip()], 'stdout': lines}
    if returncode != 0:
        result['stderr_tail'] = stderr_tail
        print(f'!! {name} failed (exit status {returncode}):\n' + '\n'.join(stderr_tail),
              flush=True)
    return result


def markdown_section(title: str, result: dict) -> list[str]:
    command = result['command'].replace(sys.executable, 'python')
    lines = [f'## {title}', '', f'`{command}` ({result["seconds"]} s)', '']
    if result.get('skipped'):
        return lines + [f'Skipped: {result["skipped"]}', '']
    lines += [f'    {note}' for note in result['notes']]
    if result['notes']:
        lines.append('')
    if result['table']:
        lines += result['table']
    elif result['records']:  # JSON lines only (input_pipeline.py): tabulate them
        keys = list(result['records'][0])
        lines += ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
        lines += ['| ' + ' | '.join(str(r.get(k, '')) for k in keys) + ' |'
                  for r in result['records']]
    if result['returncode'] != 0:
        lines += ['', f'**Failed** (exit status {result["returncode"]}):', '', '```',
                  *result.get('stderr_tail', []), '```']
    return lines + ['']


def best_float32_torch(peer: dict) -> list[str]:
    """One line per model: the fastest float32 PyTorch setting for training, and the ratio."""
    rows = [r for r in peer.get('data', {}).get('rows', [])
            if 'error' not in r and r['setting'] != 'bf16']
    lines = []
    for model in dict.fromkeys(r['model'] for r in rows):
        best = min((r for r in rows if r['model'] == model), key=lambda r: r['torch_train_s'])
        lines.append(f'- {model}: best float32 PyTorch setting for training is '
                     f'{best["setting"]} ({best["torch_train_s"]} s/step; segjax/torch '
                     f'{best["train_ratio"]}, inference {best["infer_ratio"]})')
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='tiny sizes and few repeats: a smoke check of the whole chain')
    parser.add_argument('--out', default=os.path.join(HERE, 'results'), help='output folder')
    parser.add_argument('--malloc', choices=('tcmalloc', 'system'), default='tcmalloc',
                        help='allocator preloaded into every benchmark (tcmalloc when found; '
                             'then train_step also runs once with the system malloc)')
    args = parser.parse_args()
    tcmalloc = find_tcmalloc() if args.malloc == 'tcmalloc' else None
    if args.malloc == 'tcmalloc' and tcmalloc is None:
        print('tcmalloc not found (apt-get install libtcmalloc-minimal4): using the system '
              'malloc', flush=True)
    benchmarks = BENCHMARKS + ((SYSTEM_MALLOC_ENTRY,) if tcmalloc else ())
    os.makedirs(args.out, exist_ok=True)
    date = datetime.date.today().isoformat()
    stem = os.path.join(args.out, date + ('-quick' if args.quick else ''))
    header = {'date': date, 'mode': 'quick' if args.quick else 'full',
              'machine': machine(), 'versions': versions(), 'git': git_revision(),
              'XLA_FLAGS_env': os.environ.get('XLA_FLAGS'), 'malloc': tcmalloc or 'system',
              'load_avg_1min_start': os.getloadavg()[0]}

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        system_malloc_env = dict(os.environ)
        if args.quick:  # peer_pytorch then reuses train_step's compiled segjax steps
            system_malloc_env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(tmp, 'jax_cache')
        env = system_malloc_env
        if tcmalloc:
            env = {**system_malloc_env, 'LD_PRELOAD': ' '.join(
                filter(None, [tcmalloc, system_malloc_env.get('LD_PRELOAD')]))}
        for name, _, script, full_args, quick_args in benchmarks:
            if args.quick and quick_args is None:
                continue
            command = [sys.executable, os.path.join('benchmarks', script),
                       *(quick_args if args.quick else full_args)]
            if script == 'peer_pytorch.py' and importlib.util.find_spec('torch') is None:
                results[name] = {'command': ' '.join(command), 'seconds': 0, 'returncode': None,
                                 'skipped': 'torch is not installed (pip install torch '
                                            'torchvision)'}
                print(f'\n== {name}: skipped, torch is not installed', flush=True)
                continue
            json_path = os.path.join(tmp, name + '.json')
            if script in WRITES_JSON:
                command += ['--json', json_path]
            results[name] = run(name, command,
                                system_malloc_env if name == SYSTEM_MALLOC_ENTRY[0] else env)
            if os.path.exists(json_path):
                with open(json_path) as f:
                    results[name]['data'] = json.load(f)
    header['load_avg_1min_end'] = os.getloadavg()[0]
    header['XLA_FLAGS_in_effect'] = results['train_step'].get('data', {}).get(
        'xla_flags', header['XLA_FLAGS_env'])

    with open(stem + '.json', 'w') as f:
        json.dump({**header, 'benchmarks': results}, f, indent=1)
    m, v = header['machine'], header['versions']
    lines = [f'# segjax benchmarks, {date}' + (' (quick: tiny sizes, a smoke check, not '
                                                'measurements)' if args.quick else ''), '',
             f'- machine: {m["cpu"]}, {m["cores"]} cores ({m["usable_cores"]} usable), '
             f'{m["ram_gib"]} GiB RAM; {m["platform"]}',
             '- versions: ' + ', '.join(f'{k} {v[k]}' for k in v if v[k]),
             f'- XLA_FLAGS in effect: `{header["XLA_FLAGS_in_effect"]}`; malloc: '
             f'{header["malloc"]}',
             f'- git {header["git"]}; load average (1 min) {header["load_avg_1min_start"]:.2f} '
             f'at start, {header["load_avg_1min_end"]:.2f} at end', '']
    for name, title, script, _, _ in benchmarks:
        if name not in results:
            continue
        lines += markdown_section(f'{title} (benchmarks/{script})', results[name])
        if script == 'peer_pytorch.py' and not results[name].get('skipped'):
            lines += best_float32_torch(results[name]) + ['']
    with open(stem + '.md', 'w') as f:
        f.write('\n'.join(lines))
    print(f'\nwrote {stem}.json and {stem}.md')
    failed = [name for name, r in results.items() if r.get('returncode') not in (0, None)]
    if failed:
        sys.exit(f'failed: {", ".join(failed)}')


if __name__ == '__main__':
    main()
