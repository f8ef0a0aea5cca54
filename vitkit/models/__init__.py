from vitkit.models.registry import (
    ModelName,
    ModelSpec,
    create_model,
    get_spec,
    list_models,
    resolve_model,
    resolve_model_name,
)
from vitkit.models.vit import ViTConfig, VisionTransformer, resample_pos_embed

__all__ = ["ModelName", "ModelSpec", "ViTConfig", "VisionTransformer", "create_model", "get_spec", "list_models",
           "resample_pos_embed", "resolve_model", "resolve_model_name"]
