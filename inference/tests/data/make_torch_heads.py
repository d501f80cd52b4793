#!/usr/bin/env python3
"""Re-save the tiny bge-m3 fixture's heads (`sparse_linear.safetensors`, `colbert_linear.safetensors`) as
torch checkpoints, the way BAAI/bge-m3 ships them (`sparse_linear.pt`, `colbert_linear.pt`: a Linear's
state dict written by `torch.save`, zip format). Standard library only (no torch here): the pickle names
`torch._utils._rebuild_tensor_v2` and `torch.FloatStorage` exactly as torch writes them.

    python3 make_torch_heads.py <fixtures>/tiny/xlm-roberta bge-m3-pt
"""
import collections
import json
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

# Stand-ins registered under torch's names, so that pickle writes torch's globals.
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")


class FloatStorage:
    pass


def _rebuild_tensor_v2(*args):
    raise NotImplementedError


FloatStorage.__module__ = "torch"
_rebuild_tensor_v2.__module__ = "torch._utils"
torch.FloatStorage = FloatStorage
torch._utils = torch_utils
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


class Storage:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class Tensor:
    def __init__(self, storage: Storage, shape):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        strides, acc = [], 1
        for dim in reversed(self.shape):
            strides.insert(0, acc)
            acc *= dim
        return (_rebuild_tensor_v2, (self.storage, 0, self.shape, tuple(strides), False, collections.OrderedDict()))


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
        return None


def read_safetensors(path: Path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", info
        start, end = info["data_offsets"]
        out[name] = (info["shape"], data[8 + n + start : 8 + n + end])
    return out


def write_pt(tensors, path: Path):
    stem = path.stem
    state, blobs = collections.OrderedDict(), []
    for i, (name, (shape, raw)) in enumerate(sorted(tensors.items())):
        state[name] = Tensor(Storage(str(i), len(raw) // 4), shape)
        blobs.append((str(i), raw))
    pkl = __import__("io").BytesIO()
    TorchPickler(pkl, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{stem}/data.pkl", pkl.getvalue())
        z.writestr(f"{stem}/byteorder", "little")
        for key, raw in blobs:
            z.writestr(f"{stem}/data/{key}", raw)
        z.writestr(f"{stem}/version", "3\n")


def main():
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    for head in ("sparse_linear", "colbert_linear"):
        write_pt(read_safetensors(src / f"{head}.safetensors"), dst / f"{head}.pt")


if __name__ == "__main__":
    main()
