"""Data larger than memory (issue 16, part 1): image sources, PatchCore's on-disk features, and
Student-Teacher reading one shuffled batch of files at a time."""

import os
import tracemalloc
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npanomaly
from npanomaly import cli, data, search, spill, synthetic, threads
from npanomaly.data import ImageFiles, open_dataset

SIZE = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small MVTec-layout category on disk, and its training images as the array they decode to."""
    category = synthetic.make_category("woven", n_train=14, n_test_good=3, n_test_defect=3, size=SIZE, seed=4)
    root = synthetic.write_mvtec(tmp_path_factory.mktemp("data"), category)
    dataset = open_dataset(root)
    return dataset, dataset.train_images((SIZE, SIZE))


@pytest.fixture
def no_core_sharing(monkeypatch):
    """A fixed thread count: Numba's parallel reductions split their sums by thread, so training
    on a machine whose load changes between two fits differs in the last bits."""
    monkeypatch.setitem(threads._shared, "enabled", False)


def _pieces(images, cuts):
    return [images[a:b] for a, b in zip((0,) + cuts, cuts + (len(images),))]


# ----------------------------------------------------------------- PatchCore: the same bank either way
@pytest.mark.parametrize("options", [dict(), dict(projection_dim=None), dict(sampler="uniform")],
                         ids=["projected greedy", "exact greedy", "uniform"])
def test_patchcore_bank_is_bit_identical_from_memory_disk_and_files(folder, tmp_path, options):
    dataset, images = folder
    reference = npanomaly.PatchCore(batch_size=4, **options).fit(images, 0.25, spill=False)
    fits = {
        "array spilled": dict(normal_images=images, spill=True),
        "file list": dict(normal_images=dataset.train_paths, size=SIZE, spill=True),
        "Dataset in memory": dict(normal_images=dataset, size=(SIZE, SIZE), spill=False),
        "ImageFiles": dict(normal_images=dataset.batches(batch_size=5, size=SIZE)),
        "pieces of other sizes": dict(normal_images=_pieces(images, (3, 4, 11))),
    }
    for label, arguments in fits.items():
        model = npanomaly.PatchCore(batch_size=4, **options).fit(coreset_ratio=0.25, spill_dir=tmp_path, **arguments)
        assert model.memory_bank_.dtype == np.float32, label
        assert np.array_equal(model.memory_bank_, reference.memory_bank_), label
        assert model.threshold_ == reference.threshold_, label
        assert model.image_size_ == (SIZE, SIZE), label
    assert os.listdir(tmp_path) == []


def test_auto_spills_above_the_size_rule_and_when_the_count_is_unknown(folder, tmp_path, monkeypatch):
    _, images = folder
    seen = []
    original = spill.FeatureSpill.append

    def spy(self, rows):
        seen.append(self.path)
        return original(self, rows)

    monkeypatch.setattr(spill.FeatureSpill, "append", spy)
    npanomaly.PatchCore(batch_size=4).fit(images, spill_dir=tmp_path)  # 14 x 64 x 384 floats: far below 1 GiB
    assert seen == []
    npanomaly.PatchCore(batch_size=4).fit([images[:7], images[7:]], spill_dir=tmp_path)  # count unknown
    assert seen and all(os.path.dirname(path) == str(tmp_path) for path in seen)
    seen.clear()
    rows_bytes = images.shape[0] * 8 * 8 * 384 * 4
    monkeypatch.setattr("npanomaly.patchcore.SPILL_ABOVE_BYTES", rows_bytes - 1)
    npanomaly.PatchCore(batch_size=4).fit(images, spill_dir=tmp_path)
    assert seen
    assert os.listdir(tmp_path) == []


class _Interrupting:
    """A re-iterable source that lists the spill folder at its third batch, then raises."""

    def __init__(self, images, folder, error):
        self.images, self.folder, self.error, self.listing = images, folder, error, None

    def __iter__(self):
        for index in range(0, len(self.images), 2):
            if index == 4:
                self.listing = os.listdir(self.folder)
                raise self.error
            yield self.images[index:index + 2]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("camera unplugged")], ids=repr)
def test_spill_file_exists_during_the_fit_and_is_removed_on_an_interruption(folder, tmp_path, error):
    _, images = folder
    source = _Interrupting(images, tmp_path, error)
    with pytest.raises(type(error)):
        npanomaly.PatchCore(batch_size=2).fit(source, spill=True, spill_dir=tmp_path)
    assert len(source.listing) == 1 and source.listing[0].startswith("npanomaly-features-")
    assert os.listdir(tmp_path) == []


def test_spill_file_is_removed_when_the_coreset_step_fails(folder, tmp_path, monkeypatch):
    _, images = folder

    def fail(*args, **kwargs):
        raise MemoryError("no room for the projection")

    monkeypatch.setattr("npanomaly.patchcore.greedy_select", fail)
    with pytest.raises(MemoryError):
        npanomaly.PatchCore(batch_size=4).fit(images, spill=True, spill_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_spill_memory_grows_with_the_projection_not_with_the_features(tmp_path):
    """Peak traced allocation of a spilled fit against the patch features' size: the part that grows
    with the number of images must be the projected rows (128 floats + 16 bytes per row), well
    below a quarter of the features' 1,152 floats per row."""
    images = synthetic.make_category("grid", n_train=96, size=64, seed=1).train
    peaks = {}
    for count in (32, 96):
        model = npanomaly.PatchCore(feature_dim=1024, batch_size=4)
        tracemalloc.start()
        try:
            model.fit(images[:count], coreset_ratio=0.01, spill=True, spill_dir=tmp_path)
            peaks[count] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    rows_per_image = 16 * 16
    growth_per_row = (peaks[96] - peaks[32]) / (64 * rows_per_image)
    feature_row_bytes = model.feature_size * 4
    assert growth_per_row < feature_row_bytes / 4, (growth_per_row, feature_row_bytes)


def test_spill_refuses_a_folder_that_cannot_hold_the_features(folder, tmp_path, monkeypatch):
    _, images = folder
    monkeypatch.setattr("npanomaly.spill.shutil.disk_usage", lambda path: types.SimpleNamespace(free=1000))
    with pytest.raises(ValueError, match=r"spill_dir .* has 0.00 GB free, but the patch features need"):
        npanomaly.PatchCore(batch_size=4).fit(images, spill=True, spill_dir=tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        npanomaly.PatchCore(batch_size=4).fit(images, spill=True, spill_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="spill must be 'auto', True or False"):
        npanomaly.PatchCore().fit(images, spill="yes")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------- the pieces, against plain NumPy
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 300), dim=st.integers(1, 40), cuts=st.lists(st.integers(0, 300), max_size=6),
       block_bytes=st.sampled_from([4, 96, 1000, 1 << 20]))
def test_streaming_projection_does_not_depend_on_how_rows_arrive(rows, dim, cuts, block_bytes):
    rng = np.random.default_rng(rows * 41 + dim)
    features = rng.standard_normal((rows, dim)).astype(np.float32)
    matrix = rng.standard_normal((dim, 5)).astype(np.float32)
    original = search.PROJECTION_BLOCK_BYTES
    search.PROJECTION_BLOCK_BYTES = block_bytes
    try:
        whole = search.StreamingProjection(matrix, rows)
        whole.add(features)
        streamed = search.StreamingProjection(matrix)  # count unknown: kept in parts
        bounds = sorted({0, rows} | {c % (rows + 1) for c in cuts})
        for a, b in zip(bounds, bounds[1:]):
            streamed.add(features[a:b])
        first, second = whole.finish(), streamed.finish()
    finally:
        search.PROJECTION_BLOCK_BYTES = original
    assert np.array_equal(first, second)
    np.testing.assert_allclose(first, features.astype(np.float64) @ matrix, rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 400), dim=st.integers(1, 300), picks=st.integers(1, 400),
       window=st.sampled_from([1, 4096, 1 << 20]))
def test_feature_spill_reads_back_any_rows_in_any_order(tmp_path_factory, rows, dim, picks, window):
    rng = np.random.default_rng(rows + 7 * dim)
    features = rng.standard_normal((rows, dim)).astype(np.float32)
    indices = rng.permutation(rows)[:picks]
    folder = tmp_path_factory.mktemp("spill")
    original = spill.READ_WINDOW_BYTES
    spill.READ_WINDOW_BYTES = window
    try:
        with spill.FeatureSpill(dim, folder, rows) as store:
            for start in range(0, rows, 37):
                store.append(features[start:start + 37])
            np.testing.assert_array_equal(store.gather(indices), features[indices])
            np.testing.assert_array_equal(np.load(store.path), features)  # a complete .npy file
            path = store.path
    finally:
        spill.READ_WINDOW_BYTES = original
    assert not os.path.exists(path)


def test_memory_features_preallocate_or_join(tmp_path):
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    for expected in (6, None):
        store = spill.MemoryFeatures(4, expected)
        store.append(rows[:2])
        store.append(rows[2:])
        np.testing.assert_array_equal(store.array(), rows)
        np.testing.assert_array_equal(store.gather([5, 0, 3]), rows[[5, 0, 3]])


# ----------------------------------------------------------------- Student-Teacher
def test_student_teacher_trains_the_same_from_an_array_and_from_files(folder, no_core_sharing):
    dataset, images = folder
    options = dict(epochs=2, batch_size=4, verbose=False, seed=3)
    from_array = npanomaly.StudentTeacher(batch_size=4).fit(images, validation=images[:5], **options)
    from_files = npanomaly.StudentTeacher(batch_size=4).fit(dataset, size=SIZE, validation=dataset.train_paths[:5],
                                                            **options)
    assert from_files.loss_history_ == from_array.loss_history_
    assert from_files.val_loss_history_ == from_array.val_loss_history_
    assert from_files.threshold_ == from_array.threshold_
    for (name, a), (_, b) in zip(from_array.student.state_dict().items(), from_files.student.state_dict().items()):
        assert np.array_equal(a, b), name


def test_student_teacher_reshuffles_files_each_epoch_one_batch_at_a_time(folder, monkeypatch):
    dataset, _ = folder
    reads = []
    original = ImageFiles.take

    def spy(self, indices):
        reads.append(list(indices))
        return original(self, indices)

    monkeypatch.setattr(ImageFiles, "take", spy)
    model = npanomaly.StudentTeacher(batch_size=4)
    model.fit(dataset.batches(size=SIZE), epochs=3, batch_size=4, verbose=False)
    assert max(len(r) for r in reads) <= 4
    n = len(dataset.train_paths)
    batches_per_epoch = -(-n // 4)
    # after the teacher's statistics pass: 3 epochs of shuffled batches, then the threshold pass
    epochs = [reads[batches_per_epoch * (e + 1):batches_per_epoch * (e + 2)] for e in range(3)]
    for epoch in epochs:
        assert sorted(i for batch in epoch for i in batch) == list(range(n))
    orders = [tuple(tuple(batch) for batch in epoch) for epoch in epochs]
    assert len(set(orders)) == 3
    assert any(max(batch) - min(batch) >= 4 for batch in epochs[0])  # batches mix files from across the set


def test_calibrate_threshold_and_scores_stream_from_files(folder):
    dataset, images = folder
    model = npanomaly.PatchCore(batch_size=4).fit(images[:8])
    np.testing.assert_array_equal(model.score_samples(dataset.train_paths), model.score_samples(images))
    from_array = model.calibrate_threshold(images, 0.9).threshold
    assert model.calibrate_threshold(dataset.train_paths, 0.9).threshold == from_array


# ----------------------------------------------------------------- bad sources
def _generator(images):
    yield images


@pytest.mark.parametrize("source, error, message", [
    (lambda d, x: _generator(x), TypeError, "one-shot iterator"),
    (lambda d, x: d.train_paths, ValueError, "pass size="),
    (lambda d, x: d.train_paths[0], TypeError, "got one path"),
    (lambda d, x: [], ValueError, "is empty"),
    (lambda d, x: 3.0, TypeError, "got float"),
    (lambda d, x: [x[:3], "image.png"], TypeError, "item 1 is a str"),
    (lambda d, x: [x[:3], x[3:, :, :16]], ValueError, "one image shape"),
    (lambda d, x: [x[:4], x[4:8, :, :16]], ValueError, r"batch 1\) holds 16x32 images, expected 32x32"),
    (lambda d, x: [x[:4] * 255], ValueError, r"in \[0, 1\]"),
    (lambda d, x: [x[:4, :1]], ValueError, "3 channels"),
], ids=["generator", "paths without size", "one path", "empty", "number", "non-array item", "mixed shapes",
        "mixed sizes at a batch boundary", "8-bit values", "grey batches"])
def test_bad_sources_get_one_clear_error(folder, tmp_path, source, error, message):
    dataset, images = folder
    with pytest.raises(error, match=message):
        npanomaly.PatchCore(batch_size=4).fit(source(dataset, images), spill_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_unreadable_file_in_a_source_names_the_file(folder, tmp_path):
    dataset, _ = folder
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ValueError, match="broken.png"):
        npanomaly.PatchCore(batch_size=4).fit(dataset.train_paths[:5] + [str(broken)], size=SIZE)


# ----------------------------------------------------------------- the command line
def test_cli_fit_reads_the_training_set_one_batch_at_a_time(folder, tmp_path, monkeypatch):
    dataset, _ = folder
    loaded = []
    original = data.load_images

    def spy(paths, *args, **kwargs):
        loaded.append(len(list(paths)))
        return original(paths, *args, **kwargs)

    monkeypatch.setattr(data, "load_images", spy)
    out = tmp_path / "model.npz"
    assert cli.main(["fit", dataset.root, "--size", str(SIZE), "--out", str(out), "--quiet",
                     "--spill-dir", str(tmp_path)]) == 0
    assert loaded and max(loaded) <= 8
    assert sum(loaded) >= len(dataset.train_paths)
    assert os.listdir(tmp_path) == ["model.npz"]
    model = npanomaly.load(out)
    assert model.image_size_ == (SIZE, SIZE)
