"""convert_simclr.py on the real TensorFlow SimCLR checkpoint in ../shared/data/simclr.

Expected values come from TensorFlow (its stored activations, its tensor CRCs and variable
list), from the fixture's README (how its values were drawn), from published CRC32C test
vectors (RFC 3720), from torchvision, or from first principles; never from the converter.
Small format fixtures (two shards, refusals) are written by the minimal bundle writer below,
which follows ../shared/notes/tf-checkpoint.md; the real TensorFlow files stay the reference.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings, strategies as st

import convert_simclr as cs

PREFIX_NAME = "model.ckpt-8790"
DATA_NAME = PREFIX_NAME + ".data-00000-of-00001"
TOL = 1e-4  # max |ours - TF| / max |TF|; a correct port lands near 3e-6 (fixture README)


# ---------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module", autouse=True)
def _threads():
    # One thread: on CI's 2 shared cores, OpenMP's spinning threads ran a ResNet-50 forward
    # pass 7x slower than one thread whenever another process was busy.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_cli(repo, *args):
    """python convert_simclr.py ARGS in the repository; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "convert_simclr.py", *map(str, args)], cwd=repo,
                          capture_output=True, text=True, timeout=300)


def last_line(text):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def act(simclr_dir, name):
    return np.load(simclr_dir / "activations" / f"{name}.npy")


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def resnet(state_dict, num_classes=10):
    model = torchvision.models.resnet50(num_classes=num_classes)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


@torch.inference_mode()
def forward(model, x):
    """The torchvision forward pass, keeping what TF stored: pool, block groups, features."""
    out = {}
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out["initial_max_pool"] = x
    for i in range(1, 5):
        x = getattr(model, f"layer{i}")(x)
        out[f"block_group{i}"] = x
    out["features"] = torch.flatten(model.avgpool(x), 1)
    out["logits_sup"] = model.fc(out["features"])
    return out


def variables(simclr_dir):
    """[(name, dtype, shape)] from TF's listing, in the index's byte-sorted order."""
    rows = []
    for line in (simclr_dir / "variables.txt").read_text().splitlines():
        name, dtype, shape = line.split(" ", 2)
        rows.append((name, dtype, tuple(json.loads(shape))))
    return rows


def raw_layout(simclr_dir):
    """{name: (offset, size, dtype, shape)} of the real data file.

    The fixture README says TF's saver wrote the tensors in key order, back to back;
    checked here by the total matching the file's size.
    """
    layout, offset = {}, 0
    for name, dtype, shape in variables(simclr_dir):
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        layout[name] = (offset, size, dtype, shape)
        offset += size
    assert offset == os.path.getsize(simclr_dir / "r50_1x" / DATA_NAME)
    return layout


def link_copy(src_dir, dst_dir, skip=(), copy=()):
    """dst_dir with symlinks to src_dir's files (real copies for names in copy)."""
    os.makedirs(dst_dir, exist_ok=True)
    for name in os.listdir(src_dir):
        if name in skip:
            continue
        if name in copy:
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
        else:
            os.symlink(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    return dst_dir


# ---------------------------------------------------------------------------------------
# A minimal TensorFlow bundle writer (tests only), after notes/tf-checkpoint.md

_DT = {"float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6,
       "int64": 9, "bool": 10, "float16": 19}


def _varint(n):
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number, wire, payload):
    tag = _varint(number << 3 | wire)
    if wire == 0:
        return tag + _varint(payload)
    if wire == 2:
        return tag + _varint(len(payload)) + payload
    return tag + struct.pack("<I", payload)  # wire 5


def _trailer_crc(data):
    return struct.pack("<I", cs.mask_crc(cs.crc32c(data)))


def _block(pairs, restart_interval):
    out, restarts, prev = bytearray(), [], b""
    for i, (key, value) in enumerate(pairs):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        out += key[shared:] + value
        prev = key
    for r in restarts or [0]:
        out += struct.pack("<I", r)
    return bytes(out + struct.pack("<I", len(restarts or [0])))


def _table(pairs, block_bytes=256 * 1024, compression=0):
    out, index = bytearray(), []

    def put(contents, kind=0):
        offset = len(out)
        out.extend(contents + bytes([kind]) + _trailer_crc(contents + bytes([kind])))
        return _varint(offset) + _varint(len(contents))

    group, size = [], 0
    for key, value in pairs:
        group.append((key, value))
        size += len(key) + len(value)
        if size >= block_bytes:
            index.append((key, put(_block(group, 16), compression)))
            group, size = [], 0
    if group:
        index.append((group[-1][0], put(_block(group, 16), compression)))
    footer = put(_block([], 16)) + put(_block(index, 1))
    return bytes(out + footer + bytes(40 - len(footer)) + bytes.fromhex("57fb808b247547db"))


def numeric(name, array):
    """(name, dtype enum, shape, stored bytes, unmasked crc) of a numeric tensor."""
    array = np.asarray(array)
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
    return name, _DT[array.dtype.name], array.shape, raw, cs.crc32c(raw)


def strings(name, values, shape=None):
    """A string tensor as TF stores it: varint lengths, their masked CRC, the bytes."""
    lengths = b"".join(_varint(len(v)) for v in values)
    crc = 0
    for v in values:
        crc = cs.crc32c(struct.pack("<I", len(v)), crc)
    check = struct.pack("<I", cs.mask_crc(crc))
    crc = cs.crc32c(check, crc)
    crc = cs.crc32c(b"".join(values), crc)
    shape = (len(values),) if shape is None else shape
    return name, 7, shape, lengths + check + b"".join(values), crc


def write_bundle(prefix, tensors, num_shards=1, shard_of=None, reverse=False,
                 endianness=0, block_bytes=256 * 1024, compression=0, extra=()):
    """Write <prefix>.index and its data shards; tensors as from numeric()/strings().

    shard_of(i, name) picks each tensor's shard; reverse writes each shard back to front,
    so that file order differs from key order. extra: raw (key, value) index entries.
    """
    shards = [[] for _ in range(num_shards)]
    for i, t in enumerate(tensors):
        shards[shard_of(i, t[0]) if shard_of else 0].append(t)
    entries = []
    for sid, group in enumerate(shards):
        offset = 0
        with open(f"{prefix}.data-{sid:05d}-of-{num_shards:05d}", "wb") as f:
            for name, dtype, shape, raw, crc in (group[::-1] if reverse else group):
                f.write(raw)
                shape_msg = b"".join(_field(2, 2, _field(1, 0, d) if d else b"") for d in shape)
                msg = _field(1, 0, dtype) + _field(2, 2, shape_msg)
                msg += (_field(3, 0, sid) if sid else b"") + (_field(4, 0, offset) if offset
                                                               else b"")
                msg += (_field(5, 0, len(raw)) if raw else b"") + _field(6, 5, cs.mask_crc(crc))
                entries.append((name.encode(), msg))
                offset += len(raw)
    header = _field(1, 0, num_shards) + (_field(2, 0, endianness) if endianness else b"")
    header += _field(3, 2, _field(1, 0, 1))
    pairs = sorted([(b"", header)] + entries + list(extra))
    with open(prefix + ".index", "wb") as f:
        f.write(_table(pairs, block_bytes, compression))
    return prefix


def real_tensors(simclr_dir):
    """The real checkpoint's tensors as (name, dtype, shape, raw bytes, crc), read with
    plain file reads at the offsets raw_layout() derives from TF's variable list."""
    out = []
    with open(simclr_dir / "r50_1x" / DATA_NAME, "rb") as f:
        for name, (offset, size, dtype, shape) in raw_layout(simclr_dir).items():
            f.seek(offset)
            raw = f.read(size)
            out.append((name, _DT[dtype], shape, raw, cs.crc32c(raw)))
    return out


# ---------------------------------------------------------------------------------------
# CRC32C

VECTORS = [  # RFC 3720 B.4 and the check value of the Castagnoli CRC
    (b"123456789", 0xE3069283), (b"", 0x00000000), (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43), (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("impl", ["numpy", "crc32c"])
def test_crc32c_known_vectors(impl):
    for data, expected in VECTORS:
        assert cs.crc32c(data, impl=impl) == expected, data


def test_crc32c_numpy_equals_package_on_large_buffers():
    rng = np.random.default_rng(0)
    # Sizes around the numpy path's thresholds and lane padding.
    for n in (4095, 4096, 4097, 65537, 3 * 2**20 + 13):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert cs.crc32c(data, impl="numpy") == cs.crc32c(data.tobytes(), impl="crc32c"), n


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=20000), cut=st.integers(0, 20000), seed=st.integers(0, 2**32 - 1))
def test_crc32c_paths_agree_and_stream(data, cut, seed):
    cut = min(cut, len(data))
    expected = cs.crc32c(data, impl="crc32c")
    assert cs.crc32c(data, impl="numpy") == expected
    assert cs.crc32c(data[cut:], cs.crc32c(data[:cut], impl="numpy"), impl="numpy") == expected
    assert cs.unmask_crc(cs.mask_crc(seed)) == seed


def test_crc32c_falls_back_to_numpy_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "crc32c", None)  # makes 'import crc32c' fail
    assert cs._crc_function("auto")[1] == "numpy"
    assert cs.crc32c(b"123456789") == 0xE3069283
    with pytest.raises(ImportError, match="pip install crc32c"):
        cs.crc32c(b"", impl="crc32c")


@pytest.mark.parametrize("impl", ["numpy", "crc32c"])
def test_both_crc_paths_accept_tensorflows_stored_crcs(simclr_dir, impl):
    # Every block CRC and all 274 tensor CRCs were written by TensorFlow.
    prefix = str(simclr_dir / "r50_1x" / PREFIX_NAME)
    assert cs.read_checkpoint(prefix, names=[], verify=True, crc_impl=impl) == {}


# ---------------------------------------------------------------------------------------
# Reading the real checkpoint


def test_index_matches_tensorflows_variable_list(simclr_dir):
    index = cs.read_index(str(simclr_dir / "r50_1x" / PREFIX_NAME))
    assert index.num_shards == 1 and index.endianness == 0
    assert index.version == {"producer": 1}
    listed = variables(simclr_dir)
    assert [(e.name, e.dtype_name, e.shape) for e in index.entries.values()] == listed
    layout = raw_layout(simclr_dir)
    assert {n: (e.offset, e.size) for n, e in index.entries.items()} == \
        {n: v[:2] for n, v in layout.items()}


def test_values_are_what_the_fixture_drew(simclr_dir):
    arrays = cs.read_checkpoint(str(simclr_dir / "r50_1x" / PREFIX_NAME))
    assert arrays["global_step"].dtype == np.int64 and int(arrays["global_step"]) == 8790
    stem = arrays["base_model/conv2d/kernel"]
    assert stem.shape == (7, 7, 3, 64) and stem.dtype == np.float32
    np.testing.assert_allclose(np.abs(stem), 0.11664237, rtol=1e-6)  # He std, 7*7*3 fan-in
    for name, a in arrays.items():
        if name.startswith("base_model/conv2d") and name.endswith("/kernel"):
            kh, kw, cin, _ = a.shape
            np.testing.assert_allclose(np.abs(a), np.sqrt(2 / (kh * kw * cin)), rtol=1e-6)
        if name.endswith("/Momentum"):
            k = a * 2**12
            assert np.array_equal(k, np.round(k)) and np.abs(k).max() <= 2
    assert np.allclose(np.abs(arrays["head_supervised/linear_layer/dense/kernel"]), 2048**-0.5)


@pytest.mark.parametrize("impl", ["numpy", "crc32c"])
def test_large_tensors_stream_in_chunks(simclr_dir, monkeypatch, impl):
    # The fixture's largest tensor is 9 MiB; an odd small chunk makes every one span reads.
    monkeypatch.setattr(cs, "READ_CHUNK", 2**20 + 3)
    name = "base_model/conv2d_48/kernel"  # layer4.1.conv2, 3x3x512x512
    got = cs.read_checkpoint(str(simclr_dir / "r50_1x" / PREFIX_NAME), names=[name],
                             crc_impl=impl)[name]
    offset, size, _, shape = raw_layout(simclr_dir)[name]
    assert size > 8 * (2**20 + 3)
    with open(simclr_dir / "r50_1x" / DATA_NAME, "rb") as f:
        f.seek(offset)
        expected = np.frombuffer(f.read(size), "<f4").reshape(shape)
    assert np.array_equal(got, expected)


def test_resolve_prefix_forms(simclr_dir, tmp_path):
    folder = simclr_dir / "r50_1x"
    prefix = str(folder / PREFIX_NAME)
    assert cs.resolve_prefix(folder) == prefix
    assert cs.resolve_prefix(prefix + ".index") == prefix
    assert cs.resolve_prefix(str(folder / DATA_NAME)) == prefix
    # A 'checkpoint' file from the training machine names an absolute remote path.
    moved = link_copy(folder, tmp_path / "moved", skip={"checkpoint"})
    (moved / "checkpoint").write_text(
        'model_checkpoint_path: "gs://bucket/run/model.ckpt-8790"\n'
        'all_model_checkpoint_paths: "gs://bucket/run/model.ckpt-8790"\n')
    assert cs.resolve_prefix(moved) == str(moved / PREFIX_NAME)
    bare = link_copy(folder, tmp_path / "bare", skip={"checkpoint"})
    assert cs.resolve_prefix(bare) == str(bare / PREFIX_NAME)
    with pytest.raises(cs.CheckpointError, match="no such file"):
        cs.resolve_prefix(str(tmp_path / "nothing"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupt_index_raises_checkpoint_error_or_reads_the_same(simclr_dir, data):
    original = (simclr_dir / "r50_1x" / (PREFIX_NAME + ".index")).read_bytes()
    reference = cs.read_index(str(simclr_dir / "r50_1x" / PREFIX_NAME)).entries
    buf = bytearray(original)
    if data.draw(st.booleans(), label="truncate"):
        buf = buf[:data.draw(st.integers(0, len(buf) - 1), label="length")]
    else:
        pos = data.draw(st.integers(0, len(buf) - 1), label="pos")
        buf[pos] ^= data.draw(st.integers(1, 255), label="xor")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, PREFIX_NAME)
        with open(prefix + ".index", "wb") as f:
            f.write(buf)
        try:
            entries = cs.read_index(prefix).entries
        except cs.CheckpointError:
            return
    # Only the footer's zero padding is outside every checksum.
    assert entries == reference


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(
    st.tuples(st.text("abcxyz_/0123", min_size=1, max_size=12),
              st.sampled_from(["float32", "int64", "float16", "uint8", "bool", "string"]),
              st.lists(st.integers(0, 3), max_size=3)),
    min_size=1, max_size=12, unique_by=lambda s: s[0]),
    num_shards=st.integers(1, 3), block_bytes=st.integers(16, 400), seed=st.integers(0, 99))
def test_reader_round_trips_written_bundles(specs, num_shards, block_bytes, seed):
    rng = np.random.default_rng(seed)
    tensors, expected = [], {}
    for name, dtype, shape in specs:
        if dtype == "string":
            values = [rng.bytes(int(rng.integers(0, 6))) for _ in range(int(np.prod(shape)))]
            tensors.append(strings(name, values, tuple(shape)))
            expected[name] = np.array(values, dtype=object).reshape(shape)
        else:
            a = (rng.standard_normal(shape) * 100).astype(dtype)
            tensors.append(numeric(name, a))
            expected[name] = a
    with tempfile.TemporaryDirectory() as tmp:
        prefix = write_bundle(os.path.join(tmp, "ckpt"), tensors, num_shards=num_shards,
                              shard_of=lambda i, n: i % num_shards, reverse=seed % 2 == 1,
                              block_bytes=block_bytes)
        got = cs.read_checkpoint(prefix)
    assert list(got) == sorted(expected, key=str.encode)
    for name, a in expected.items():
        assert got[name].shape == a.shape and got[name].dtype == a.dtype
        assert np.array_equal(got[name], a)


# ---------------------------------------------------------------------------------------
# The end-to-end conversion, through the command line


@pytest.fixture(scope="module")
def converted(repo, simclr_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "simclr_r50.pth"
    proc = run_cli(repo, simclr_dir / "r50_1x", out, "-v")
    assert proc.returncode == 0, proc.stderr
    return {"path": out, "proc": proc, "ckpt": torch.load(out, weights_only=True)}


def test_cli_output_and_record(converted, simclr_dir):
    proc, ckpt = converted["proc"], converted["ckpt"]
    per_tensor = [ln for ln in proc.stdout.splitlines() if " -> " in ln and "[" in ln]
    assert len(per_tensor) == 53 + 53 * 4 + 2
    assert "base_model/conv2d_11/kernel -> layer2.0.downsample.0.weight" in proc.stdout
    assert "mapped 267 tensors" in proc.stdout and "skipped 7" in proc.stdout
    assert "reading" in proc.stderr  # tqdm's bar: the data file is over 64 MiB
    assert set(ckpt) == {"state_dict", "input_normalization", "conversion"}
    assert ckpt["input_normalization"] == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                                           "range": "rgb_0_1"}
    rec = ckpt["conversion"]
    manifest = json.loads((simclr_dir / "manifest.json").read_text())
    assert rec["index_sha256"] == manifest["files"]["r50_1x/model.ckpt-8790.index"]["sha256"]
    assert rec["converter"] == "convert_simclr.py" and rec["global_step"] == 8790
    assert rec["tensors_mapped"] == 267 and rec["rescale"] is None and rec["ema"] is False
    assert rec["fold_imagenet_normalization"] is False and rec["crc_verified"] is True
    assert rec["tensors_skipped"] == {"global_step": 1, "optimizer_slots": 2,
                                      "projection_head": 4}
    assert rec["simclr_version_guess"] == "v2"  # built from SimCLR's v2 TF1 code
    assert rec["source_files"][1].endswith(DATA_NAME)
    # torchvision's keys and shapes, minus the BN counters TF does not have.
    reference = {k: tuple(v.shape) for k, v in
                 torchvision.models.resnet50(num_classes=10).state_dict().items()
                 if not k.endswith("num_batches_tracked")}
    sd = ckpt["state_dict"]
    assert {k: tuple(v.shape) for k, v in sd.items()} == reference
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert cs.resnet50_shapes(1, 10) == reference


def test_225_matches_tensorflow(converted, simclr_dir):
    model = resnet(converted["ckpt"]["state_dict"])
    out = forward(model, nchw(act(simclr_dir, "inputs_225")))
    errors = {}
    for g in range(1, 5):  # block outputs are stored for the first image only
        errors[g] = rel_err(nhwc(out[f"block_group{g}"][:1]),
                            act(simclr_dir, f"block_group{g}_225"))
    errors["features"] = rel_err(out["features"], act(simclr_dir, "features_225"))
    errors["logits"] = rel_err(out["logits_sup"], act(simclr_dir, "logits_sup_225"))
    assert max(errors.values()) < TOL, errors


def test_224_symmetric_pool_and_tf_same_pool(converted, simclr_dir):
    sd = converted["ckpt"]["state_dict"]
    x = nchw(act(simclr_dir, "inputs_224"))
    plain = forward(resnet(sd), x)
    assert rel_err(plain["features"], act(simclr_dir, "features_224_symmetric_maxpool")) < TOL
    # The documented gap of torchvision's pool on 224 inputs: 0.232 in the fixture README.
    gap = rel_err(plain["features"], act(simclr_dir, "features_224"))
    assert 0.2 < gap < 0.26, gap

    model = cs.use_tf_same_maxpool(resnet(sd))
    assert set(model.state_dict()) == set(resnet(sd).state_dict())
    tf_like = forward(model, x)
    errors = {"pool": rel_err(nhwc(tf_like["initial_max_pool"][:1]),
                              act(simclr_dir, "initial_max_pool_224"))}
    for g in (2, 3, 4):
        errors[g] = rel_err(nhwc(tf_like[f"block_group{g}"][:1]),
                            act(simclr_dir, f"block_group{g}_224"))
    errors["features"] = rel_err(tf_like["features"], act(simclr_dir, "features_224"))
    errors["logits"] = rel_err(tf_like["logits_sup"], act(simclr_dir, "logits_sup_224"))
    assert max(errors.values()) < TOL, errors
    # On odd stem outputs (225 inputs) TF's padding is torchvision's.
    x225 = nchw(act(simclr_dir, "inputs_225"))
    assert rel_err(forward(model, x225)["features"], act(simclr_dir, "features_225")) < TOL


def test_cli_keeps_existing_output(converted, simclr_dir, capsys):
    before = converted["path"].read_bytes()
    assert cs.main([str(simclr_dir / "r50_1x"), str(converted["path"])]) == 1
    assert "--overwrite" in last_line(capsys.readouterr().err)
    assert converted["path"].read_bytes() == before


# ---------------------------------------------------------------------------------------
# Rescale and fold


@pytest.fixture(scope="module")
def prefix(simclr_dir):
    return str(simclr_dir / "r50_1x" / PREFIX_NAME)


@pytest.mark.parametrize("rescale", [1 / 16.8, "torchvision"])
def test_rescale_keeps_function(converted, simclr_dir, prefix, rescale):
    plain = converted["ckpt"]["state_dict"]
    result = cs.convert(prefix, rescale=rescale)
    sd, rec = result["state_dict"], result["conversion"]
    out = forward(resnet(sd), nchw(act(simclr_dir, "inputs_225")))
    assert rel_err(out["features"], act(simclr_dir, "features_225")) < TOL
    assert rel_err(out["logits_sup"], act(simclr_dir, "logits_sup_225")) < TOL
    convs = [k for k, v in sd.items() if v.ndim == 4]
    assert len(convs) == 53 and set(rec["rescale"]["factors"]) == set(convs)
    for key in convs:
        c = rec["rescale"]["factors"][key]
        if rescale != "torchvision":
            assert c == pytest.approx(1 / 16.8)
        else:  # torchvision's init: N(0, 2 / fan_out) has squared norm 2 * in_channels
            assert float(sd[key].double().norm()) == pytest.approx(
                np.sqrt(2 * sd[key].shape[1]), rel=1e-5)
        torch.testing.assert_close(sd[key], plain[key] * c, rtol=1e-5, atol=0)
        bn = key.replace("conv", "bn").replace("downsample.0", "downsample.1")[:-len(".weight")]
        torch.testing.assert_close(sd[bn + ".running_var"], plain[bn + ".running_var"] * c * c,
                                   rtol=1e-5, atol=0)
    for stage, n in rec["conv_weight_norms"].items():
        if rescale != "torchvision":
            assert n["output"] == pytest.approx(n["checkpoint"] / 16.8, rel=1e-5), stage


def test_reference_norms_are_torchvisions_init():
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    sd = model.state_dict()
    for stage, (got, reference) in cs.conv_norms(sd).items():
        assert got == pytest.approx(reference, rel=0.02), stage


def test_fold_imagenet_normalization(converted, simclr_dir, prefix):
    plain_sd = converted["ckpt"]["state_dict"]
    with pytest.warns(UserWarning, match="border"):
        result = cs.convert(prefix, fold_imagenet=True)
    assert result["input_normalization"] == {"mean": [0.485, 0.456, 0.406],
                                             "std": [0.229, 0.224, 0.225],
                                             "range": "rgb_0_1"}
    assert result["conversion"]["fold_imagenet_normalization"] is True
    x = nchw(act(simclr_dir, "inputs_225"))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    xn = (x - mean) / std
    folded, plain = resnet(result["state_dict"]), resnet(plain_sd)
    with torch.inference_mode():
        a = folded.bn1(folded.conv1(xn))
        b = plain.bn1(plain.conv1(x))
        # conv1 (7x7, stride 2, pad 3) on 225 reads padding in output rows/cols 0, 1, 111, 112.
        assert rel_err(a[..., 2:-2, 2:-2], b[..., 2:-2, 2:-2]) < 1e-5
        # Without the padding the fold is exact through the whole network.
        for m in (folded, plain):
            m.conv1.padding = (0, 0)
        err = rel_err(forward(folded, xn)["features"], forward(plain, x)["features"])
        assert err < TOL, err
        for m in (folded, plain):
            m.conv1.padding = (3, 3)
        # With it, the border differs (documented in the warning and the record).
        gap = rel_err(forward(folded, xn)["features"], forward(plain, x)["features"])
        assert gap > 1e-3


# ---------------------------------------------------------------------------------------
# Other layouts and bad input


@pytest.fixture(scope="module")
def two_shards(simclr_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_shards")
    return write_bundle(str(folder / PREFIX_NAME), real_tensors(simclr_dir), num_shards=2,
                        shard_of=lambda i, name: i % 2, reverse=True)


def test_two_shard_checkpoint(two_shards, converted, simclr_dir):
    result = cs.convert(two_shards)
    assert [os.path.basename(p) for p in result["conversion"]["source_files"][1:]] == [
        PREFIX_NAME + ".data-00000-of-00002", PREFIX_NAME + ".data-00001-of-00002"]
    out = forward(resnet(result["state_dict"]), nchw(act(simclr_dir, "inputs_225")))
    assert rel_err(out["features"], act(simclr_dir, "features_225")) < TOL
    assert rel_err(out["logits_sup"], act(simclr_dir, "logits_sup_225")) < TOL


def _bad_inputs(simclr_dir, two_shards, root):
    """{case: checkpoint argument} of four inputs the command line must refuse."""
    cases = {}
    folder = link_copy(os.path.dirname(two_shards), root / "missing_shard",
                       skip={PREFIX_NAME + ".data-00001-of-00002"})
    cases["missing_shard"] = folder / PREFIX_NAME

    folder = link_copy(simclr_dir / "r50_1x", root / "flipped", copy={DATA_NAME})
    offset, size, _, _ = raw_layout(simclr_dir)["base_model/conv2d_13/kernel"]
    with open(folder / DATA_NAME, "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    cases["flipped_byte"] = folder

    folder = link_copy(simclr_dir / "r50_1x", root / "truncated",
                       skip={PREFIX_NAME + ".index"})
    data = (simclr_dir / "r50_1x" / (PREFIX_NAME + ".index")).read_bytes()
    (folder / (PREFIX_NAME + ".index")).write_bytes(data[:6000])
    cases["truncated_index"] = folder / PREFIX_NAME

    rng = np.random.default_rng(0)
    os.makedirs(root / "not_simclr")
    cases["not_simclr"] = write_bundle(str(root / "not_simclr" / "model.ckpt-100"), [
        numeric("resnet_v1_50/conv1/weights", rng.standard_normal((7, 7, 3, 64), np.float32)),
        numeric("resnet_v1_50/conv1/BatchNorm/gamma", np.ones(64, np.float32)),
        numeric("global_step", np.array(100, np.int64))])
    return cases


@pytest.fixture(scope="module")
def cli_errors(repo, simclr_dir, two_shards, tmp_path_factory):
    """{case: (checkpoint, returncode, stderr, output path)} from the real command line.

    The runs go side by side: each spends most of its time importing torch.
    """
    root = tmp_path_factory.mktemp("bad_inputs")
    runs = {}
    for case, ckpt in _bad_inputs(simclr_dir, two_shards, root).items():
        out = root / f"{case}.pth"
        runs[case] = (ckpt, out, subprocess.Popen(
            [sys.executable, "convert_simclr.py", str(ckpt), str(out)], cwd=repo,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for case, (ckpt, out, proc) in runs.items():
        _, stderr = proc.communicate(timeout=300)
        results[case] = (ckpt, proc.returncode, stderr, out)
    return results


def check_refused(result, *words):
    """Non-zero exit, no traceback, no output, and every word in stderr's last line."""
    _, returncode, stderr, out = result
    assert returncode not in (0, None), stderr
    assert "Traceback" not in stderr and not out.exists()
    line = last_line(stderr)
    for word in words:
        assert word in line, stderr


def test_missing_data_shard(cli_errors):
    check_refused(cli_errors["missing_shard"], "missing", PREFIX_NAME + ".data-00001-of-00002")


def test_flipped_byte_names_the_tensor(cli_errors):
    check_refused(cli_errors["flipped_byte"], "base_model/conv2d_13/kernel", "CRC32C", DATA_NAME)
    # --no-verify is the user's explicit choice to read it anyway.
    cs.convert(cli_errors["flipped_byte"][0], verify=False)


def test_truncated_index(cli_errors):
    check_refused(cli_errors["truncated_index"], PREFIX_NAME + ".index", "truncated")


def test_non_simclr_checkpoint(cli_errors):
    check_refused(cli_errors["not_simclr"], "not a SimCLR", "model.ckpt-100.index",
                  "resnet_v1_50/conv1")


def test_refuses_tf2_object_graph_checkpoints(tmp_path):
    prefix = write_bundle(str(tmp_path / "ckpt-1"), [
        strings("_CHECKPOINTABLE_OBJECT_GRAPH", [b"\x0a\x00"], shape=()),
        numeric("model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE",
                np.zeros((7, 7, 3, 64), np.float32))])
    with pytest.raises(cs.UnsupportedCheckpoint, match="_CHECKPOINTABLE_OBJECT_GRAPH"):
        cs.convert(prefix)


def test_refuses_snappy_big_endian_and_partitioned(tmp_path):
    tensors = [numeric("base_model/conv2d/kernel", np.zeros((7, 7, 3, 64), np.float32))]
    snappy = write_bundle(str(tmp_path / "snappy"), tensors, compression=1)
    with pytest.raises(cs.UnsupportedCheckpoint, match="snappy"):
        cs.convert(snappy)
    big = write_bundle(str(tmp_path / "big"), tensors, endianness=1)
    with pytest.raises(cs.UnsupportedCheckpoint, match="big-endian"):
        cs.convert(big)
    # A [10, 4] variable in 3 parts: the full entry has slices, parts have binary keys.
    extent = _field(1, 2, b"") + _field(1, 2, b"")
    whole = _field(1, 0, 1) + _field(2, 2, _field(2, 2, _field(1, 0, 10))
                                     + _field(2, 2, _field(1, 0, 4))) + _field(7, 2, extent)
    part = b"\x00outer/part\x00\x01\x01\x02\x80\x84\x80\x84"
    parted = write_bundle(str(tmp_path / "parted"), tensors,
                          extra=[(b"outer/part", whole), (part, whole)])
    with pytest.raises(cs.UnsupportedCheckpoint, match="'outer/part' is partitioned"):
        cs.convert(parted)


def _fixture_shapes(simclr_dir, width=1):
    """TF shapes of the fixture, every channel count (not the RGB input) times width."""
    shapes = {}
    for name, _, shape in variables(simclr_dir):
        if name.startswith("base_model/conv2d"):
            kh, kw, cin, cout = shape
            shape = (kh, kw, cin if cin == 3 else cin * width, cout * width)
        elif name.startswith("base_model/") or name.startswith("head_contrastive"):
            shape = tuple(d * width for d in shape)
        elif name.startswith("head_supervised/linear_layer/dense/kernel"):
            shape = (shape[0] * width, shape[1])
        shapes[name] = shape
    return shapes


def test_wide_models_need_allow_wide(simclr_dir):
    shapes = _fixture_shapes(simclr_dir, width=2)
    with pytest.raises(cs.UnsupportedCheckpoint, match="2x wide.*--allow-wide"):
        cs.plan_mapping(shapes)
    plan = cs.plan_mapping(shapes, allow_wide=True)
    assert plan["width"] == 2
    got = {key: cs._torch_shape(shapes[tf], kind) for tf, key, kind in plan["mapping"]}
    # mmseg-style widening of torchvision's shapes: every channel count but RGB doubles.
    for key, v in torchvision.models.resnet50(num_classes=10).state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        shape = tuple(v.shape)
        if v.ndim == 4:
            shape = (shape[0] * 2, shape[1] if shape[1] == 3 else shape[1] * 2) + shape[2:]
        elif key == "fc.weight":
            shape = (shape[0], shape[1] * 2)
        elif key != "fc.bias":
            shape = (shape[0] * 2,)
        assert got.pop(key) == shape, key
    assert not got


def test_refuses_selective_kernel_and_broken_trunks(simclr_dir):
    shapes = _fixture_shapes(simclr_dir)
    sk = dict(shapes)
    sk["base_model/conv2d/kernel"] = (3, 3, 3, 32)
    sk["base_model/conv2d_1/kernel"] = (3, 3, 32, 32)
    with pytest.raises(cs.UnsupportedCheckpoint, match="selective-kernel"):
        cs.plan_mapping(sk)
    missing = dict(shapes)
    del missing["base_model/batch_normalization_7/beta"]
    with pytest.raises(cs.CheckpointError, match="batch_normalization_7.*beta"):
        cs.plan_mapping(missing)
    swapped = dict(shapes)
    a, b = "base_model/conv2d_2/kernel", "base_model/conv2d_3/kernel"
    swapped[a], swapped[b] = shapes[b], shapes[a]
    with pytest.raises(cs.CheckpointError, match="conv2d_2/kernel.*layer1.0.conv1.weight"):
        cs.plan_mapping(swapped)
    se = dict(shapes, **{"base_model/conv2d_53/bias": (64,)})
    with pytest.raises(cs.UnsupportedCheckpoint, match="conv2d_53/bias"):
        cs.plan_mapping(se)


def test_ema_copies_skipped_unless_asked(simclr_dir):
    shapes = _fixture_shapes(simclr_dir)
    with_ema = dict(shapes, **{"ema_model/" + n: s for n, s in shapes.items()
                               if n.startswith(("base_model/", "head_contrastive/"))})
    plan = cs.plan_mapping(with_ema)
    assert len(plan["skipped"]["ema"]) == 265 + 4
    assert all(tf.startswith("base_model/") or tf.startswith("head_supervised/")
               for tf, _, _ in plan["mapping"])
    plan = cs.plan_mapping(with_ema, ema=True)
    trunk = [tf for tf, key, _ in plan["mapping"] if not key.startswith("fc.")]
    assert len(trunk) == 265 and all(tf.startswith("ema_model/base_model/") for tf in trunk)
    assert plan["num_classes"] is None  # no EMA copy of the supervised head
    with pytest.raises(cs.CheckpointError, match="--ema"):
        cs.plan_mapping(shapes, ema=True)


def test_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cs.get_args_parser().parse_args(["--help"])
    assert e.value.code == 0 and "--fold-imagenet-norm" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cs.get_args_parser().parse_args(["a", "b", "--rescale", "0"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="rescale"):
        cs.convert("never-read", rescale=-1.0)
