"""The networks a SplitNet is cut from, chosen by ``model.arch``.

An arch is a sequence of layers, the units that ``model.split`` counts, each taking one tensor
and giving one (a residual block's output is one tensor: the residual stream crosses a module
boundary like any activation), and the network's own classifier, which reads the last layer's
output and is the last module's head. Every arch offers:

* ``layers(in_channels)``: the layers, parameters drawn from torch's global RNG, their output
  channels ``shapes.channels`` (known without torch, for ``decoupled.grid``);
* ``classifier(channels, num_classes)``: the network's classifier;
* optionally ``init_head(head)``: the aux heads drawn as the network (VGG: as the DGL code).

``cnn`` (the default, ``model.widths``), ``resnet<6n+2>`` (``resnet.py``), ``wrn<6n+4>_<k>``
(``wrn.py``), ``vgg<11|13|16|19>`` (``vgg.py``) and ``imagenet_resnet<50|101|152>``
(``imagenet_resnet.py``). Adding one = a file here, its shape in
``shapes.py`` and a row in ``archs.FAMILIES``. This package's ``__init__`` and ``shapes`` load
without torch (``decoupled.grid``); ``archs`` imports every arch.
"""

