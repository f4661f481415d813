from segjax.sweep.cli import run

run()
