"""Conditional DNI: the synthesizer also sees the label, as one-hot maps beside the activations."""

from decoupled.methods.dni import DNI


class CDNI(DNI):
    name = "cdni"
    conditioned = True


METHOD = CDNI
