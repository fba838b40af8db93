"""Stage 1-2: the SlimSet (calibration prompts) and the activation statistics collected through a pipeline's own sampler."""
