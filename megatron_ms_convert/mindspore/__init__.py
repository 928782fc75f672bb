"""The MindSpore side: file format constants and framing (`format`), and the streaming writer (`writer`)."""
