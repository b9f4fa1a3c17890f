"""glmctl: GLM-130B-style language models from the command line.

Python API (stable): ``ModelConfig``, ``GLM``, ``save_model``, ``load_model``.
Heavy imports (torch) happen on first use so that ``glmctl --help`` stays fast.
"""
__version__ = "0.1.0"

__all__ = ["ModelConfig", "GLM", "save_model", "load_model", "__version__"]


def __getattr__(name):  # lazy: keep CLI start-up free of torch
    if name == "ModelConfig":
        from glmctl.config import ModelConfig
        return ModelConfig
    if name == "GLM":
        from glmctl.model import GLM
        return GLM
    if name in ("save_model", "load_model"):
        from glmctl import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(name)
