"""Checkpoints and model files as an attacker would write them: every one fails with one clear
ValueError before anything large is allocated or any memory outside a storage is read."""

import os
import tracemalloc
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

import crafted
from npanomaly import backbones
from npanomaly.checkpoint import load_torch_checkpoint, read_npz
from npanomaly.cli import main

TWELVE = np.arange(12, dtype=np.float32).tobytes()
WRITERS = {"zip": crafted.zip_checkpoint, "legacy": crafted.legacy_checkpoint}


def peak_allocation(function, *args, **kwargs):
    """(result or raised exception, peak bytes allocated by Python and NumPy while it ran)."""
    tracemalloc.start()
    try:
        try:
            outcome = function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the caller inspects it
            outcome = error
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_a_well_formed_crafted_view_reads_as_torch_would(layout, tmp_path):
    """The helper's files are real checkpoints (torch reads them the same where installed)."""
    state = OrderedDict(w=crafted.Tensor("0", 2, (2, 3), (3, 1), numel=12))
    path = WRITERS[layout](tmp_path / "ok.pt", state, {"0": TWELVE})
    np.testing.assert_array_equal(load_torch_checkpoint(path)["w"], np.arange(2, 8, dtype=np.float32).reshape(2, 3))
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(torch.load(path, weights_only=True)["w"].numpy(), load_torch_checkpoint(path)["w"])


@pytest.mark.parametrize("layout", sorted(WRITERS))
@pytest.mark.parametrize("offset, size, stride, match", [
    (-4, (2, 3), (3, 1), "invalid storage offset"),          # was: heap memory before the buffer read as weights
    (-10 ** 7, (4096, 1024), (1024, 1), "invalid storage offset"),  # was: a segmentation fault
    (0, (2, 3), (-3, 1), "invalid stride"),
    (0, (2, -3), (3, 1), "invalid shape"),
    (0, (2, 3), (3.0, 1), "invalid stride"),
    (0, (40000, 40000), (0, 0), "does not fit its storage"),  # stride 0: 6 GiB from 48 bytes
    (10, (2, 3), (3, 1), "does not fit its storage"),
    (0, (4, 4), (4, 1), "does not fit its storage"),
    (12, (), (), "does not fit its storage"),
])
def test_tensors_that_do_not_fit_their_storage_are_refused_before_allocation(layout, offset, size, stride, match,
                                                                             tmp_path):
    state = OrderedDict(w=crafted.Tensor("0", offset, size, stride, numel=12))
    path = WRITERS[layout](tmp_path / "bad.pt", state, {"0": TWELVE})
    error, peak = peak_allocation(load_torch_checkpoint, path)
    assert isinstance(error, ValueError) and match in str(error), error
    assert peak < 1 << 20


def test_all_tensors_together_are_bounded(tmp_path):
    """Many views of one storage are legal, but not beyond max_bytes in all."""
    state = OrderedDict((f"w{i}", crafted.Tensor("0", 0, (12,), (1,), numel=12)) for i in range(5))
    path = crafted.zip_checkpoint(tmp_path / "shared.pt", state, {"0": TWELVE})
    assert len(load_torch_checkpoint(path)) == 5
    with pytest.raises(ValueError, match="more than max_bytes=200"):
        load_torch_checkpoint(path, max_bytes=200)


def test_legacy_storage_counts_are_checked_against_the_file(tmp_path):
    state = OrderedDict(w=crafted.Tensor("0", 0, (3,), (1,), numel=3))
    path = crafted.legacy_checkpoint(tmp_path / "lying.pt", state, {"0": TWELVE}, counts={"0": 10 ** 15})
    error, peak = peak_allocation(load_torch_checkpoint, path)
    assert isinstance(error, ValueError) and "truncated" in str(error)
    assert peak < 1 << 20


def _bomb(tmp_path, names, megabytes=64):
    """A zip checkpoint whose one storage is `megabytes` of zeros deflated to a few hundred KB."""
    raw = bytes(megabytes << 20)
    state = OrderedDict((name, crafted.Tensor("0", 0, (4,), (1,), numel=len(raw) // 4)) for name in names)
    path = crafted.zip_checkpoint(tmp_path / "bomb.pth", state, {"0": raw}, compress=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(path) < len(raw) // 100
    return path


def test_a_checkpoint_with_the_wrong_keys_is_refused_before_its_storages_are_read(tmp_path, monkeypatch):
    path = _bomb(tmp_path, ["not.a.resnet.key"])
    opened = []
    original = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(name if isinstance(name, str) else name.filename)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    with pytest.raises(ValueError, match="weights do not match resnet18: missing keys"):
        backbones.build("resnet18", str(path), upto="layer1")
    assert not any("/data/" in name for name in opened), opened


def test_a_storage_is_read_only_as_far_as_its_tensors_reach(tmp_path):
    """64 MiB of deflated zeros behind a 4-element tensor: only those 16 bytes are inflated."""
    path = _bomb(tmp_path, ["w"])
    state, peak = peak_allocation(load_torch_checkpoint, path)
    assert not isinstance(state, Exception), state
    np.testing.assert_array_equal(state["w"], np.zeros(4, np.float32))
    assert peak < 4 << 20


def test_cli_fit_with_a_crafted_checkpoint_is_one_line_not_a_crash(tmp_path, capsys):
    """The issue's 16 MB file that crashed `fit --backbone resnet18 --weights FILE` with exit 139."""
    state = OrderedDict(w=crafted.Tensor("0", -(4 << 20), (4096, 1024), (1024, 1), numel=12))
    weights = crafted.zip_checkpoint(tmp_path / "evil.pth", state, {"0": TWELVE})
    data = tmp_path / "data"
    (data / "normal").mkdir(parents=True)
    status = main(["fit", str(data), "--backbone", "resnet18", "--weights", str(weights), "--out",
                   str(tmp_path / "m.npz"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("npanomaly: error:") and err.count("\n") == 1
    assert "invalid storage offset" in err
    assert not (tmp_path / "m.npz").exists()


# ----------------------------------------------------------------------------- .npz files

def _npz_with_member(path, member, header_shape, payload):
    """An .npz whose member declares header_shape (float64) but holds payload bytes."""
    header = {"descr": "<f8", "fortran_order": False, "shape": header_shape}
    import io
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, header)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, stream.getvalue() + payload)
    return path


def test_npz_headers_are_checked_before_their_data_is_allocated(tmp_path):
    path = _npz_with_member(tmp_path / "huge.npz", "memory_bank.npy", (10 ** 6, 10 ** 5), bytes(800))
    error, peak = peak_allocation(read_npz, path)
    assert isinstance(error, ValueError) and "declares shape (1000000, 100000)" in str(error), error
    assert peak < 1 << 20
    good = _npz_with_member(tmp_path / "good.npz", "x.npy", (10, 10), np.arange(100.0).tobytes())
    np.testing.assert_array_equal(read_npz(good)["x"], np.arange(100.0).reshape(10, 10))


def test_npz_object_arrays_and_foreign_members_are_refused(tmp_path):
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="Python objects"):
        read_npz(tmp_path / "objects.npz")
    with zipfile.ZipFile(tmp_path / "foreign.npz", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match="not an array"):
        read_npz(tmp_path / "foreign.npz")
