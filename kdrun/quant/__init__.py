"""Q-BERT (Shen et al., AAAI 2020): fake quantization, Hessian sensitivity, bit allocation, packed size, int8 export.

Dependencies point one way: ``grid`` (pure tensor arithmetic) <- ``modules`` (which
layers of a BERT-family model carry which bits) <- ``size``, ``int8``;
``hessian`` and ``allocation`` stand alone. Stages import from here, never the reverse.
"""
