"""Device meshes and the logical-axis → mesh-axis rules table."""

from moee_jax.parallel.mesh import MESH_AXES, make_mesh, resolve_mesh_shape
from moee_jax.parallel.rules import DEFAULT_RULES, logical_rules

__all__ = ["MESH_AXES", "make_mesh", "resolve_mesh_shape", "DEFAULT_RULES", "logical_rules"]
