"""Conditional DNI: the synthesizer also sees the label (``train.synth_label_input``: as one-hot
maps beside the activations, or as a linear map of it added after the first conv)."""

from decoupled.methods.dni import DNI


class CDNI(DNI):
    name = "cdni"
    conditioned = True


METHOD = CDNI
