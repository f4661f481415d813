"""Every command shown in README.md and docs/*.md, checked and run as a user would run it.

The commands are the fenced ```bash blocks. A block directly preceded by the line
`<!-- docs-test: skip: <reason> -->` is not run (the reason is required: it needs the VOC or
Cityscapes archives, a cluster, root, ...); every other block is run by the slow test.

The slow test (`pytest -m docs`; plain `pytest` and CI's
`-m "slow and not docs and not long"` deselect it) runs the blocks
- each with `bash -e`, as written, in one temporary directory laid out like a clone's root
  (copies of experiments/, benchmarks/ without results/, docs/, README.md, requirements*.txt,
  pyproject.toml, setup.cfg), the README's blocks first and then each docs page's, pages in
  file-name order, every file's blocks in order: a block may use what the README's blocks and the
  earlier blocks of its own page made (runs/demo from the README's main job), never another
  page's;
- with segjax imported from this checkout (PYTHONPATH), as requirements.txt's `-e .` installs it;
  a line that starts with `pip install` is not re-run, since this test's environment is already
  installed: of `pip install ... && command` only `command` runs, a bare `pip install` line is
  dropped;
- with TFDS_DATA_DIR (TFDS's own variable; configs leave data.data_dir None, TFDS's default) set
  to an empty temporary directory, so the embedded data set generates itself as on a fresh
  machine and nothing is written to ~/tensorflow_datasets;
- without the 8 forced CPU devices that tests/conftest.py puts into XLA_FLAGS: the commands see
  the machine's devices, as in a user's shell.

The fast tests run nothing: skip markers and blocks parse, the README is within its size, every
`python -m segjax.X` module and every experiments/, benchmarks/, docs/, segjax/, tests/ path named
exists, every experiment file has its row in the README's table, every command's `--config.*`
overrides load with its experiment (segjax.config.load checks keys, types and callables'
options), every `--config.key` named elsewhere is a key of some experiment, and relative links
and their #anchors resolve. They print the skipped blocks with their reasons.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import inspect
import os
import re
import shlex
import shutil
import subprocess

import ml_collections
import pytest

from segjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_LIMIT = 12_000  # characters: the README is a quick start and a map (issue 20)
SKIP_MARKER = re.compile(r'^<!-- docs-test: skip:(.*)-->$')
FENCE = re.compile(r'^```(\S*)\s*$')
# Fence languages allowed: commands go in bash blocks (run), code in python, printed output in
# text, trees in plain ones.
FENCE_LANGUAGES = ('bash', 'python', 'text', '')
# Written on purpose as mistakes, to show the errors segjax gives for them.
DELIBERATE_TYPOS = ('optimizer.lrr', 'loss.gama', 'optimizer.learning_rate')
# What a clone's root holds that the commands read (segjax itself comes from PYTHONPATH).
CLONE_FILES = ('README.md', 'requirements.txt', 'requirements-test.txt', 'pyproject.toml',
               'setup.cfg')
CLONE_DIRS = ('experiments', 'benchmarks', 'docs')
BLOCK_TIMEOUT_S = 3600  # the README's main job: 2-5 min on 2 idle cores, 10+ when shared


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced ```bash block: where it is, its text, and why it is skipped (None: it runs)."""

    path: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    text: str
    skip_reason: str | None

    @property
    def name(self) -> str:
        return f'{self.path}:{self.line}'


def doc_paths() -> list[str]:
    """README.md first, then docs/*.md in file-name order (the order the slow test runs)."""
    pages = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
    return ['README.md', *pages]


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
        return f.read()


def parse_blocks(path: str, text: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """(bash blocks, fence languages with their lines); a malformed marker is a ValueError."""
    blocks, fences, lines = [], [], text.split('\n')
    i = 0
    while i < len(lines):
        line = lines[i]
        if 'docs-test' in line:
            match = SKIP_MARKER.match(line.strip())
            if not match:
                raise ValueError(f'{path}:{i + 1}: a docs-test marker must read exactly '
                                 f'"<!-- docs-test: skip: <reason> -->", got {line.strip()!r}')
            if not match.group(1).strip():
                raise ValueError(f'{path}:{i + 1}: skip marker without a reason')
            if i + 1 >= len(lines) or lines[i + 1].strip() != '```bash':
                raise ValueError(f'{path}:{i + 1}: a skip marker must be the line right before '
                                 'a ```bash block')
        fence = FENCE.match(line)
        if fence:
            start, language = i, fence.group(1)
            i += 1
            while i < len(lines) and lines[i].rstrip() != '```':
                i += 1
            if i == len(lines):
                raise ValueError(f'{path}:{start + 1}: code block never closed')
            fences.append((start + 1, language))
            if language == 'bash':
                marker = SKIP_MARKER.match(lines[start - 1].strip()) if start else None
                blocks.append(Block(path, start + 1, '\n'.join(lines[start + 1:i]),
                                    marker.group(1).strip() if marker else None))
        i += 1
    return blocks, fences


@functools.cache
def all_blocks() -> tuple[Block, ...]:
    return tuple(b for path in doc_paths() for b in parse_blocks(path, read(path))[0])


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r'^```.*?^```[ \t]*$', '', text, flags=re.M | re.S)


def without_pip_install(script: str) -> str:
    """The script with `pip install` not re-run: `pip install ... && cmd` keeps `cmd`."""
    kept = []
    for line in script.split('\n'):
        if line.lstrip().startswith('pip install'):
            if '&&' not in line:
                continue
            line = line.split('&&', 1)[1].strip()
        kept.append(line)
    return '\n'.join(kept)


def commands(script: str) -> list[list[str]]:
    """The script's simple commands as argument lists (continuations joined, comments dropped)."""
    joined = re.sub(r'\\\n', ' ', script)
    result = []
    for line in joined.split('\n'):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # e.g. a heredoc's Python line with an apostrophe
            continue
        command = []
        for word in words + [';']:
            if word in (';', '&&', '||', '&', '|'):
                if command:
                    result.append(command)
                command = []
            else:
                command.append(word)
    return result


# ---------------------------------------------------------------------------------------------
# Fast checks: nothing runs.


def test_blocks_and_skip_markers_parse(capsys):
    blocks = all_blocks()
    assert any(b.path == 'README.md' and b.skip_reason is None for b in blocks)
    for path in doc_paths():
        _, fences = parse_blocks(path, read(path))
        odd = [(line, language) for line, language in fences if language not in FENCE_LANGUAGES]
        assert not odd, (f'{path}: fences {odd}: commands go in ```bash blocks (run by this '
                         f'test), code in ```python, output in ```text, trees in plain ```')
        if path.startswith('docs/'):
            first_fence = next((language for _, language in fences), None)
            first_block = next(b for b in all_blocks() if b.path == path)
            assert first_fence == 'bash' and first_block.skip_reason is None, (
                f'{path} must start with a short runnable ```bash example')
    skipped = [b for b in blocks if b.skip_reason is not None]
    with capsys.disabled():
        print(f'\n{len(blocks) - len(skipped)} bash blocks run by the slow docs test; '
              f'{len(skipped)} skipped:')
        for b in skipped:
            print(f'  {b.name}: {b.skip_reason}')


def test_readme_is_a_quick_start():
    text = read('README.md')
    assert len(text) <= README_LIMIT, f'README.md is {len(text):,} characters (<= {README_LIMIT:,})'
    # The two set-up commands, verbatim and first: .ci/run and users copy them.
    first, second = [b.text for b in all_blocks() if b.path == 'README.md'][:2]
    assert first == ('pip install -r requirements.txt && python -m segjax.train --config '
                     'experiments/unet_synthetic.py --workdir runs/demo')
    assert second == 'pip install -r requirements.txt -r requirements-test.txt && pytest'


def test_every_experiment_is_in_the_readme_table():
    table = re.findall(r'^\| `(experiments/[\w.]+\.py)` \|', read('README.md'), flags=re.M)
    files = sorted(os.path.relpath(p, ROOT)
                   for p in glob.glob(os.path.join(ROOT, 'experiments', '*.py')))
    assert sorted(table) == files


def module_exists(module: str) -> bool:
    base = os.path.join(ROOT, *module.split('.'))
    return os.path.isfile(base + '.py') or os.path.isfile(os.path.join(base, '__main__.py'))


def test_named_modules_and_paths_exist():
    missing = []
    for path in doc_paths():
        text = read(path)
        for module in re.findall(r'python -m (segjax(?:\.\w+)+)', text):
            if not module_exists(module):
                missing.append(f'{path}: python -m {module}')
        for named in re.findall(r'(?<![\w/.])((?:experiments|benchmarks|docs|segjax|tests)/'
                                r'[\w./{},*-]*)', text):
            patterns = expand_braces(named.rstrip('.,'))
            if not all(re.search(r'(/|\.\w+)$', p) for p in patterns):
                continue  # prose such as 'segjax/PyTorch', not a path
            if not any(glob.glob(os.path.join(ROOT, p)) for p in patterns):
                missing.append(f'{path}: {named}')
    assert not missing, 'named in the docs but not in the repository:\n' + '\n'.join(missing)


def expand_braces(pattern: str) -> list[str]:
    """'a_{x,y}.py' -> ['a_x.py', 'a_y.py'] (one level per brace pair)."""
    match = re.search(r'\{([^{}]*)\}', pattern)
    if not match:
        return [pattern]
    return [p for choice in match.group(1).split(',')
            for p in expand_braces(pattern[:match.start()] + choice + pattern[match.end():])]


def config_arguments(command: list[str]) -> tuple[str | None, list[str]]:
    """(the --config file, its overrides without the --config. prefix) of a segjax command."""
    path, overrides = None, []
    for i, word in enumerate(command):
        if word == '--config' and i + 1 < len(command):
            path = command[i + 1]
        elif word.startswith('--config='):
            path = word.split('=', 1)[1]
        elif word.startswith('--config.'):
            overrides.append(word[len('--config.'):])
    return path, overrides


def test_every_command_config_loads_with_its_overrides():
    checked, failures = 0, []
    for block in all_blocks():
        for command in commands(without_pip_install(block.text)):
            path, overrides = config_arguments(command)
            if path is None or not os.path.isfile(os.path.join(ROOT, path)):
                continue  # a placeholder (--config ...) or a file the block itself writes
            try:
                config_lib.load(os.path.join(ROOT, path), overrides)
            except config_lib.ConfigError as e:
                failures.append(f'{block.name}: {e}')
            checked += 1
    assert checked >= 10
    assert not failures, '\n'.join(failures)


@functools.cache
def experiment_configs() -> tuple[ml_collections.ConfigDict, ...]:
    paths = sorted(glob.glob(os.path.join(ROOT, 'experiments', '*.py')))
    return (config_lib.defaults(), *(config_lib.load(p) for p in paths))


def key_is_known(config: ml_collections.ConfigDict, key: str) -> bool:
    """Whether `a.b.c` is a field of config, or an option of the callable its section names."""
    node = config
    for part in key.split('.'):
        if isinstance(node, ml_collections.ConfigDict) and part in node:
            node = node[part]
        elif isinstance(node, ml_collections.ConfigDict) and callable(node.get('fn')):
            parameters = inspect.signature(node['fn']).parameters
            return part in parameters or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        else:
            return False
    return True


def test_config_keys_named_in_prose_exist():
    unknown = []
    for path in doc_paths():
        for key in re.findall(r'--config\.([\w.]+)', prose(read(path))):
            key = key.rstrip('.')
            if key in DELIBERATE_TYPOS:
                continue
            if not any(key_is_known(c, key) for c in experiment_configs()):
                unknown.append(f'{path}: --config.{key}')
    assert not unknown, 'config keys no experiment knows:\n' + '\n'.join(unknown)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a markdown file's headings."""
    anchors, seen = set(), {}
    for line in prose(text).split('\n'):
        match = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
        if not match:
            continue
        slug = re.sub(r'[^\w\- ]', '', match.group(1).strip().lower()).replace(' ', '-')
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f'{slug}-{count}')
    return anchors


def test_links_and_anchors_resolve():
    broken = []
    for path in doc_paths():
        text = prose(read(path))
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z]+:', target):
                continue  # http(s), mailto
            file_part, _, anchor = target.partition('#')
            linked = (os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                      if file_part else path)
            if not os.path.exists(os.path.join(ROOT, linked)):
                broken.append(f'{path}: ({target}): no file {linked}')
            elif anchor and anchor not in heading_anchors(read(linked)):
                broken.append(f'{path}: ({target}): no heading #{anchor} in {linked}')
    assert not broken, '\n'.join(broken)


def test_helpers_on_hand_made_input():
    text = ('intro\n<!-- docs-test: skip: needs a cluster -->\n```bash\nsrun x\n```\n'
            '```bash\npip install -r r.txt && python -m segjax.train --config e.py \\\n'
            "    --config.a.b='(1, 2)'\npip install y\n```\n```python\nx = 1\n```\n")
    blocks, fences = parse_blocks('x.md', text)
    assert [(b.line, b.skip_reason) for b in blocks] == [(3, 'needs a cluster'), (6, None)]
    assert fences == [(3, 'bash'), (6, 'bash'), (11, 'python')]
    script = without_pip_install(blocks[1].text)
    assert script == "python -m segjax.train --config e.py \\\n    --config.a.b='(1, 2)'"
    assert commands(script) == [['python', '-m', 'segjax.train', '--config', 'e.py',
                                 '--config.a.b=(1, 2)']]
    assert config_arguments(commands(script)[0]) == ('e.py', ['a.b=(1, 2)'])
    for bad in ('<!-- docs-test: skip: -->\n```bash\nx\n```\n',
                '<!-- docs-test: skip: why -->\n\n```bash\nx\n```\n',
                '<!-- docs-test: skp: why -->\n```bash\nx\n```\n'):
        with pytest.raises(ValueError):
            parse_blocks('bad.md', bad)
    assert expand_braces('e/{a,b}_{x,y}.py') == ['e/a_x.py', 'e/a_y.py', 'e/b_x.py', 'e/b_y.py']
    assert heading_anchors('# A b\n## Pascal VOC 2012 (+ SBD) and X\n## A b\n') == {
        'a-b', 'pascal-voc-2012--sbd-and-x', 'a-b-1'}
    unet = config_lib.load(os.path.join(ROOT, 'experiments', 'unet_synthetic.py'))
    assert key_is_known(unet, 'optimizer.weight_decay') and key_is_known(unet, 'eval.crf')
    assert key_is_known(unet, 'loss.label_smoothing')  # an option cross_entropy takes
    assert not key_is_known(unet, 'optimizer.lrr') and not key_is_known(unet, 'data.crop_sise')


# ---------------------------------------------------------------------------------------------
# Slow: every runnable block, as written.


@pytest.fixture(scope='module')
def clone(tmp_path_factory):
    """(working directory laid out like a clone's root, environment) shared by all blocks."""
    root = tmp_path_factory.mktemp('docs_clone')
    workdir = root / 'segjax'
    workdir.mkdir()
    for name in CLONE_FILES:
        shutil.copy(os.path.join(ROOT, name), workdir / name)
    for name in CLONE_DIRS:
        shutil.copytree(os.path.join(ROOT, name), workdir / name,
                        ignore=shutil.ignore_patterns('__pycache__', 'results'))
    env = dict(os.environ)
    env['TFDS_DATA_DIR'] = str(root / 'tensorflow_datasets')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
    xla_flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                       env.get('XLA_FLAGS', '')).strip()
    if xla_flags:
        env['XLA_FLAGS'] = xla_flags
    else:
        env.pop('XLA_FLAGS', None)
    return workdir, env


@pytest.mark.slow
@pytest.mark.docs
@pytest.mark.parametrize('block', all_blocks(), ids=lambda b: b.name)
def test_block_runs(block, clone):
    if block.skip_reason is not None:
        pytest.skip(f'{block.name}: {block.skip_reason}')
    workdir, env = clone
    script = without_pip_install(block.text)
    result = subprocess.run(['bash', '-e', '-c', script], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, (
        f'{block.name} exited {result.returncode}:\n{block.text}\n--- stdout (end):\n'
        f'{result.stdout[-3000:]}\n--- stderr (end):\n{result.stderr[-3000:]}')
