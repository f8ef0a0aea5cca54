from vitkit.models.registry import ModelSpec, create_model, get_spec, list_models
from vitkit.models.vit import ViTConfig, VisionTransformer, resample_pos_embed

__all__ = ["ModelSpec", "ViTConfig", "VisionTransformer", "create_model", "get_spec", "list_models",
           "resample_pos_embed"]
