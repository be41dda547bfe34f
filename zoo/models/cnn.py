"""Small CNNs of the model-zoo literature."""
from __future__ import annotations

import torch.nn as nn

from ._registry import flat_features, register
from .layers import Activation, GlobalAvgPool


@register("cnn_s")
def cnn_s(in_channels=1, input_size=28, num_classes=10, activation="tanh", dropout=0.0):
    """Schürholt et al.'s small CNN (2,464 parameters for 1x28x28): conv -> pool -> act -> dropout."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 8, 5), nn.MaxPool2d(2), Activation(activation), nn.Dropout(dropout),
        nn.Conv2d(8, 6, 5), nn.MaxPool2d(2), Activation(activation), nn.Dropout(dropout),
        nn.Conv2d(6, 4, 2), Activation(activation), nn.Flatten(),
    )
    n = flat_features(features, in_channels, input_size, "cnn_s")
    return nn.Sequential(*features, nn.Linear(n, 20), Activation(activation), nn.Dropout(dropout),
                         nn.Linear(20, num_classes))


@register("cnn_l")
def cnn_l(in_channels=1, input_size=28, num_classes=10, activation="tanh", dropout=0.0):
    """Schürholt et al.'s larger CNN: three 3x3 convs (16, 32, 15 channels), each with a 2x2 max-pool."""
    layers: list[nn.Module] = []
    for c_in, c_out in [(in_channels, 16), (16, 32), (32, 15)]:
        layers += [nn.Conv2d(c_in, c_out, 3), nn.MaxPool2d(2), Activation(activation), nn.Dropout(dropout)]
    features = nn.Sequential(*layers, nn.Flatten())
    n = flat_features(features, in_channels, input_size, "cnn_l")
    return nn.Sequential(*features, nn.Linear(n, 20), Activation(activation), nn.Dropout(dropout),
                         nn.Linear(20, num_classes))


def _strided_gap(name, in_channels, input_size, num_classes, activation, dropout, width, padding):
    layers: list[nn.Module] = []
    for c_in in [in_channels, width, width]:
        layers += [nn.Conv2d(c_in, width, 3, stride=2, padding=padding), Activation(activation), nn.Dropout(dropout)]
    features = nn.Sequential(*layers, GlobalAvgPool())
    flat_features(features, in_channels, input_size, name)
    return nn.Sequential(*features, nn.Linear(width, num_classes))


@register("cnn_gap")
def cnn_gap(in_channels=1, input_size=28, num_classes=10, activation="relu", dropout=0.0, width=16):
    """The Small CNN Zoo's layer sizes with padding 1 on every conv (28 -> 14 -> 7 -> 4): three 3x3 stride-2
    convs, global average pool, dense (4,970 parameters on 1x28x28). Not Unterthiner et al.'s function: their
    network is `smallcnn` (valid padding)."""
    return _strided_gap("cnn_gap", in_channels, input_size, num_classes, activation, dropout, width, 1)


@register("smallcnn")
def smallcnn(in_channels=1, input_size=28, num_classes=10, activation="relu", dropout=0.0, width=16):
    """Unterthiner et al.'s Small CNN Zoo network exactly: three 3x3 stride-2 convs with Keras' default valid
    padding (28 -> 13 -> 6 -> 2; 32 -> 15 -> 7 -> 3), each followed by the activation and dropout, global
    average pool, dense; 4,970 parameters on 1 channel. Its zoos scale pixels to [-1, 1]
    (`input_scaling: minus_one_one`)."""
    return _strided_gap("smallcnn", in_channels, input_size, num_classes, activation, dropout, width, 0)
