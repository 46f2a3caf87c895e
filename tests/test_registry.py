import pytest
import torch

from convnn.layers import available_layers, build_layer


def test_conv2d_is_registered_and_same_padded():
    layer = build_layer("conv2d", 3, 8, kernel_size=5)
    assert "conv2d" in available_layers("map")
    assert layer(torch.randn(2, 3, 7, 9)).shape == (2, 8, 7, 9)


def test_unknown_layer_names_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown layer 'cnv'.*conv2d"):
        build_layer("cnv", 3, 8)


def test_unknown_option_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['kernal'\].*kernel_size"):
        build_layer("conv2d", 3, 8, kernal=3)


def test_even_kernel_is_rejected():
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer, got 4"):
        build_layer("conv2d", 3, 8, kernel_size=4)
