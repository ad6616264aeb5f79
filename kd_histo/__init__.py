"""kd_histo: resolution-based knowledge distillation for histology image classification.

Train a teacher on high-resolution tiles, then distill it into a student that reads the same
tissue at 2x, 4x or 8x lower resolution, using unlabeled slides (DiPalma et al., 2021).
"""

__version__ = "0.1.0"
