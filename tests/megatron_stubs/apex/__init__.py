"""Pure-torch stand-ins for the parts of NVIDIA apex that megatron.core 0.6.0 imports.

Only the harness processes of tests/real_megatron.py put this folder on sys.path: apex's fused CUDA
kernels cannot run on a CPU-only machine, and Megatron's optimizer modules import them at module level.
"""
