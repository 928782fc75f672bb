"""The MindSpore side: file format constants and framing (`format`), the streaming writer (`writer`) and
the streaming, mmap-backed reader (`reader`)."""
