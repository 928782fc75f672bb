"""What the way back assumes when pt_meta was written by the documented tool: it recorded neither the
model skeletons nor the bucket sizes, only the param_map JSON files beside it. Both are derived here
from the grad-buffer layouts, by Megatron core_r0.6.0's rules:

- model state dict nesting: the legacy GPTModel saves `language_model` -> `embedding` ->
  `word_embeddings`/`position_embeddings` -> `weight`, `language_model` -> `encoder` -> flat
  `layers.N...` / `final_norm...` keys, `language_model` -> `output_layer` -> `weight`, and its last
  stage's tied copy as `word_embeddings_for_head` -> `weight`; megatron.core's GPTModel saves flat keys.
  Parameters are listed in module order, the reverse of buffer order. `_extra_state` entries are not
  known and left out.
- bucket sizes: a bucket starts at its first parameter and ends after its last one (unpadded); it is
  padded to where the next bucket starts, the last one to a multiple of the source's DP x CP.
- dtype key: (the parameters' dtype, float32 when the run accumulated gradients in fp32, else the
  parameters' dtype).
"""

from __future__ import annotations

from typing import Any, Sequence

from .layout import BucketCounts, BufferLayout, state_key_for
from .writer import TensorSpec, padded_bucket_size, torch_dtype

_LEGACY_SPLITS = (("language_model.embedding.", 3), ("language_model.encoder.", 2),
                  ("language_model.output_layer.", 3), ("word_embeddings_for_head.", 1))


def nesting_path(key: str, family: str) -> list[str]:
    """The path of a model-relative state-dict key inside the saved chunk dict.

    >>> nesting_path("language_model.encoder.layers.0.mlp.dense_h_to_4h.weight", "legacy")
    ['language_model', 'encoder', 'layers.0.mlp.dense_h_to_4h.weight']
    >>> nesting_path("language_model.embedding.word_embeddings.weight", "legacy")
    ['language_model', 'embedding', 'word_embeddings', 'weight']
    >>> nesting_path("decoder.layers.0.mlp.linear_fc1.weight", "mcore")
    ['decoder.layers.0.mlp.linear_fc1.weight']
    """
    if family == "legacy":
        for prefix, depth in _LEGACY_SPLITS:
            if key.startswith(prefix):
                parts = key.split(".")
                return parts[:depth] + [".".join(parts[depth:])] if depth < len(parts) else parts
    return [key]


def rule_skeletons(layouts: Sequence[BufferLayout], num_chunks: int, family: str) -> list[dict]:
    """One chunk skeleton per model chunk from the layouts' parameters (in module order)."""
    skeletons: list[dict] = [{} for _ in range(num_chunks)]
    for chunk in range(num_chunks):
        spans = [span for layout in layouts if layout.chunk == chunk for span in layout.params]
        for span in reversed(spans):
            node = skeletons[chunk]
            *parents, leaf = nesting_path(state_key_for(span.name), family)
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = TensorSpec(tuple(span.shape), torch_dtype(span.dtype))
    return skeletons


def rule_counts(layouts: Sequence[BufferLayout], args: Any) -> list[BucketCounts]:
    """The source's bucket sizes and dtype key of every grad buffer, from its layout."""
    dp_cp = (getattr(args, "data_parallel_size", 1) or 1) * (getattr(args, "context_parallel_size", 1) or 1)
    fp32_grads = bool(getattr(args, "accumulate_allreduce_grads_in_fp32", False))
    counts = []
    for gbuf, layout in enumerate(layouts):
        buckets = sorted({span.bucket for span in layout.params})
        starts = [min(s.start for s in layout.params if s.bucket == b) for b in buckets]
        ends = [max(s.end for s in layout.params if s.bucket == b) for b in buckets]
        unpadded = [end - start for start, end in zip(starts, ends)]
        padded = [nxt - start for start, nxt in zip(starts, starts[1:])]
        padded.append(padded_bucket_size(unpadded[-1], dp_cp))
        param_dtype = layout.params[0].dtype
        counts.append(BucketCounts(gbuf, (param_dtype, "torch.float32" if fp32_grads else param_dtype),
                                   tuple(padded), tuple(unpadded)))
    return counts
