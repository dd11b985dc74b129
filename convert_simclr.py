"""SimCLR TensorFlow checkpoints to PyTorch (torchvision ResNet-50 keys), without TensorFlow.

Reads a TensorFlow V2 checkpoint (``.index`` + ``.data-*`` shards) written by SimCLR's TF1
code (v1, or v2 with selective kernels off), checks every CRC32C, and writes a ``.pth`` that
``train.py --init`` and mmseg's ResNet load. The network expects RGB in [0, 1] with no
mean/std, as SimCLR was trained; ``--fold-imagenet-norm`` moves ImageNet's mean/std into
conv1 and bn1 instead. Command line:

    python convert_simclr.py /ckpts/ResNet50_1x/model.ckpt-225206 simclr_v1_r50.pth
    python convert_simclr.py /ckpts/r50_1x_sk0/ simclr_v2_r50.pth   # folder: its 'checkpoint'

Python:

    from convert_simclr import convert
    ckpt = convert("/ckpts/r50_1x_sk0/")   # {"state_dict", "input_normalization", "conversion"}
    torchvision.models.resnet50().load_state_dict(ckpt["state_dict"])  # strict=False if no fc

Also offered: ``read_index``/``read_checkpoint`` (a numpy reader for any TF V2 checkpoint),
``crc32c`` (the ``crc32c`` package when installed, vectorised numpy otherwise), and
``use_tf_same_maxpool`` (TensorFlow's asymmetric 'SAME' max-pool, to reproduce TF's numbers
on inputs of size 0 or 3 mod 4, e.g. 224x224). The file format and SimCLR's naming are
described in ../shared/notes/tf-checkpoint.md.
"""
import argparse
import dataclasses
import hashlib
import math
import os
import posixpath
import re
import struct
import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

CONVERTER = "convert_simclr.py"
FORMAT_VERSION = 1
BN_EPS = 1e-5  # SimCLR's BATCH_NORM_EPSILON, equal to PyTorch's default
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLOCKS = (3, 4, 6, 3)  # ResNet-50
PROGRESS_MIN_BYTES = 64 * 2**20  # show a bar only when reading more than this
READ_CHUNK = 16 * 2**20  # bytes per read: bounds memory when skipping multi-GB slots


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or not what was asked for."""


class UnsupportedCheckpoint(CheckpointError):
    """A readable checkpoint that this file refuses to convert, because it cannot do so
    faithfully (selective kernels, other widths, snappy, big-endian, partitioned, TF2)."""


# ---------------------------------------------------------------------------------------
# CRC32C (Castagnoli), as TensorFlow's table and bundle code store it

_POLY = 0x82F63B78  # reflected 0x1EDC6F41
_MASK_DELTA = 0xA282EAD8
_LANES = 16384  # numpy path: independent CRCs computed side by side, then combined


def _make_tables():
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    tables = [t]
    # Slicing-by-4: tables[k][b] is byte b followed by k zero bytes.
    for _ in range(3):
        p = tables[-1]
        tables.append(((p >> 8) ^ t[p & 0xFF]).astype(np.uint32))
    return tables


_TABLES = _make_tables()
_TABLE0 = _TABLES[0].tolist()
_SHIFT_CACHE = {}


def _apply(op, x):
    """Apply a GF(2)-linear map on 32-bit registers, given as 4 byte tables, to x."""
    return (np.take(op[0], x & 0xFF) ^ np.take(op[1], (x >> 8) & 0xFF)
            ^ np.take(op[2], (x >> 16) & 0xFF) ^ np.take(op[3], x >> 24))


def _zeros_op(n):
    """The map 'feed n zero bytes to the register', as 4 byte tables (cached)."""
    if n in _SHIFT_CACHE:
        return _SHIFT_CACHE[n]
    v = np.arange(256, dtype=np.uint32)
    basis = np.concatenate([v << (8 * k) for k in range(4)]).astype(np.uint32)
    one = ((basis >> 8) ^ _TABLES[0][basis & 0xFF]).astype(np.uint32)
    power = tuple(one[256 * k:256 * (k + 1)] for k in range(4))  # n = 1
    result = None
    m = n
    # Square-and-multiply on maps, so a shift by n bytes costs O(log n) small numpy ops.
    while m:
        if m & 1:
            if result is None:
                result = power
            else:
                out = _apply(result, np.concatenate(power))
                result = tuple(out[256 * k:256 * (k + 1)] for k in range(4))
        m >>= 1
        if m:
            sq = _apply(power, np.concatenate(power))
            power = tuple(sq[256 * k:256 * (k + 1)] for k in range(4))
    if result is None:  # n = 0: the identity
        result = tuple((v << (8 * k)).astype(np.uint32) for k in range(4))
    if len(_SHIFT_CACHE) < 256:
        _SHIFT_CACHE[n] = result
    return result


def _raw_numpy(buf):
    """Register after feeding bytes buf (uint8 array) to a zero register (no pre/post xor)."""
    n = buf.size
    if n < 4096:
        reg = 0
        for b in buf.tolist():
            reg = (reg >> 8) ^ _TABLE0[(reg ^ b) & 0xFF]
        return reg
    lanes = min(_LANES, 1 << ((n // 1024).bit_length() - 1))
    pad = (-n) % (4 * lanes)
    if pad:
        # Leading zeros leave a zero register unchanged, so padding at the front is free.
        padded = np.zeros(n + pad, dtype=np.uint8)
        padded[pad:] = buf
        buf = padded
    lane_bytes = buf.size // lanes
    words = np.ascontiguousarray(buf.view("<u4").reshape(lanes, lane_bytes // 4).T)
    t0, t1, t2, t3 = _TABLES
    reg = np.zeros(lanes, dtype=np.uint32)
    for row in words:
        reg ^= row
        reg = (np.take(t3, reg & 0xFF) ^ np.take(t2, (reg >> 8) & 0xFF)
               ^ np.take(t1, (reg >> 16) & 0xFF) ^ np.take(t0, reg >> 24))
    # CRC is linear: crc(A + B) = shift(crc(A), len(B)) ^ crc(B); pair lanes up in a tree.
    while reg.size > 1:
        reg = _apply(_zeros_op(lane_bytes), reg[0::2]) ^ reg[1::2]
        lane_bytes *= 2
    return int(reg[0])


def _crc32c_numpy(data, crc=0):
    if isinstance(data, np.ndarray):
        buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        return crc
    start = np.array([crc ^ 0xFFFFFFFF], dtype=np.uint32)
    reg = int(_apply(_zeros_op(buf.size), start)[0]) ^ _raw_numpy(buf)
    return reg ^ 0xFFFFFFFF


def _crc_function(impl="auto"):
    """Return (update(data, crc) -> crc, name) for impl 'auto', 'crc32c' or 'numpy'."""
    if impl not in ("auto", "crc32c", "numpy"):
        raise ValueError(f"crc implementation must be auto, crc32c or numpy, not {impl!r}")
    if impl in ("auto", "crc32c"):
        try:
            import crc32c as package  # optional: hardware CRC, ~40x the numpy path's speed
        except ImportError:
            if impl == "crc32c":
                raise ImportError("the 'crc32c' package is not installed "
                                  "(pip install crc32c), or use the numpy implementation")
        else:
            def update(data, crc=0):
                if isinstance(data, np.ndarray):
                    data = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
                return package.crc32c(data, crc)
            return update, "crc32c package"
    return _crc32c_numpy, "numpy"


def crc32c(data, crc=0, impl="auto"):
    """CRC-32C of bytes-like ``data`` (unmasked, as in RFC 3720), continuing from ``crc``.

    ``crc32c(b, crc32c(a)) == crc32c(a + b)``. ``impl``: 'auto' (the ``crc32c`` package if
    installed, else numpy), 'crc32c' or 'numpy'. Returns an int in [0, 2**32).
    """
    return _crc_function(impl)[0](data, crc)


def mask_crc(crc):
    """TensorFlow's masked form of a CRC, as stored in block trailers and tensor entries."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask_crc(masked):
    """Inverse of ``mask_crc``."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------
# The .index file: a LevelDB-style table of protobuf messages

_MAGIC = bytes.fromhex("57fb808b247547db")
_FOOTER = 48
_TRAILER = 5

# DataType enum -> numpy dtype (little-endian), for the numeric types a bundle may hold.
_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 8: "<c8", 9: "<i8",
           10: "?", 17: "<u2", 18: "<c16", 19: "<f2", 22: "<u4", 23: "<u8"}
_DTYPE_NAMES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
                7: "string", 8: "complex64", 9: "int64", 10: "bool", 11: "qint8",
                12: "quint8", 13: "qint32", 14: "bfloat16", 15: "qint16", 16: "quint16",
                17: "uint16", 18: "complex128", 19: "float16", 20: "resource",
                21: "variant", 22: "uint32", 23: "uint64"}


@dataclasses.dataclass
class TensorEntry:
    """Where one tensor's bytes are: shard ``shard_id``, bytes [offset, offset + size)."""
    name: str
    dtype: int  # TensorFlow DataType enum (1 = float32, 9 = int64, ...)
    shape: tuple
    shard_id: int
    offset: int
    size: int  # bytes
    crc: int  # masked CRC32C of the stored bytes
    num_slices: int = 0  # > 0 only for partitioned variables

    @property
    def dtype_name(self):
        return _DTYPE_NAMES.get(self.dtype, f"dtype{self.dtype}")


@dataclasses.dataclass
class CheckpointIndex:
    """A parsed ``.index``: header fields and tensor entries in key (bytewise) order."""
    prefix: str
    index_path: str
    num_shards: int
    endianness: int  # 0 little, 1 big
    version: dict
    entries: dict  # name -> TensorEntry

    def shard_path(self, shard_id):
        return f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}"


def _varint(buf, pos, end, where):
    result = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise CheckpointError(f"{where}: truncated or malformed varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf, where):
    """Yield (field number, wire type, value) of a serialized protobuf message."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos, end, where)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end, where)
        elif wire == 1:
            if pos + 8 > end:
                raise CheckpointError(f"{where}: truncated protobuf field {number}")
            value = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos, end, where)
            if pos + n > end:
                raise CheckpointError(f"{where}: truncated protobuf field {number}")
            value = bytes(buf[pos:pos + n])
            pos += n
        elif wire == 5:
            if pos + 4 > end:
                raise CheckpointError(f"{where}: truncated protobuf field {number}")
            value = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise CheckpointError(f"{where}: malformed protobuf (wire type {wire})")
        yield number, wire, value


def _int64(v):
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_shape(buf, where):
    dims = []
    for number, wire, value in _proto_fields(buf, where):
        if number == 2 and wire == 2:
            size = 0  # proto3 leaves a zero size out
            for n2, w2, v2 in _proto_fields(value, where):
                if n2 == 1 and w2 == 0:
                    size = _int64(v2)
            if size < 0:
                raise CheckpointError(f"{where}: dimension of unknown size")
            dims.append(size)
        elif number == 3 and wire == 0 and value:
            raise CheckpointError(f"{where}: shape of unknown rank")
    return tuple(dims)


def _parse_entry(name, buf, where):
    e = TensorEntry(name=name, dtype=0, shape=(), shard_id=0, offset=0, size=0, crc=0)
    for number, wire, value in _proto_fields(buf, where):
        if number == 1 and wire == 0:
            e.dtype = value
        elif number == 2 and wire == 2:
            e.shape = _parse_shape(value, where)
        elif number == 3 and wire == 0:
            e.shard_id = _int64(value)
        elif number == 4 and wire == 0:
            e.offset = _int64(value)
        elif number == 5 and wire == 0:
            e.size = _int64(value)
        elif number == 6 and wire == 5:
            e.crc = value
        elif number == 7 and wire == 2:
            e.num_slices += 1
    if e.shard_id < 0 or e.offset < 0 or e.size < 0:
        raise CheckpointError(f"{where}: negative shard, offset or size")
    return e


def _block(data, offset, size, path, what, crc_update):
    """Return the contents of the block at [offset, offset + size), after its checks."""
    limit = len(data) - _FOOTER
    if offset + size + _TRAILER > limit:
        raise CheckpointError(f"{path}: truncated: {what} at byte {offset} (+{size} bytes) "
                              f"runs past the end of the table ({limit} bytes)")
    contents = data[offset:offset + size]
    kind = data[offset + size]
    stored = struct.unpack_from("<I", data, offset + size + 1)[0]
    # The trailer's CRC covers the block bytes and the compression-type byte.
    if crc_update(bytes([kind]), crc_update(contents, 0)) != unmask_crc(stored):
        raise CheckpointError(f"{path}: {what} at byte {offset} fails its CRC32C check: "
                              "the index file is corrupt")
    if kind == 1:
        raise UnsupportedCheckpoint(f"{path}: {what} is snappy-compressed; TensorFlow's "
                                    "bundle writer never does this, and this reader does "
                                    "not decompress snappy")
    if kind != 0:
        raise CheckpointError(f"{path}: {what} has unknown compression type {kind}")
    return contents


def _block_entries(block, path, what):
    """Yield (key, value) of one table block."""
    if len(block) < 4:
        raise CheckpointError(f"{path}: {what} is too short to hold a restart array")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * num_restarts
    if end < 0:
        raise CheckpointError(f"{path}: {what} has a malformed restart array")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos, end, f"{path}: {what}")
        unshared, pos = _varint(block, pos, end, f"{path}: {what}")
        value_len, pos = _varint(block, pos, end, f"{path}: {what}")
        if shared > len(key) or pos + unshared + value_len > end:
            raise CheckpointError(f"{path}: {what} holds a malformed entry at byte {pos}")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


def _read_table(path, crc_update):
    """All (key, value) pairs of an SSTable file, with every block's CRC checked."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _FOOTER or data[-8:] != _MAGIC:
        raise CheckpointError(f"{path}: truncated or not a TensorFlow checkpoint index "
                              f"(no table magic number in its last 8 bytes; {len(data)} bytes)")
    footer = data[-_FOOTER:-8]
    pos = 0
    handles = []
    for _ in range(4):
        v, pos = _varint(footer, pos, len(footer), f"{path}: footer")
        handles.append(v)
    _block(data, handles[0], handles[1], path, "metaindex block", crc_update)  # empty in TF
    index_block = _block(data, handles[2], handles[3], path, "index block", crc_update)
    pairs = []
    for _, handle in _block_entries(index_block, path, "index block"):
        offset, p = _varint(handle, 0, len(handle), f"{path}: block handle")
        size, _ = _varint(handle, p, len(handle), f"{path}: block handle")
        block = _block(data, offset, size, path, "data block", crc_update)
        pairs.extend(_block_entries(block, path, f"data block at byte {offset}"))
    for (a, _), (b, _) in zip(pairs, pairs[1:]):
        if not a < b:
            raise CheckpointError(f"{path}: keys out of order ({a!r} before {b!r}): corrupt")
    return pairs


def read_index(prefix, crc_impl="auto"):
    """Parse ``<prefix>.index`` into a ``CheckpointIndex`` (every block's CRC32C checked).

    Raises ``CheckpointError`` for a missing, truncated or corrupt file and
    ``UnsupportedCheckpoint`` for snappy blocks, big-endian data or partitioned variables.
    """
    path = prefix + ".index"
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file; a TensorFlow V2 checkpoint prefix "
                              "names '<prefix>.index' and '<prefix>.data-*' files")
    update, _ = _crc_function(crc_impl)
    pairs = _read_table(path, update)
    if not pairs or pairs[0][0] != b"":
        raise CheckpointError(f"{path}: no bundle header (the table's first key must be '')")
    num_shards, endianness, version = 1, 0, {}
    for number, wire, value in _proto_fields(pairs[0][1], f"{path}: header"):
        if number == 1 and wire == 0:
            num_shards = _int64(value)
        elif number == 2 and wire == 0:
            endianness = value
        elif number == 3 and wire == 2:
            for n2, w2, v2 in _proto_fields(value, f"{path}: header version"):
                if n2 in (1, 2) and w2 == 0:
                    version["producer" if n2 == 1 else "min_consumer"] = _int64(v2)
    if endianness != 0:
        raise UnsupportedCheckpoint(f"{path}: big-endian tensor data (header endianness "
                                    f"{endianness}); only little-endian files are supported")
    if num_shards < 1:
        raise CheckpointError(f"{path}: header says {num_shards} data shards")
    entries = {}
    for key, value in pairs[1:]:
        if key[:1] == b"\x00":
            name = key[1:].split(b"\x00", 1)[0].decode("utf-8", "replace")
            raise UnsupportedCheckpoint(f"{path}: variable '{name}' is partitioned (a slice "
                                        "entry); partitioned variables are not supported")
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: tensor name {key!r} is not UTF-8") from None
        e = _parse_entry(name, value, f"{path}: entry '{name}'")
        if e.num_slices:
            raise UnsupportedCheckpoint(f"{path}: variable '{name}' is partitioned into "
                                        f"{e.num_slices} slices; partitioned variables are "
                                        "not supported")
        if e.shard_id >= num_shards:
            raise CheckpointError(f"{path}: tensor '{name}' is in shard {e.shard_id}, but "
                                  f"the header says {num_shards} shards")
        entries[name] = e
    return CheckpointIndex(prefix=prefix, index_path=path, num_shards=num_shards,
                           endianness=endianness, version=version, entries=entries)


def resolve_prefix(path):
    """Turn a prefix, a ``.index``/``.data-*`` file or a folder into a checkpoint prefix.

    A folder's ``checkpoint`` file names its latest checkpoint (its basename is taken, so
    absolute paths from the training machine, e.g. gs://..., still resolve here); without
    that file the folder must hold exactly one ``.index``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        state = os.path.join(path, "checkpoint")
        if os.path.isfile(state):
            with open(state, encoding="utf-8", errors="replace") as f:
                text = f.read()
            m = re.search(r'^\s*model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.M)
            if not m:
                raise CheckpointError(f"{state}: no model_checkpoint_path line")
            name = posixpath.basename(m.group(1).replace("\\\\", "/").replace("\\", "/"))
            prefix = os.path.join(path, name)
            if not os.path.isfile(prefix + ".index"):
                raise CheckpointError(f"{state} names '{m.group(1)}', but {prefix}.index "
                                      "does not exist")
            return prefix
        found = sorted(n[:-6] for n in os.listdir(path) if n.endswith(".index"))
        if len(found) != 1:
            raise CheckpointError(f"{path}: no 'checkpoint' file and {len(found)} .index "
                                  "files; give the checkpoint prefix instead")
        return os.path.join(path, found[0])
    m = re.fullmatch(r"(.*)\.(index|data-\d{5}-of-\d{5})", path, re.S)
    if m and not os.path.isfile(path + ".index"):
        path = m.group(1)
    if not os.path.isfile(path + ".index"):
        hint = (" (a single-file V1 checkpoint?, which SimCLR never wrote)"
                if os.path.isfile(path) else "")
        raise CheckpointError(f"{path}.index: no such file{hint}; give a checkpoint prefix "
                              "such as /ckpts/r50_1x_sk0/model.ckpt-250228, or its folder")
    return path


# ---------------------------------------------------------------------------------------
# The data shards


def _decode(raw, entry, where):
    """numpy array from a tensor's stored bytes (numeric dtypes, bfloat16, strings)."""
    numel = math.prod(entry.shape)
    if entry.dtype in _DTYPES:
        dt = np.dtype(_DTYPES[entry.dtype])
        if numel * dt.itemsize != raw.size:
            raise CheckpointError(f"{where}: {raw.size} bytes do not hold {entry.dtype_name} "
                                  f"{list(entry.shape)}")
        return raw.view(dt).reshape(entry.shape)
    if entry.dtype == 14:  # bfloat16: the upper half of a float32
        if numel * 2 != raw.size:
            raise CheckpointError(f"{where}: {raw.size} bytes do not hold bfloat16 "
                                  f"{list(entry.shape)}")
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(entry.shape)
    if entry.dtype == 7:
        buf = raw.tobytes()
        lengths, pos = [], 0
        for _ in range(numel):
            n, pos = _varint(buf, pos, len(buf), where)
            lengths.append(n)
        pos += 4  # masked CRC of the lengths, covered by the entry's own CRC
        out = np.empty(numel, dtype=object)
        for i, n in enumerate(lengths):
            if pos + n > len(buf):
                raise CheckpointError(f"{where}: string data runs past the tensor's bytes")
            out[i] = buf[pos:pos + n]
            pos += n
        return out.reshape(entry.shape)
    raise UnsupportedCheckpoint(f"{where}: dtype {entry.dtype_name} is not supported")


def _string_crc(raw, entry, update, where):
    """The running CRC TensorFlow stores for a string tensor (lengths fed as fixed ints)."""
    buf = raw.tobytes()
    crc, pos = 0, 0
    for _ in range(math.prod(entry.shape)):
        n, pos = _varint(buf, pos, len(buf), where)
        crc = update(struct.pack("<I" if n <= 0xFFFFFFFF else "<Q", n), crc)
    return update(buf[pos:], crc)


def read_checkpoint(prefix, names=None, verify=True, progress=None, crc_impl="auto",
                    index=None):
    """Read tensors of a TensorFlow V2 checkpoint into numpy arrays, with no TensorFlow.

    prefix: e.g. '/ckpts/model.ckpt-250228' (see ``resolve_prefix`` for folders).
    names: tensor names to return (default: all).
    verify: check the stored CRC32C of *every* tensor, including those not returned
        (they are streamed through a fixed buffer); with False only ``names`` are read.
    progress: tqdm bar over bytes read; None shows it when reading over 64 MiB.
    Returns {name: np.ndarray} in the stored dtype and shape (HWIO for conv kernels),
    little-endian; strings as object arrays of bytes. Raises ``CheckpointError`` naming
    the file and tensor on a missing or short shard or a CRC mismatch.
    """
    index = index if index is not None else read_index(prefix, crc_impl)
    update, _ = _crc_function(crc_impl)
    wanted = set(index.entries) if names is None else set(names)
    unknown = sorted(wanted - set(index.entries))
    if unknown:
        raise CheckpointError(f"{index.index_path}: no tensor '{unknown[0]}'")
    todo = [e for e in index.entries.values() if verify or e.name in wanted]
    if verify:
        bad = [e for e in todo if e.dtype in (20, 21)]
        if bad:
            raise UnsupportedCheckpoint(f"{index.index_path}: tensor '{bad[0].name}' has "
                                        f"dtype {bad[0].dtype_name}, whose CRC this reader "
                                        "cannot check; read with verify=False")
    by_shard = {}
    for e in todo:
        by_shard.setdefault(e.shard_id, []).append(e)
    for shard_id, group in sorted(by_shard.items()):
        path = index.shard_path(shard_id)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing data shard (the index lists "
                                  f"{index.num_shards} shard(s))")
        have = os.path.getsize(path)
        last = max(group, key=lambda e: e.offset + e.size)
        if last.offset + last.size > have:
            raise CheckpointError(f"{path}: truncated: tensor '{last.name}' needs bytes up to "
                                  f"{last.offset + last.size}, the file has {have}")
    total = sum(e.size for e in todo)
    show = total > PROGRESS_MIN_BYTES if progress is None else bool(progress)
    out = {}
    scratch = None
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="reading",
               disable=not show, leave=False, file=sys.stderr)
    try:
        for shard_id, group in sorted(by_shard.items()):
            path = index.shard_path(shard_id)
            with open(path, "rb") as f:
                # Offset order keeps reads sequential; only the offsets are trusted.
                for e in sorted(group, key=lambda e: e.offset):
                    where = f"{path}: tensor '{e.name}'"
                    # Strings are small and their CRC is not over the raw bytes: read whole.
                    whole = e.name in wanted or e.dtype == 7
                    if whole:
                        raw = np.empty(e.size, dtype=np.uint8)
                    elif scratch is None:
                        scratch = np.empty(min(READ_CHUNK, total), dtype=np.uint8)
                    f.seek(e.offset)
                    crc, done = 0, 0
                    while done < e.size:
                        n = min(READ_CHUNK, e.size - done)
                        view = raw[done:done + n] if whole else scratch[:n]
                        if f.readinto(memoryview(view)) != n:
                            raise CheckpointError(f"{where}: the file ended early")
                        if verify and e.dtype != 7:
                            crc = update(view, crc)
                        done += n
                        bar.update(n)
                    if verify:
                        if e.dtype == 7:
                            crc = _string_crc(raw, e, update, where)
                        if crc != unmask_crc(e.crc):
                            raise CheckpointError(
                                f"{where} fails its CRC32C check (stored "
                                f"{unmask_crc(e.crc):#010x}, computed {crc:#010x}): "
                                "the data file is corrupt")
                    if e.name in wanted:
                        out[e.name] = _decode(raw, e, where)
    finally:
        bar.close()
    return {n: out[n] for n in index.entries if n in out}


# ---------------------------------------------------------------------------------------
# SimCLR names -> torchvision ResNet-50 keys

_CONV = re.compile(r"conv2d(?:_(\d+))?/kernel")
_BN = re.compile(r"batch_normalization(?:_(\d+))?/(gamma|beta|moving_mean|moving_variance)")
_BN_KEYS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
            "moving_variance": "running_var"}
_SLOTS = re.compile(r".*/(Momentum|Adam|Adam_1|RMSProp|RMSProp_1|Adagrad|Ftrl|Ftrl_1)")
_HEAD = "head_supervised/linear_layer/dense/"


def torchvision_modules():
    """(conv key, bn key) of torchvision's ResNet-50 in SimCLR's creation order.

    Element n pairs with SimCLR's ``conv2d_n`` / ``batch_normalization_n``: the stem, then
    per bottleneck block the projection shortcut first (first block of a group), then the
    1x1, 3x3 and 1x1 convs. 53 pairs.
    """
    order = [("conv1", "bn1")]
    for layer, blocks in enumerate(BLOCKS, start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}."
            if b == 0:
                order.append((p + "downsample.0", p + "downsample.1"))
            order.extend((p + f"conv{k}", p + f"bn{k}") for k in (1, 2, 3))
    return order


def resnet50_shapes(width=1, num_classes=None):
    """{key: shape} of a ResNet-50 whose every width is multiplied by ``width`` (OIHW).

    width 1 is torchvision's ``resnet50``; others are what SimCLR's width multiplier builds,
    which mmseg's ResNet holds with ``stem_channels = base_channels = 64 * width``. fc keys
    are included when ``num_classes`` is given.
    """
    shapes = {}

    def conv_bn(conv, bn, out, inp, k):
        shapes[conv + ".weight"] = (out, inp, k, k)
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{s}"] = (out,)

    conv_bn("conv1", "bn1", 64 * width, 3, 7)
    inplanes = 64 * width
    for layer, blocks in enumerate(BLOCKS, start=1):
        planes = 64 * width * 2 ** (layer - 1)
        for b in range(blocks):
            p = f"layer{layer}.{b}."
            if b == 0:
                conv_bn(p + "downsample.0", p + "downsample.1", 4 * planes, inplanes, 1)
            conv_bn(p + "conv1", p + "bn1", planes, inplanes, 1)
            conv_bn(p + "conv2", p + "bn2", planes, planes, 3)
            conv_bn(p + "conv3", p + "bn3", 4 * planes, planes, 1)
            inplanes = 4 * planes
    if num_classes is not None:
        shapes["fc.weight"] = (num_classes, inplanes)
        shapes["fc.bias"] = (num_classes,)
    return shapes


def _tf_name(kind, n):
    return kind if n == 0 else f"{kind}_{n}"


def _skip_group(name, ema):
    """The group of a tensor that is not converted, or None if it may be."""
    if name == "global_step":
        return "global_step"
    if _SLOTS.fullmatch(name) or name in ("beta1_power", "beta2_power"):
        return "optimizer_slots"
    if name.endswith("/ExponentialMovingAverage"):
        return "ema"
    is_ema = name.startswith("ema_model/")
    if is_ema != ema:
        return "ema" if is_ema else "not_ema"
    rest = name[len("ema_model/"):] if is_ema else name
    if rest.startswith("head_contrastive/"):
        return "projection_head"
    if rest.startswith("base_model/") or rest.startswith("head_supervised/"):
        return None
    return "other"


def plan_mapping(shapes, ema=False, allow_wide=False, where="checkpoint"):
    """Decide, from names and TF shapes alone, which tensor fills which torchvision key.

    shapes: {tf name: TF shape tuple} of every tensor in the checkpoint.
    Returns a dict: 'mapping' [(tf name, torch key, kind)] with kind in {'conv', 'bn',
    'dense_kernel', 'bias'}, 'skipped' {group: [tf names]}, 'width', 'num_classes' (None
    without a supervised head). Raises ``UnsupportedCheckpoint``/``CheckpointError`` with
    the reason when the checkpoint is not a ResNet-50 (sk_ratio 0) SimCLR TF1 checkpoint.
    """
    names = list(shapes)
    if "_CHECKPOINTABLE_OBJECT_GRAPH" in shapes or any(
            "/.ATTRIBUTES/" in n or "/.OPTIMIZER_SLOT/" in n for n in names):
        raise UnsupportedCheckpoint(
            f"{where}: a TF2 object-graph checkpoint (key '_CHECKPOINTABLE_OBJECT_GRAPH'), "
            "e.g. from SimCLR's tf2/ code; only the TF1 checkpoints are supported for now")
    trunk = "ema_model/base_model/" if ema else "base_model/"
    head = ("ema_model/" if ema else "") + _HEAD
    stem = trunk + "conv2d/kernel"
    if stem not in shapes:
        if ema and "base_model/conv2d/kernel" in shapes:
            raise CheckpointError(f"{where}: --ema asks for 'ema_model/base_model/' "
                                  "variables, and this checkpoint has none")
        sample = ", ".join(repr(n) for n in names[:3] if n) or "none"
        raise CheckpointError(f"{where}: not a SimCLR TF1 checkpoint: no '{stem}' "
                              f"(first tensors: {sample})")

    skipped, trunk_names, head_names = {}, [], []
    for n in names:
        group = _skip_group(n, ema)
        if group is not None:
            skipped.setdefault(group, []).append(n)
        elif n.startswith(trunk):
            trunk_names.append(n[len(trunk):])
        elif n.startswith(head):
            head_names.append(n[len(head):])
        else:
            raise CheckpointError(f"{where}: unexpected variable '{n}' in the supervised "
                                  "head; expected only linear_layer/dense/{kernel,bias}")

    kshape = shapes[stem]
    if len(kshape) == 4 and kshape[:3] == (3, 3, 3):
        second = shapes.get(trunk + "conv2d_1/kernel", ())
        if len(second) == 4 and second[:2] == (3, 3) and second[3] == kshape[3]:
            raise UnsupportedCheckpoint(
                f"{where}: a selective-kernel model (sk_ratio > 0: 3-conv ResNet-D stem "
                f"'{stem}' {list(kshape)}, SK convs, average-pooled shortcuts); torchvision's "
                "ResNet-50 cannot hold it")
        raise UnsupportedCheckpoint(f"{where}: stem '{stem}' is a 3x3 conv {list(kshape)} "
                                    "(CIFAR stem?); torchvision's ResNet-50 has a 7x7 stem")
    if len(kshape) != 4 or kshape[:3] != (7, 7, 3) or kshape[3] % 64:
        raise UnsupportedCheckpoint(f"{where}: stem '{stem}' has shape {list(kshape)}; a "
                                    "SimCLR ResNet-50 has [7, 7, 3, 64 * width]")
    width = kshape[3] // 64
    if width != 1 and not allow_wide:
        raise UnsupportedCheckpoint(
            f"{where}: a {width}x wide ResNet-50 (stem '{stem}' {list(kshape)}); "
            f"torchvision's resnet50 holds only 1x. --allow-wide writes the same key names "
            f"for mmseg's ResNet with stem_channels={64 * width}, base_channels={64 * width}")

    convs, bns, unexpected = {}, {}, []
    for n in trunk_names:
        m = _CONV.fullmatch(n)
        if m:
            convs[int(m.group(1) or 0)] = n
            continue
        m = _BN.fullmatch(n)
        if m:
            bns.setdefault(int(m.group(1) or 0), {})[m.group(2)] = n
            continue
        unexpected.append(n)
    if unexpected:
        raise UnsupportedCheckpoint(
            f"{where}: unexpected trunk variable '{trunk}{unexpected[0]}' (and "
            f"{len(unexpected) - 1} more); a SimCLR ResNet-50 trunk holds only conv2d_N/kernel "
            "and batch_normalization_N/{gamma,beta,moving_mean,moving_variance}")
    order = torchvision_modules()
    if sorted(convs) != list(range(len(order))) or sorted(bns) != list(range(len(order))):
        raise UnsupportedCheckpoint(
            f"{where}: {len(convs)} convs and {len(bns)} batch norms under '{trunk}', "
            f"numbered up to {max(convs, default=-1)}; a ResNet-50 (sk_ratio 0) has "
            f"{len(order)} of each, numbered 0..{len(order) - 1}")

    num_classes = None
    if head_names:
        if sorted(head_names) != ["bias", "kernel"]:
            raise CheckpointError(f"{where}: supervised head '{head}' holds {head_names}; "
                                  "expected kernel and bias")
        ks = shapes[head + "kernel"]
        if len(ks) != 2 or shapes[head + "bias"] != ks[1:]:
            raise CheckpointError(f"{where}: supervised head shapes {list(ks)} and "
                                  f"{list(shapes[head + 'bias'])} do not form a linear layer")
        num_classes = ks[1]

    expected = resnet50_shapes(width, num_classes)
    mapping = []
    for n, (conv_key, bn_key) in enumerate(order):
        tf = trunk + convs[n]
        mapping.append((tf, conv_key + ".weight", "conv"))
        missing = sorted(set(_BN_KEYS) - set(bns[n]))
        if missing:
            raise CheckpointError(f"{where}: '{trunk}{_tf_name('batch_normalization', n)}' "
                                  f"has no '{missing[0]}'")
        for tf_field, key in _BN_KEYS.items():
            mapping.append((trunk + bns[n][tf_field], f"{bn_key}.{key}", "bn"))
    if num_classes is not None:
        mapping.append((head + "kernel", "fc.weight", "dense_kernel"))
        mapping.append((head + "bias", "fc.bias", "bias"))

    filled = {}
    for tf, key, kind in mapping:
        if key in filled:
            raise CheckpointError(f"{where}: '{key}' would be filled twice ({filled[key]}, {tf})")
        filled[key] = tf
        got = _torch_shape(shapes[tf], kind)
        if got != expected[key]:
            raise CheckpointError(f"{where}: '{tf}' has shape {list(shapes[tf])}, so '{key}' "
                                  f"would be {list(got)}; a {width}x ResNet-50 needs "
                                  f"{list(expected[key])}")
    if set(filled) != set(expected):
        raise CheckpointError(f"{where}: keys left unfilled: "
                              f"{sorted(set(expected) - set(filled))[:3]}")
    return {"mapping": mapping, "skipped": skipped, "width": width, "num_classes": num_classes}


def _torch_shape(shape, kind):
    if kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)
    if kind == "dense_kernel":
        return tuple(shape[::-1])
    return tuple(shape)


def _to_torch(array, kind):
    if kind == "conv":
        array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif kind == "dense_kernel":
        array = array.T  # [in, out] -> [out, in]
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


# ---------------------------------------------------------------------------------------
# Optional edits that keep the function: conv rescale, ImageNet mean/std fold


def _conv_bn_pairs(state_dict):
    return [(c + ".weight", b) for c, b in torchvision_modules() if c + ".weight" in state_dict]


def torchvision_init_norm(shape):
    """Expected Frobenius norm of a conv kernel (OIHW) under torchvision's ResNet init.

    torchvision draws N(0, 2 / (out * kh * kw)) (Kaiming, fan_out), so the expected squared
    norm is 2 * in_channels (unitless).
    """
    return math.sqrt(2.0 * shape[1])


def stage_of(key):
    """'stem', 'layer1', ..., 'layer4' or 'fc' for a torchvision ResNet key."""
    head = key.split(".", 1)[0]
    return {"conv1": "stem", "bn1": "stem"}.get(head, head)


def conv_norms(state_dict):
    """{stage: (norm of its conv kernels, the expected torchvision-init norm)}.

    Norm of a stage = sqrt of the sum of its conv kernels' squared Frobenius norms.
    """
    sums = {}
    for key, _ in _conv_bn_pairs(state_dict):
        w = state_dict[key].double()
        got, ref = sums.get(stage_of(key), (0.0, 0.0))
        sums[stage_of(key)] = (got + float((w * w).sum()),
                               ref + torchvision_init_norm(w.shape) ** 2)
    return {s: (math.sqrt(a), math.sqrt(b)) for s, (a, b) in sums.items()}


def rescale_convs(state_dict, factors, eps=BN_EPS):
    """Multiply conv kernels by factors and adapt their BNs, keeping eval outputs equal.

    factors: {conv weight key: c > 0}. Each conv is scaled by c, its BN's running_mean by
    c and running_var by c**2; because BN adds eps to the variance, its weight (gamma) is
    also multiplied by sqrt(c**2 var + eps) / (c sqrt(var + eps)), which is 1 when
    eps << var. In training mode BN uses batch statistics, and eps then weighs differently
    (the batch variance scales by c**2, eps does not): the usual case of BN inputs whose
    variance is far above eps is unaffected. Returns a new dict; float32 tensors.
    """
    out = dict(state_dict)
    for key, bn in _conv_bn_pairs(state_dict):
        if key not in factors:
            continue
        c = float(factors[key])
        if not c > 0 or not math.isfinite(c):
            raise ValueError(f"rescale factor for '{key}' must be a positive number, not {c}")
        var = state_dict[bn + ".running_var"].double()
        gain = torch.sqrt(c * c * var + eps) / (c * torch.sqrt(var + eps))
        out[key] = (state_dict[key].double() * c).float()
        out[bn + ".running_mean"] = (state_dict[bn + ".running_mean"].double() * c).float()
        out[bn + ".running_var"] = (var * c * c).float()
        out[bn + ".weight"] = (state_dict[bn + ".weight"].double() * gain).float()
    return out


def fold_input_normalization(state_dict, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Make a network that took RGB in [0, 1] take (x - mean) / std instead.

    conv1's kernel is multiplied by std per input channel and the constant its mean adds,
    sum(kernel * mean) per output channel, moves into bn1.running_mean. bn1's output is
    exact except where conv1 reads its zero padding (3 pixels from the border): a zero in
    normalised space stands for the mean colour, not black, and no state_dict can say
    otherwise. Deeper layers carry that border difference inwards, so the folded network
    is close to, not equal to, the original.
    """
    out = dict(state_dict)
    w = state_dict["conv1.weight"].double()
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    out["conv1.weight"] = (w * s).float()
    shift = (w * m).sum(dim=(1, 2, 3))
    out["bn1.running_mean"] = (state_dict["bn1.running_mean"].double() - shift).float()
    return out


# ---------------------------------------------------------------------------------------
# Forward-time helper: TensorFlow's 'SAME' max-pool


def tf_same_max_pool2d(x, kernel_size=3, stride=2):
    """Max-pool NCHW ``x`` as TensorFlow's padding='SAME' does.

    TF pads (out - 1) * stride + kernel - in in total, the smaller half first, so on an even
    input (the 112x112 stem output of a 224 image) it pads 0 before and 1 after, where
    torchvision's MaxPool2d(3, 2, 1) pads 1 and 1 and every later map shifts by a pixel.
    """
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dimension first
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), kernel_size, stride)


class TFSameMaxPool2d(torch.nn.Module):
    """``tf_same_max_pool2d`` as a module; it has no state, so state_dicts are unchanged."""

    def __init__(self, kernel_size=3, stride=2):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x):
        return tf_same_max_pool2d(x, self.kernel_size, self.stride)


def use_tf_same_maxpool(model):
    """Swap a torchvision ResNet's ``maxpool`` for TF's 'SAME' one; returns the model.

    Needed only to reproduce TensorFlow's activations on inputs of size 0 or 3 mod 4 (e.g.
    224): there a plain torchvision ResNet's features differ from TF's by up to ~23 % of the
    largest feature. Odd stem outputs (e.g. 225 inputs) pad identically either way.
    """
    model.maxpool = TFSameMaxPool2d()
    return model


# ---------------------------------------------------------------------------------------
# Conversion


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version_guess(names, ema_used):
    if ema_used or any(n.startswith("ema_model/") for n in names):
        return "v2", "ema_model/ variables present (SimCLR v2 releases)"
    if any(n.startswith("head_contrastive/nl_") for n in names):
        return "v2", "head_contrastive/nl_* projection head present (SimCLR v2 code)"
    if not any(n.startswith("head_contrastive/") for n in names):
        return "v1", "no head_contrastive variables (like the v1 releases); names alone " \
                     "cannot tell v1 from v2 for sk_ratio 0"
    return None, "names do not tell"


def convert(checkpoint, ema=False, allow_wide=False, rescale=None, fold_imagenet=False,
            verify=True, progress=None, crc_impl="auto"):
    """Convert a SimCLR TF1 ResNet-50 checkpoint to a torchvision-keyed checkpoint dict.

    checkpoint: prefix, ``.index`` file or folder (its ``checkpoint`` file names the latest).
    ema: take the ``ema_model/`` copies instead of the trained variables.
    allow_wide: accept width multipliers > 1 (same keys, mmseg-style widened shapes).
    rescale: None; a float c (every conv kernel times c); or 'torchvision' (each kernel to
        the norm torchvision's init gives its shape). Eval-mode outputs are unchanged
        (see ``rescale_convs``).
    fold_imagenet: fold ImageNet mean/std into conv1 and bn1 (then feed normalised input).
    verify: check every tensor's CRC32C (index blocks are always checked).
    Returns {'state_dict': {key: float32 tensor}, 'input_normalization': {...},
    'conversion': {...}}: only plain types, loadable with torch.load(weights_only=True).
    Raises ``CheckpointError`` (or its subclass ``UnsupportedCheckpoint``).
    """
    if rescale is not None and rescale != "torchvision":
        try:
            ok = float(rescale) > 0 and math.isfinite(float(rescale))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"rescale must be None, 'torchvision' or a positive number, "
                             f"not {rescale!r}")
    prefix = resolve_prefix(checkpoint)
    index = read_index(prefix, crc_impl)
    shapes = {n: e.shape for n, e in index.entries.items()}
    plan = plan_mapping(shapes, ema=ema, allow_wide=allow_wide, where=index.index_path)
    for tf, _, _ in plan["mapping"]:
        if index.entries[tf].dtype != 1:
            raise CheckpointError(f"{index.index_path}: '{tf}' is "
                                  f"{index.entries[tf].dtype_name}, not float32")
    wanted = [tf for tf, _, _ in plan["mapping"]]
    step_entry = index.entries.get("global_step")
    if step_entry is not None and step_entry.dtype in (3, 9) and step_entry.shape == ():
        wanted.append("global_step")
    arrays = read_checkpoint(prefix, names=wanted, verify=verify, progress=progress,
                             crc_impl=crc_impl, index=index)
    global_step = int(arrays.pop("global_step")) if "global_step" in arrays else None

    state_dict = {}
    for tf, key, kind in plan["mapping"]:
        state_dict[key] = _to_torch(arrays.pop(tf), kind)
    stored_norms = conv_norms(state_dict)

    notes = []
    factors = None
    if rescale is not None:
        if rescale == "torchvision":
            factors = {k: torchvision_init_norm(state_dict[k].shape)
                       / max(float(state_dict[k].double().norm()), 1e-30)
                       for k, _ in _conv_bn_pairs(state_dict)}
        else:
            factors = {k: float(rescale) for k, _ in _conv_bn_pairs(state_dict)}
        state_dict = rescale_convs(state_dict, factors)
    else:
        # The median over stages: the stem's norm hangs on the init convention (fan-in or
        # fan-out of a 3-channel input), while v1's scale shows in every stage.
        typical = float(np.median([a / b for a, b in stored_norms.values()]))
        if typical > 4:
            notes.append(f"conv kernels are {typical:.1f}x the norm of torchvision's init "
                         "(SimCLR v1's known scale?); with plain SGD at lr 0.003 such a trunk "
                         "barely moves. Consider --rescale, and state which was used next to "
                         "any SimCLR-vs-MoCo number")
    if fold_imagenet:
        state_dict = fold_input_normalization(state_dict)
        notes.append("ImageNet mean/std folded into conv1/bn1: feed (x - mean) / std. Not "
                     "exact at the image border: conv1 zero-pads in normalised space, i.e. "
                     "with the mean colour instead of black, and deeper layers carry that "
                     "difference inwards. Without the fold the network is exact")
    if ema and plan["num_classes"] is None and any(n.startswith(_HEAD) for n in shapes):
        notes.append("--ema: no EMA supervised head, so no fc weights are written")
    for note in notes:
        warnings.warn(note, stacklevel=2)

    version, evidence = _version_guess(list(index.entries), ema)
    files = [index.index_path] + [index.shard_path(i) for i in range(index.num_shards)]
    final_norms = conv_norms(state_dict)
    record = {
        "converter": CONVERTER,
        "format_version": FORMAT_VERSION,
        "source": os.path.abspath(prefix),
        "source_files": [os.path.abspath(p) for p in files],
        "index_sha256": _sha256(index.index_path),
        "global_step": global_step,
        "simclr_version_guess": version,
        "simclr_version_evidence": evidence,
        "architecture": "resnet50",
        "width_multiplier": plan["width"],
        "mmseg_resnet_config": {"depth": 50, "stem_channels": 64 * plan["width"],
                                "base_channels": 64 * plan["width"]},
        "num_classes": plan["num_classes"],
        "ema": bool(ema),
        "crc_verified": bool(verify),
        "rescale": None if factors is None else {
            "mode": "torchvision" if rescale == "torchvision" else "constant",
            "factors": {k: float(v) for k, v in factors.items()},
            "bn": "running_mean * c, running_var * c**2, weight * sqrt(c**2 var + eps) / "
                  "(c sqrt(var + eps)) (eval outputs unchanged)"},
        "fold_imagenet_normalization": bool(fold_imagenet),
        "fold_exact": None if not fold_imagenet else
        "conv1/bn1 outputs exact except within 3 pixels of the border (zero padding)",
        "bn_eps": BN_EPS,
        "maxpool_note": "SimCLR pools with TF 'SAME' padding: for inputs of size 0 or 3 mod 4 "
                        "(e.g. 224) TF pads 0/1, torchvision 1/1; use_tf_same_maxpool() "
                        "reproduces TF",
        "conv_weight_norms": {s: {"checkpoint": stored_norms[s][0], "output": final_norms[s][0],
                                  "torchvision_init": stored_norms[s][1]}
                              for s in stored_norms},
        "tensors_mapped": len(plan["mapping"]),
        "mapping": {key: tf for tf, key, _ in plan["mapping"]},
        "tensors_skipped": {g: len(v) for g, v in sorted(plan["skipped"].items())},
        "skipped": {g: list(v) for g, v in sorted(plan["skipped"].items())},
        "warnings": notes,
        "torch_version": str(torch.__version__),
    }
    normalization = ({"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "range": "rgb_0_1"}
                     if fold_imagenet else
                     {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "range": "rgb_0_1"})
    return {"state_dict": state_dict, "input_normalization": normalization,
            "conversion": record}


def save_checkpoint(obj, path, overwrite=False):
    """torch.save ``obj`` to ``path`` via a temporary file and os.replace (no half files).

    Refuses to replace an existing file unless ``overwrite``. Returns the file's sha256.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path}: exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".convert_simclr.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return _sha256(path)


# ---------------------------------------------------------------------------------------
# Command line


def _rescale_arg(text):
    if text in ("none", "torchvision"):
        return text
    try:
        c = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected none, torchvision or a number")
    if not c > 0 or not math.isfinite(c):
        raise argparse.ArgumentTypeError(f"{text!r}: the factor must be positive")
    return c


def get_args_parser():
    p = argparse.ArgumentParser(
        description="Convert a SimCLR (v1, or v2 with sk_ratio 0) TensorFlow ResNet-50 "
                    "checkpoint to a torchvision-keyed .pth, without TensorFlow.")
    p.add_argument("checkpoint", help="checkpoint prefix (.../model.ckpt-250228), its .index "
                                      "file, or its folder (the 'checkpoint' file names the "
                                      "latest)")
    p.add_argument("output", help="the .pth to write")
    g = p.add_argument_group("what to convert")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=False,
                   help="take the ema_model/ copies (default: off)")
    g.add_argument("--allow-wide", action=argparse.BooleanOptionalAction, default=False,
                   help="accept 2x/4x widths: same key names, widened shapes for mmseg's "
                        "ResNet (stem_channels = base_channels = 64 * width); torchvision's "
                        "resnet50 cannot load them (default: off)")
    g = p.add_argument_group("output")
    g.add_argument("--rescale", type=_rescale_arg, default="none",
                   help="multiply conv kernels, keeping the function: 'none', a number c "
                        "(1/16.8 brings SimCLR v1 to v2's scale), or 'torchvision' (each "
                        "kernel to torchvision's init norm); recorded in the output "
                        "(default: none)")
    g.add_argument("--fold-imagenet-norm", action=argparse.BooleanOptionalAction,
                   default=False,
                   help="fold ImageNet mean/std into conv1/bn1, for code that normalises "
                        "inputs; exact except at the image border (default: off, the network "
                        "takes RGB in [0, 1])")
    g.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing output file (default: off)")
    g = p.add_argument_group("checks and logging")
    g.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check the CRC32C of every tensor; index blocks are always checked "
                        "(default: on)")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="print one line per mapped tensor")
    return p


def _print_summary(result, output, sha):
    rec = result["conversion"]
    skipped = ", ".join(f"{n} {g.replace('_', ' ')}" for g, n in rec["tensors_skipped"].items())
    guess = rec["simclr_version_guess"] or "unknown"
    print(f"source: {rec['source']} (global step {rec['global_step']}, SimCLR {guess}: "
          f"{rec['simclr_version_evidence']})")
    print(f"mapped {rec['tensors_mapped']} tensors to {rec['width_multiplier']}x ResNet-50 "
          f"keys{' with fc for %d classes' % rec['num_classes'] if rec['num_classes'] else ''}"
          f"; skipped {sum(rec['tensors_skipped'].values())}: {skipped or 'none'}")
    print("conv-weight norm per stage, checkpoint -> output (torchvision init):")
    for stage, n in rec["conv_weight_norms"].items():
        print(f"  {stage:7s} {n['checkpoint']:10.2f} -> {n['output']:10.2f} "
              f"({n['torchvision_init']:.2f}, ratio {n['output'] / n['torchvision_init']:.2f})")
    resc = rec["rescale"]
    if resc is None:
        print("rescale: none (weights as stored)")
    else:
        f = list(resc["factors"].values())
        print(f"rescale: {resc['mode']}, conv factors {min(f):.4g} .. {max(f):.4g}")
    norm = result["input_normalization"]
    print(f"input: RGB in [0, 1], then mean {norm['mean']} std {norm['std']}")
    print(f"wrote {output} (sha256 {sha})")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    rescale = None if args.rescale == "none" else args.rescale
    _, crc_name = _crc_function("auto")
    print(f"{CONVERTER}: {args.checkpoint} -> {args.output} | ema={args.ema} "
          f"allow_wide={args.allow_wide} rescale={args.rescale} "
          f"fold_imagenet_norm={args.fold_imagenet_norm} verify={args.verify} "
          f"(crc32c: {crc_name})", flush=True)
    with warnings.catch_warnings():
        # Warnings in plain words, one line each, instead of Python's file:line format.
        warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
        return _run(args, rescale)


def _run(args, rescale):
    try:
        # Fail before reading gigabytes, not after.
        if os.path.exists(args.output) and not args.overwrite:
            raise FileExistsError(f"{args.output}: exists; pass --overwrite to replace it")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise FileNotFoundError(f"{args.output}: its folder does not exist")
        result = convert(args.checkpoint, ema=args.ema, allow_wide=args.allow_wide,
                         rescale=rescale, fold_imagenet=args.fold_imagenet_norm,
                         verify=args.verify)
        if args.verbose:
            shapes = {k: list(v.shape) for k, v in result["state_dict"].items()}
            for key, tf in result["conversion"]["mapping"].items():
                print(f"  {tf} -> {key} {shapes[key]}")
        sha = save_checkpoint(result, args.output, overwrite=args.overwrite)
    except (CheckpointError, OSError, ValueError) as e:
        sys.stdout.flush()
        msg = str(e) if not isinstance(e, OSError) or not e.filename else \
            f"{e.filename}: {e.strerror}"
        print(f"{CONVERTER}: error: {msg}", file=sys.stderr)
        return 1
    _print_summary(result, args.output, sha)
    return 0


if __name__ == "__main__":
    sys.exit(main())
