"""apex.multi_tensor_apply: calls an op on lists of tensors, as apex's MultiTensorApply does (without
the CUDA chunking; chunk_size is passed through for signature compatibility)."""


class MultiTensorApply:
    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    def __call__(self, op, noop_flag_buffer, tensor_lists, *args):
        return op(self.chunk_size, noop_flag_buffer, tensor_lists, *args)


multi_tensor_applier = MultiTensorApply(2048 * 32)
