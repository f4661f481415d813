"""python -m segjax.export: see segjax.export.cli."""

from segjax.export.cli import run

run()
