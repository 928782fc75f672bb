"""Keep pytest (which collects every module for doctests) from importing what only the real-Megatron
worker processes may import: the stand-in packages would shadow real ones on sys.path, and the worker
patches torch's CUDA entry points for the CPU when imported."""

collect_ignore = ["megatron_stubs", "real_megatron_worker.py"]
