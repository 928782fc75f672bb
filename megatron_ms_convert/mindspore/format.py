"""Facts of the two MindSpore checkpoint formats (mindspore 2.10), shared by writer and reader.

* ``.ckpt``: a concatenation of serialized protobuf ``Checkpoint`` messages, one per tensor, in the
  order given: ``Checkpoint{repeated Value value=1}``, ``Value{string tag=1; TensorProto tensor=2}``,
  ``TensorProto{repeated int64 dims=1; string tensor_type=2; bytes tensor_content=3}``. A Parameter's
  raw bytes are cut into 512 MiB byte chunks (not along axis 0), every chunk in its own message with
  the same tag and the full dims; ``load_checkpoint`` joins consecutive messages with the same tag. A
  tensor with zero elements produces no message at all. A 0-d tensor has no dims field.
  ``save_checkpoint(..., async_save=True)`` saves numpy copies instead and cuts those with
  ``np.array_split`` along axis 0 into ceil(KiB / 524288) pieces: unequal chunks, and empty messages when
  axis 0 is shorter than the piece count (shape (1, n)); joining the bytes in order gives the tensor all
  the same. The schema is proto2 with tag, tensor_type and tensor_content required, so even an empty
  content is written. bfloat16 is stored as tensor_type ``BFloat16``; with numpy 2.x, mindspore 2.10
  cannot convert bf16 to numpy, so it cannot write (or read) bf16 ``.safetensors`` at all.
* ``.safetensors``: the standard format; ``save_checkpoint`` passes metadata ``{"format": "ms"}``
  (none at all when there are no tensors). The Rust library orders both header and data by dtype
  (descending enum order: I64, F64, F32, I32, F16, U8, BOOL) and then by name.
"""

from __future__ import annotations

FORMATS = ("ckpt", "safetensors")

# numpy dtype name -> (MindSpore tensor_type string, safetensors dtype, safetensors sort rank): the
# dtypes the writer writes. The rank is the position in safetensors' Rust `Dtype` enum; data is
# sorted by it descending.
DTYPES = {
    "bool": ("Bool", "BOOL", 0),
    "uint8": ("UInt8", "U8", 4),
    "float16": ("Float16", "F16", 11),
    "int32": ("Int32", "I32", 13),
    "float32": ("Float32", "F32", 15),
    "float64": ("Float64", "F64", 17),
    "int64": ("Int64", "I64", 18),
}
# What a reader meets besides those: bf16 values of MindSpore-trained files (numpy has no bfloat16).
READ_ONLY_DTYPES = {"bfloat16": ("BFloat16", "BF16", 12)}
MS_TYPE_TO_DTYPE = {ms: name for name, (ms, _, _) in {**DTYPES, **READ_ONLY_DTYPES}.items()}
SAFETENSORS_TO_DTYPE = {st: name for name, (_, st, _) in {**DTYPES, **READ_ONLY_DTYPES}.items()}
ITEMSIZE = {"bool": 1, "uint8": 1, "float16": 2, "bfloat16": 2, "int32": 4, "float32": 4, "float64": 8, "int64": 8}

# save_checkpoint cuts a Parameter's bytes into chunks of 1024 * SLICE_SIZE (SLICE_SIZE = 512 * 1024),
# because a single protobuf message must stay under 2 GiB.
CKPT_CHUNK_BYTES = 1024 * 512 * 1024

# protobuf wire keys (field number << 3 | wire type 2, length-delimited; dims is field 1 varint)
KEY_CHECKPOINT_VALUE = 0x0A   # Checkpoint.value = 1
KEY_VALUE_TAG = 0x0A          # Value.tag = 1
KEY_VALUE_TENSOR = 0x12       # Value.tensor = 2
KEY_VALUE_MAPTENSOR = 0x1A    # Value.maptensor = 3 (MapParameter; a reader rejects it)
KEY_TENSOR_DIMS = 0x08        # TensorProto.dims = 1 (varint, not packed)
KEY_TENSOR_DIMS_PACKED = 0x0A  # TensorProto.dims = 1 (packed form, accepted when reading)
KEY_TENSOR_TYPE = 0x12        # TensorProto.tensor_type = 2
KEY_TENSOR_CONTENT = 0x1A     # TensorProto.tensor_content = 3


def varint(n: int) -> bytes:
    """Protobuf base-128 varint.

    >>> varint(300)
    b'\\xac\\x02'
    """
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# protobuf wire types; a reader skips unknown fields of the first four kinds.
WIRE_VARINT, WIRE_FIXED64, WIRE_LEN, WIRE_FIXED32 = 0, 1, 2, 5

# save_checkpoint(append_dict={k: "text"}) stores a Python str as tensor_type "str", dims [0] and the
# text as numpy 'U' bytes (UTF-32-LE, 4 bytes per character); load_checkpoint returns it as a str.
MS_STRING_TYPE = "str"

# save_checkpoint(crc_check=True) appends b"crc_num" and the CRC-32 of all preceding bytes as 10
# big-endian bytes; load_checkpoint drops these 17 bytes whenever they are there.
CKPT_CRC_MARK = b"crc_num"
CKPT_CRC_TRAILER_BYTES = len(CKPT_CRC_MARK) + 10

# safetensors: 8-byte little-endian header length, then that many bytes of JSON, then the data.
SAFETENSORS_LEN_BYTES = 8
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit
