"""The only package that imports torchtitan. Shims are installed before anything else."""

from phi4_engine.titan import compat, safe_metadata

compat.install()
safe_metadata.install()  # DCP .metadata pickles: only DCP's own classes are rebuilt
