"""The op families fxmerge understands, each declared once in its own module: its targets,
canonical form, rewrites, affine reading, refusal and label. Families are tried in the order
they register, so the modules are imported in that order here. `capture.registry` holds
what a family is and the lookups."""

# isort: off
from . import conv, norm, activation, linear, identity, barriers  # noqa: F401 (registers)
# isort: on
