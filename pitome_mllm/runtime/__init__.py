"""What running a model needs around the patch: loading (device, dtype, quantisation) and timing."""
