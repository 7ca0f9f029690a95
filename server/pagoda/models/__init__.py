from pagoda.models.registry import build_model
from pagoda.models.spec import ModelSpec

__all__ = ["ModelSpec", "build_model"]
