"""A compact vision transformer for 32x32 images (CIFAR-10), built from torchvision's
VisionTransformer: patches of 4x4 (64 tokens and a class token), attention through
nn.MultiheadAttention (one packed in-projection per block), an MLP of two Linear layers."""

from __future__ import annotations

import torch.nn as nn


def cifar_vit(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
              num_layers: int = 6, num_heads: int = 4, hidden_dim: int = 192, mlp_dim: int = 384,
              dropout: float = 0.0) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim,
                              dropout=dropout, num_classes=num_classes)
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, patch_size)
    return model
