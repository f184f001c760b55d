"""The only package that imports torchtitan. Shims are installed before anything else."""

from phi4_engine.titan import compat

compat.install()
