"""A small convolutional network for 8x8 inputs: two 3x3 convolutions, one 2x2 pooling, two linears.

Same initialisation idea as the MLP: He for the layers followed by ReLU, zeros for the output.
"""

from __future__ import annotations

from torch import nn


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    channels, height, width = input_shape
    model = nn.Sequential(
        nn.Conv2d(channels, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (height // 2) * (width // 2), 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )
    layers = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers[:-1]:
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    nn.init.zeros_(layers[-1].weight)
    for layer in layers:
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return model
