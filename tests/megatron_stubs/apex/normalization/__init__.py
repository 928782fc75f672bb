"""apex.normalization: only what megatron.core.fusions.fused_layer_norm imports."""
