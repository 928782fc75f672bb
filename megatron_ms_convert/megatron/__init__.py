"""The Megatron-LM side: reading checkpoints (`checkpoint`) and the bucket layouts of the
distributed optimizer (`layout`)."""
