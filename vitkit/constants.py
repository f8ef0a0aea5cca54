"""Normalization statistics every layer may name (a leaf module): ImageNet's (torchvision, timm) and CIFAR-10's."""
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "area")  # the resize filters vitkit reads
