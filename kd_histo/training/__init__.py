"""Training: run configs, losses, the ResolutionDistiller, the training loop, the teacher cache and
the run record that hands a trained run to evaluation."""
