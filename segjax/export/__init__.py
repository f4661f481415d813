"""Deployable models from checkpoints: python -m segjax.export (cli.py).

serving.py builds the function every format holds (uint8 images in, class map and probabilities
out), formats.py writes it through the converters (jax.export, jax2tf, the TFLite converter,
tf2onnx), artefact.py loads and runs what was written. Nothing heavy is imported here.
"""
