"""Convolutional Nearest Neighbors (ConvNN): k-NN layers, backbones and the training framework."""

__version__ = "0.1.0"
