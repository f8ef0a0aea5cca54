"""vitkit: train, finetune, validate and deploy Vision Transformers in PyTorch.

The public names load on first use (PEP 562), so `import vitkit` and `vitkit --help` do not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ViTConfig", "VisionTransformer", "create_model", "list_models", "model_info", "__version__"]
_HOMES = {"ViTConfig": "vitkit.models", "VisionTransformer": "vitkit.models", "list_models": "vitkit.models",
          "create_model": "vitkit.weights", "model_info": "vitkit.weights"}

if TYPE_CHECKING:
    from vitkit.models import ViTConfig, VisionTransformer, list_models
    from vitkit.weights import create_model, model_info


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'vitkit' has no attribute {name!r}")
