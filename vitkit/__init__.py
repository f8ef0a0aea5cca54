"""vitkit: train, finetune, validate and deploy Vision Transformers in PyTorch."""
from vitkit.models import ViTConfig, VisionTransformer, list_models
from vitkit.weights import create_model, model_info

__version__ = "0.1.0"
__all__ = ["ViTConfig", "VisionTransformer", "create_model", "list_models", "model_info", "__version__"]
