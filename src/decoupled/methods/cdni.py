"""Conditional DNI: the synthesizer also sees the label (``train.synth_label_input``: as one-hot
maps beside the activations, or as a linear map of it added after the first conv)."""

from decoupled.methods.dni import DNI

TRAITS = {"sends_gradients": True, "reads": ["train.probe_heads", "train.synth_hidden", "train.synth_lr", "train.synth_layers", "train.synth_kernel", "train.synth_batchnorm", "train.synth_target", "train.synth_zero_bias", "train.synth_label_input", "train.synth_last_block"], "report_order": 3}


class CDNI(DNI):
    name = "cdni"
    conditioned = True


METHOD = CDNI
