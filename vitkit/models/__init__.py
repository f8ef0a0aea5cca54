from vitkit.models.registry import ModelSpec, create_model, get_spec, list_models, model_info
from vitkit.models.vit import ViTConfig, VisionTransformer, resample_pos_embed

__all__ = ["ModelSpec", "ViTConfig", "VisionTransformer", "create_model", "get_spec", "list_models",
           "model_info", "resample_pos_embed"]
