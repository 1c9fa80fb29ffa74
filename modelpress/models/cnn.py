"""A small CNN for 28x28 grey images (Fashion-MNIST), cheap enough to train on 2 CPU cores."""

import torch.nn as nn


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class FashionCNN(nn.Module):
    """conv(32)-pool-conv(64)-pool-conv(64)-fc(256)-fc(classes).

    Most weights sit in the first fully connected layer, as in many production heads,
    which is what product quantization compresses best.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, hidden: int = 256):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, width),
            nn.MaxPool2d(2),  # 28 -> 14
            _conv_bn(width, 2 * width),
            nn.MaxPool2d(2),  # 14 -> 7
            _conv_bn(2 * width, 2 * width),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(2 * width * 7 * 7, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
