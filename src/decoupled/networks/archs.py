"""Every arch, by family (see the package's docstring)."""

from __future__ import annotations

from decoupled.networks import shapes
from decoupled.networks.cnn import CNN
from decoupled.networks.imagenet_resnet import ImageNetResNet
from decoupled.networks.resnet import ResNet
from decoupled.networks.vgg import VGG
from decoupled.networks.wrn import WideResNet

FAMILIES = {"cnn": CNN, "resnet": ResNet, "wrn": WideResNet, "vgg": VGG, "imagenet_resnet": ImageNetResNet}


def of(model_cfg: dict):
    """The arch of ``model_cfg``; ValueError naming ``model.arch`` if it is not one."""
    return FAMILIES[shapes.parse(model_cfg)[0]](model_cfg)
