"""The GLM network, its masks and position ids, and tensor-parallel layers."""
from glmctl.model.glm import GLM, KVCache, StaticKVCache, apply_rope, rope_cos_sin  # noqa: F401
from glmctl.model import masks  # noqa: F401
