"""The shared second-order compression engine: Hessian capture, OBS pruning / quantization, sequential calibration."""
