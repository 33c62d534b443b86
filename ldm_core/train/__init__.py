"""Training for the built-in model: the shapes world (`shapes`), its image analyser (`analyser`), the
from-scratch recipe (`builtin`) and the evaluation harness (`evaluate`). Run `python -m ldm_core.train
--help` for the command line."""
