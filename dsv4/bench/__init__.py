"""`dsv4 bench`: dsv4 against transformers eager on the same weights, with the HBM floor of every decode step.

The model is Flash at full width truncated to a few layers (default 4: ratios 0, 0, 4, 128), its weights
synthesised straight on the GPU in the official formats; transformers gets the same weights dequantised to bf16.
"""
