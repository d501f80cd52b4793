#!/usr/bin/env python3
"""Bytes of weights a decode step reads from a GGUF file: every 2-D tensor (matrices), with the
token embedding counted once when the output projection is tied to it (it is then read as the
output matrix). Prints JSON: {"weight_bytes": ..., "types": {...}, "file_bytes": ...}."""
import json
import os
import struct
import sys

# ggml type -> (block size, bytes per block)
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
         7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
         12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2)}
SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read(f, fmt):
    return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))


def string(f):
    (n,) = read(f, "Q")
    return f.read(n)


def value(f, t):
    if t == 8:
        return string(f)
    if t == 9:
        (at,), (n,) = read(f, "I"), read(f, "Q")
        return [value(f, at) for _ in range(n)]
    return read(f, SCALAR[t])[0]


def main(path):
    with open(path, "rb") as f:
        magic, version, n_tensors, n_kv = read(f, "4sIQQ")
        assert magic == b"GGUF", "not a GGUF file"
        for _ in range(n_kv):
            string(f)
            (t,) = read(f, "I")
            value(f, t)
        tensors = {}
        for _ in range(n_tensors):
            name = string(f).decode()
            (nd,) = read(f, "I")
            dims = read(f, "Q" * nd)
            t, _offset = read(f, "IQ")
            tensors[name] = (dims, t)
    total, types = 0, {}
    for name, (dims, t) in tensors.items():
        if len(dims) != 2 or (name == "token_embd.weight" and "output.weight" in tensors):
            continue
        label, block, nbytes = TYPES[t]
        size = dims[0] * dims[1] // block * nbytes
        total += size
        types[label] = types.get(label, 0) + size
    print(json.dumps({"weight_bytes": total, "types": types, "file_bytes": os.path.getsize(path)}))


if __name__ == "__main__":
    main(sys.argv[1])
