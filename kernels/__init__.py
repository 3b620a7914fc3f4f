"""CUDA sources of the GPU LUT kernels (installed as the package ``approxrun.kernels``)."""
