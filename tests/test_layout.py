"""The house: segjax's modules import each other without circles (counting imports inside
functions too), so each can be read and tested from the bottom up."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'segjax')


def module_name(path: str) -> str:
    relative = os.path.relpath(path, ROOT)[:-len('.py')].replace(os.sep, '.')
    return relative[:-len('.__init__')] if relative.endswith('.__init__') else relative


def imported_modules(path: str, modules: set[str]) -> set[str]:
    """The segjax modules `path` imports anywhere in it (`from a import b` counts a.b when that
    is a module, else a)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f'{node.module}.{alias.name}'
                found.add(child if child in modules else node.module)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = [os.path.join(d, f) for d, _, files in os.walk(PACKAGE) for f in files
             if f.endswith('.py')]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) - {module_name(p)} for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 'open':
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = 'done'
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_segjax_has_no_import_cycles():
    graph = import_graph()
    assert 'segjax.config' in graph and 'segjax.trainers.adversarial' in graph
    assert 'segjax.sharding' in graph['segjax.cli']
    assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))
