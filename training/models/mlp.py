"""A one-hidden-layer perceptron: flatten, 512 ReLU units, logits.

Initialisation is chosen for the few SGD steps of a federated round: He (Kaiming normal) for
the hidden layer and zeros for the output layer, so the first steps fit the output layer on
random ReLU features instead of undoing random initial logits.
"""

from __future__ import annotations

import math

from torch import nn

HIDDEN = 512


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    hidden = nn.Linear(math.prod(input_shape), HIDDEN)
    output = nn.Linear(HIDDEN, num_classes)
    nn.init.kaiming_normal_(hidden.weight, nonlinearity="relu")
    nn.init.zeros_(hidden.bias)
    nn.init.zeros_(output.weight)
    nn.init.zeros_(output.bias)
    return nn.Sequential(nn.Flatten(), hidden, nn.ReLU(), output)
