"""Dynamic inference: early exit and MLP skipping, calibrated post-training."""
