"""`python data.py prepare` and `check` (issue 6), against archives served from 127.0.0.1.

The archives are small copies of the real ones, in their real layouts, built here from the
real files in ../shared/data/voc: a VOC tar (VOCdevkit/VOC2012/...) and an SBD tgz
(benchmark_RELEASE/dataset/{img,cls,inst}, train.txt, val.txt) whose cls/*.mat files hold a
GTcls struct written with scipy. A local HTTP server started here serves them; every test
passes its URLs explicitly, and a guard refuses any connection that is not to 127.0.0.1.
Expected values come from the shared files and the set arithmetic written out here.
"""
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

import data

VOC = "VOCdevkit/VOC2012"
SBD = "benchmark_RELEASE/dataset"
VOC_NAME, SBD_NAME = "VOCtrainval_11-May-2012.tar", "benchmark.tgz"
# SBD lists these VOC val ids (as the real SBD lists hold VOC 2012 val images): they must
# stay out of train_aug and keep VOC's label.
VAL_IN_SBD = ("2007_000033", "2007_000129")
TRAIN_IN_SBD = ("2007_000032", "2007_002403", "2007_004166")  # VOC train ids SBD also has
# Two SBD-only ids whose JPEG the test VOC tar leaves out (a trimmed mirror): prepare must
# take them from SBD's img/.
NO_VOC_JPEG = ("2010_004804", "2011_000332")


def voc_path(root, *parts):
    return os.path.join(root, VOC, *parts)


def ids_of(voc_root, split):
    with open(voc_path(voc_root, "ImageSets", "Segmentation", f"{split}.txt")) as f:
        return f.read().split()


def md5(blob):
    return hashlib.md5(blob).hexdigest()


# ----------------------------------------------------------------------------------------
# Archives in the real layouts, built from the shared sample


@pytest.fixture(scope="module")
def ids(voc_root):
    """The sample's ids by role: VOC train, VOC val, SBD-only, and SBD's two lists."""
    train = set(ids_of(voc_root, "train"))
    aug = ids_of(voc_root, "available_aug_train_aug")
    sbd_only = sorted(i for i in aug if i not in train)
    out = {"voc_train": sorted(i for i in aug if i in train),
           "voc_val": sorted(ids_of(voc_root, "available_segclass_val")
                             + ids_of(voc_root, "available_aug_val")),
           "sbd_only": sbd_only}
    out["sbd_train"] = sbd_only[:8] + [VAL_IN_SBD[0]] + list(TRAIN_IN_SBD[:2])
    out["sbd_val"] = sbd_only[8:] + [VAL_IN_SBD[1], TRAIN_IN_SBD[2]]
    assert len(out["voc_train"]) == 10 and len(out["voc_val"]) == 12 and len(sbd_only) == 14
    assert set(VAL_IN_SBD) <= set(out["voc_val"]) and set(TRAIN_IN_SBD) <= set(
        out["voc_train"]) and set(NO_VOC_JPEG) <= set(sbd_only)
    return out


def sample_label(voc_root, i):
    """The sample's label of id i (official, or SBD-derived for the SBD-only ids)."""
    for d in ("SegmentationClass", "SegmentationClassAug"):
        p = voc_path(voc_root, d, f"{i}.png")
        if os.path.isfile(p):
            return p
    raise AssertionError(i)


def add_bytes(tar, name, blob):
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(blob), 1_300_000_000
    tar.addfile(info, io.BytesIO(blob))


def gtcls_mat(seg):
    """A cls/<id>.mat in SBD's structure: struct GTcls with Boundaries (a 20x1 cell of
    sparse boundary maps), Segmentation (uint8 H x W) and CategoriesPresent."""
    boundaries = np.empty((20, 1), dtype=object)
    for c in range(20):
        boundaries[c, 0] = scipy.sparse.csc_matrix(seg.shape, dtype=np.uint8)
    present = np.array([c for c in np.unique(seg) if 0 < c < 21], dtype=np.uint8)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"GTcls": {"Boundaries": boundaries, "Segmentation": seg,
                                     "CategoriesPresent": present}}, do_compression=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def archives(voc_root, ids):
    """{name: bytes} of the two test archives."""
    voc, sbd = io.BytesIO(), io.BytesIO()
    with tarfile.open(fileobj=voc, mode="w") as tar:
        for i in ids["voc_train"] + ids["voc_val"] + ids["sbd_only"]:
            if i not in NO_VOC_JPEG:
                tar.add(voc_path(voc_root, "JPEGImages", f"{i}.jpg"),
                        f"{VOC}/JPEGImages/{i}.jpg")
        for i in ids["voc_train"] + ids["voc_val"]:  # VOC labels every train and val id
            tar.add(sample_label(voc_root, i), f"{VOC}/SegmentationClass/{i}.png")
        for split, members in (("train", ids["voc_train"]), ("val", ids["voc_val"]),
                               ("trainval", sorted(ids["voc_train"] + ids["voc_val"]))):
            add_bytes(tar, f"{VOC}/ImageSets/Segmentation/{split}.txt",
                      "".join(f"{i}\n" for i in members).encode())
        add_bytes(tar, f"{VOC}/Annotations/{ids['voc_train'][0]}.xml", b"<annotation/>\n")
    with tarfile.open(fileobj=sbd, mode="w:gz", compresslevel=1) as tar:
        for i in ids["sbd_train"] + ids["sbd_val"]:
            tar.add(voc_path(voc_root, "JPEGImages", f"{i}.jpg"), f"{SBD}/img/{i}.jpg")
            seg = np.array(Image.open(sample_label(voc_root, i)))
            # SBD has no 255 border; for ids VOC labelled too, this makes SBD's label
            # differ from VOC's, so a leak would show.
            seg[seg == 255] = 0
            add_bytes(tar, f"{SBD}/cls/{i}.mat", gtcls_mat(seg))
        buf = io.BytesIO()
        scipy.io.savemat(buf, {"GTinst": {"Segmentation": np.zeros((2, 2), np.uint8)}})
        add_bytes(tar, f"{SBD}/inst/{ids['sbd_only'][0]}.mat", buf.getvalue())
        for split in ("train", "val"):
            add_bytes(tar, f"{SBD}/{split}.txt",
                      "".join(f"{i}\n" for i in ids[f"sbd_{split}"]).encode())
        add_bytes(tar, "benchmark_RELEASE/benchmark_code_RELEASE/README", b"code\n")
    return {VOC_NAME: voc.getvalue(), SBD_NAME: sbd.getvalue()}


# ----------------------------------------------------------------------------------------
# A local archive server


class Server:
    """Serves {path: bytes} on 127.0.0.1 with Range support; records every request as
    (path, Range header); `drop_once[path] = n` sends only n bytes of the next reply to
    that path and then closes the connection, like a dropped download."""

    def __init__(self):
        self.files, self.drop_once, self.log = {}, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.log.append((self.path, rng))
                blob = server.files.get(self.path)
                if blob is None:
                    self.send_error(404)
                    return
                start = int(rng[len("bytes="):].split("-")[0]) if rng else 0
                if start >= len(blob):
                    self.send_error(416)
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(blob) - 1}/{len(blob)}")
                self.send_header("Content-Length", str(len(blob) - start))
                self.end_headers()
                body = blob[start:]
                cut = server.drop_once.pop(self.path, None)
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def local_network_only(monkeypatch):
    """Any connection from this process to anything but 127.0.0.1 fails the test."""
    real = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] != "127.0.0.1":
            raise AssertionError(f"test tried to reach {address}")
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def serve(server, archives, prefix, **overrides):
    """Put both archives under /prefix/ and return prepare's URL and md5 flags."""
    flags = []
    for name, key in ((VOC_NAME, "voc"), (SBD_NAME, "sbd")):
        server.files[f"/{prefix}/{name}"] = overrides.get(name, archives[name])
        flags += [f"--{key}-url", server.url(f"/{prefix}/{name}"), f"--{key}-md5",
                  md5(archives[name])]
    return flags


def run(repo, *argv):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run([sys.executable, *argv], cwd=repo, capture_output=True, text=True,
                          env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)


def snapshot(root):
    """{file: (size, mtime, inode)}: any rewrite or replacement of a file changes it."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), root)] = (st.st_size, st.st_mtime_ns,
                                                               st.st_ino)
    return out


# ----------------------------------------------------------------------------------------
# prepare


@pytest.fixture(scope="module")
def prepared(repo, server, archives, tmp_path_factory):
    """One clean `python data.py prepare` through the real command line."""
    root = tmp_path_factory.mktemp("prepared") / "voc"
    proc = run(repo, "data.py", "prepare", "--data-root", str(root),
               *serve(server, archives, "clean"))
    assert proc.returncode == 0, proc.stderr
    return root, proc


def test_clean_prepare_builds_train_aug_with_sbd_labels(prepared, voc_root, ids, server):
    root, proc = prepared
    assert {p for p, _ in server.log if p.startswith("/clean/")} == {
        f"/clean/{VOC_NAME}", f"/clean/{SBD_NAME}"}
    # (VOC train + SBD train + SBD val) - VOC val, sorted: the sample's own train_aug list.
    expected = sorted(set(ids["voc_train"]) | set(ids["sbd_only"]))
    assert expected == sorted(ids_of(voc_root, "available_aug_train_aug"))
    assert ids_of(root, "train_aug") == expected
    assert "train_aug 24 (= train + 14 SBD-only ids" in proc.stdout
    # Only the SBD-only ids got an SBD label: a palette PNG with VOC's palette, holding the
    # class indices of the .mat (here the sample's SBD-derived label, pixel for pixel).
    aug_dir = voc_path(root, "SegmentationClassAug")
    assert sorted(os.listdir(aug_dir)) == [f"{i}.png" for i in ids["sbd_only"]]
    with Image.open(voc_path(voc_root, "SegmentationClass", "2007_000032.png")) as im:
        voc_palette = im.getpalette()
    for i in ids["sbd_only"]:
        with Image.open(os.path.join(aug_dir, f"{i}.png")) as im:
            assert im.mode == "P" and im.getpalette() == voc_palette
            assert np.array_equal(np.array(im), np.array(Image.open(sample_label(voc_root, i))))
    # The JPEGs VOC's tar lacked came from SBD's img/, byte for byte.
    for i in NO_VOC_JPEG:
        with open(voc_path(root, "JPEGImages", f"{i}.jpg"), "rb") as a, \
                open(voc_path(voc_root, "JPEGImages", f"{i}.jpg"), "rb") as b:
            assert a.read() == b.read()
    assert "JPEGs taken from SBD 2" in proc.stdout
    assert os.path.isfile(voc_path(root, "Annotations", f"{ids['voc_train'][0]}.xml"))
    leftovers = [p for p in snapshot(root) if p.endswith((".part", ".corrupt"))]
    assert leftovers == []
    ds = data.VOCSegmentation(str(root), "train_aug")
    assert ds.label_sources == {"SegmentationClass": 10, "SegmentationClassAug": 14}


def test_val_id_in_sbd_stays_out_of_train_aug_and_keeps_voc_label(prepared, voc_root, ids):
    root, _ = prepared
    train_aug = set(ids_of(root, "train_aug"))
    for i in VAL_IN_SBD:
        assert i not in train_aug and i in ids_of(root, "val")
        assert not os.path.exists(voc_path(root, "SegmentationClassAug", f"{i}.png"))
        with open(voc_path(root, "SegmentationClass", f"{i}.png"), "rb") as a, \
                open(sample_label(voc_root, i), "rb") as b:
            assert a.read() == b.read()
    for i in TRAIN_IN_SBD:  # annotated by VOC: in train_aug, with VOC's label only
        assert i in train_aug
        assert not os.path.exists(voc_path(root, "SegmentationClassAug", f"{i}.png"))


def test_rerun_changes_nothing_and_needs_no_network(prepared, server, archives, capsys):
    root, _ = prepared
    before, requests = snapshot(root), len(server.log)
    # URLs that would 404: the rerun must not need them.
    flags = serve(server, archives, "clean")
    flags = [f.replace("/clean/", "/gone/") for f in flags]
    assert data.main(["prepare", "--data-root", str(root), *flags]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert snapshot(root) == before and len(server.log) == requests


def test_interrupted_download_resumes_with_a_range_request(server, archives, tmp_path,
                                                           capsys):
    flags = serve(server, archives, "drop")
    half = len(archives[VOC_NAME]) // 2
    server.drop_once[f"/drop/{VOC_NAME}"] = half
    root = tmp_path / "voc"
    final = root / "archives" / VOC_NAME
    assert data.main(["prepare", "--data-root", str(root), *flags]) == 2
    err = capsys.readouterr().err
    assert "download interrupted" in err and f"{VOC_NAME}.part" in err
    assert not final.exists() and os.path.getsize(f"{final}.part") == half
    assert not (root / "VOCdevkit").exists()
    assert data.main(["prepare", "--data-root", str(root), *flags]) == 0
    assert (f"/drop/{VOC_NAME}", f"bytes={half}-") in server.log
    assert md5(final.read_bytes()) == md5(archives[VOC_NAME])
    assert not os.path.exists(f"{final}.part")
    assert len(ids_of(root, "train_aug")) == 24


def test_checksum_mismatch_names_the_archive_and_keeps_it_aside(server, archives, tmp_path,
                                                                capsys):
    bad = bytearray(archives[SBD_NAME])
    bad[len(bad) // 2] ^= 0xFF
    flags = serve(server, archives, "bad", **{SBD_NAME: bytes(bad)})
    root = tmp_path / "voc"
    final = root / "archives" / SBD_NAME
    assert data.main(["prepare", "--data-root", str(root), *flags]) == 2
    err = capsys.readouterr().err
    assert SBD_NAME in err and f"expected {md5(archives[SBD_NAME])}" in err
    assert not final.exists() and not os.path.exists(f"{final}.part")
    assert open(f"{final}.corrupt", "rb").read() == bytes(bad)  # kept, not deleted
    assert not (root / "VOCdevkit").exists()  # nothing extracted before both verified
    # Not fetched again unless asked.
    requests = len(server.log)
    assert data.main(["prepare", "--data-root", str(root), *flags]) == 2
    assert "--redownload" in capsys.readouterr().err and len(server.log) == requests
    server.files[f"/bad/{SBD_NAME}"] = archives[SBD_NAME]  # the mirror is fixed
    assert data.main(["prepare", "--data-root", str(root), *flags, "--redownload"]) == 0
    assert md5(final.read_bytes()) == md5(archives[SBD_NAME])
    assert open(f"{final}.corrupt", "rb").read() == bytes(bad)


def test_hand_fetched_corrupt_archive_is_refused_by_name(server, archives, tmp_path, capsys):
    downloads = tmp_path / "Downloads"
    downloads.mkdir()
    blob = bytearray(archives[VOC_NAME])
    blob[-2000] ^= 0x01
    (downloads / VOC_NAME).write_bytes(bytes(blob))
    (downloads / SBD_NAME).write_bytes(archives[SBD_NAME])
    flags = serve(server, archives, "hand")
    requests = len(server.log)
    argv = ["prepare", "--data-root", str(tmp_path / "voc"), "--archives", str(downloads),
            *flags]
    assert data.main([*argv, "--no-download"]) == 2
    err = capsys.readouterr().err
    assert str(downloads / VOC_NAME) in err and "md5" in err
    assert (downloads / VOC_NAME).read_bytes() == bytes(blob)
    assert len(server.log) == requests
    # A good copy by hand: prepared without any download.
    (downloads / VOC_NAME).write_bytes(archives[VOC_NAME])
    assert data.main([*argv, "--no-download"]) == 0
    assert len(server.log) == requests


def test_archive_member_leaving_the_folder_is_refused(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        add_bytes(tar, f"{VOC}/ImageSets/Segmentation/train.txt", b"a\n")
        add_bytes(tar, f"{VOC}/../../../evil.txt", b"x")
    with pytest.raises(data.DataError, match="evil.txt.*unsafe|unsafe.*evil.txt"):
        data.extract_voc(str(path), str(tmp_path / "voc"))
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))


def test_missing_scipy_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(data.DataError, match="needs scipy"):
        data.read_sbd_label(str(tmp_path / "x.mat"))


def test_set_arithmetic_on_the_official_lists(voc_root):
    train, val = ids_of(voc_root, "train"), ids_of(voc_root, "val")
    train_aug = ids_of(voc_root, "train_aug")
    assert len(train) == 1464 and len(val) == 1449 and len(train_aug) == 10582
    assert set(train) <= set(train_aug) and not set(train_aug) & set(val)
    assert len(set(train_aug) - set(train)) == 9118
    # SBD lists shaped like the real ones: the 9,118 extra ids, plus ids VOC annotated in
    # train and in val, split into SBD's own train and val without regard to VOC's split.
    extra = sorted(set(train_aug) - set(train))
    sbd_train = extra[::2] + train[:300] + val[:500]
    sbd_val = extra[1::2] + train[300:400] + val[500:600]
    aug, sbd_only = data.build_train_aug(train, val, sbd_train, sbd_val)
    assert aug == train_aug and sbd_only == extra  # the published list is sorted too
    data.verify_train_aug(train, val, aug, sbd_only, official=True)
    with pytest.raises(data.DataError, match="VOC val ids in train_aug"):
        data.verify_train_aug(train, val, sorted(aug + [val[0]]), sbd_only)
    with pytest.raises(data.DataError, match="train_aug has 10581 ids, expected 10,582"):
        data.verify_train_aug(train, val, aug[1:], sbd_only[1:] if aug[0] in sbd_only
                              else sbd_only, official=True)


# ----------------------------------------------------------------------------------------
# check


def test_check_reports_corrupt_jpeg_wrong_size_label_bad_values_and_overlap(repo, voc_root,
                                                                           tmp_path):
    root = tmp_path / "voc"
    good, corrupt, small, odd = "2007_000032", "2007_002403", "2007_004166", "2007_000129"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(voc_path(root, d))
    for i in (good, corrupt, small, odd):
        for d, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
            with open(voc_path(voc_root, d, f"{i}.{ext}"), "rb") as f:
                blob = f.read()
            if i == corrupt and ext == "jpg":
                blob = blob[:len(blob) // 2]  # a truncated download
            with open(voc_path(root, d, f"{i}.{ext}"), "wb") as f:
                f.write(blob)
    with Image.open(voc_path(voc_root, "SegmentationClass", f"{small}.png")) as im:
        im.crop((0, 0, im.width - 10, im.height)).save(
            voc_path(root, "SegmentationClass", f"{small}.png"))
    with Image.open(voc_path(voc_root, "SegmentationClass", f"{odd}.png")) as im:
        values = np.array(im)
        values[0, 0] = 50
        out = Image.fromarray(values)
        out.putpalette(im.getpalette())
        out.save(voc_path(root, "SegmentationClass", f"{odd}.png"))
    seg = voc_path(root, "ImageSets", "Segmentation")
    with open(os.path.join(seg, "train_aug.txt"), "w") as f:
        f.write(f"{good}\n{corrupt}\n{small}\n{odd}\n")
    with open(os.path.join(seg, "val.txt"), "w") as f:
        f.write(f"{good}\n")

    proc = run(repo, "data.py", "check", "--data-root", str(root))
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert f"{corrupt}.jpg: cannot decode image" in out
    with Image.open(voc_path(voc_root, "JPEGImages", f"{small}.jpg")) as im:
        w, h = im.size
    assert f"id {small}: label {w - 10}x{h}, image {w}x{h}" in out
    assert f"{odd}.png: values [50] outside 0..20 and 255" in out
    assert "1 undecodable images" in out and "1 size mismatches" in out
    assert f"train_aug & val: 1 shared ids, e.g. {good}" in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("val ")] == ["ok"]


def test_check_on_the_shared_sample(repo, voc_root, capsys):
    proc = run(repo, "data.py", "check", "--data-root", str(voc_root), "--splits",
               "available_aug_train_aug", "available_segclass_val", "available_aug_val")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "modes [L 7, P 17]  ok" in proc.stdout
    assert "train_aug & val: no shared ids" in proc.stdout
    # The full lists: most files are missing here; reported as missing, not a crash.
    assert data.main(["check", "--data-root", str(voc_root), "--splits", "train_aug",
                      "val"]) == 1
    out = capsys.readouterr().out
    assert "train_aug" in out and "10558 missing images, 10558 missing labels" in out
    assert "1437 missing images, 1437 missing labels" in out


def test_prepared_folder_passes_check_and_help_runs(prepared, capsys):
    root, _ = prepared
    assert data.main(["check", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train_aug & val: no shared ids" in out
    for argv in (["--help"], ["prepare", "--help"], ["check", "--help"]):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        assert e.value.code == 0
    assert "--redownload" in capsys.readouterr().out
