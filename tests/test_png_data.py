"""PNG codec (against Pillow and a from-the-spec encoder, fuzzed), data-set layouts, the built-in data."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from npanomaly import synthetic
from npanomaly.data import folder_dataset, load_images, mvtec_category, open_dataset, read_image, resize
from npanomaly.png import decode_png, encode_png, read_png, write_png


@given(shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 2, 3, 4])),
       depth=st.sampled_from([8, 16]), data=st.data())
def test_every_filter_type_decodes(shape, depth, data):
    height, width, channels = shape
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    image = rng.integers(0, 2 ** depth, size=shape).astype(np.uint16 if depth == 16 else np.uint8)
    filters = data.draw(st.lists(st.integers(0, 4), min_size=height, max_size=height))
    decoded = decode_png(ref.png_with_filters(image, filters, depth))
    np.testing.assert_array_equal(decoded, image[:, :, 0] if channels == 1 else image)


@pytest.mark.parametrize("mode,shape,dtype", [("L", (17, 23), np.uint8), ("RGB", (17, 23, 3), np.uint8),
                                              ("RGBA", (5, 7, 4), np.uint8), ("LA", (6, 5, 2), np.uint8),
                                              ("I;16", (9, 11), np.uint16)])
def test_reads_what_pillow_writes_and_pillow_reads_ours(mode, shape, dtype):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, np.iinfo(dtype).max + 1, size=shape).astype(dtype)
    if mode == "LA":
        image = Image.fromarray(pixels[:, :, 0], "L")
        image.putalpha(Image.fromarray(pixels[:, :, 1], "L"))
    elif mode == "I;16":
        image = Image.fromarray(pixels)
    else:
        image = Image.fromarray(pixels, mode)
    stream = io.BytesIO()
    image.save(stream, format="PNG", optimize=True)
    np.testing.assert_array_equal(decode_png(stream.getvalue()), pixels)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(pixels)))), pixels)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_palette_and_low_bit_depth_images_from_pillow(bits):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(bits)
    rgb = Image.fromarray(rng.integers(0, 256, (13, 9, 3)).astype(np.uint8))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=2 ** bits)
    stream = io.BytesIO()
    palette.save(stream, format="PNG", bits=bits)
    np.testing.assert_array_equal(decode_png(stream.getvalue()), np.asarray(palette.convert("RGB")))
    grey = Image.fromarray((rng.integers(0, 2 ** bits, (13, 9)) * (255 // (2 ** bits - 1))).astype(np.uint8))
    stream = io.BytesIO()
    (grey.convert("1") if bits == 1 else grey).save(stream, format="PNG", bits=bits)
    reopened = Image.open(io.BytesIO(stream.getvalue()))
    np.testing.assert_array_equal(decode_png(stream.getvalue()), np.asarray(reopened.convert("L")))


def test_palette_transparency_becomes_alpha():
    Image = pytest.importorskip("PIL.Image")
    image = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4), "P")
    image.putpalette([v for i in range(12) for v in (i * 20, 255 - i * 20, 7)])
    image.info["transparency"] = bytes([0, 128] + [255] * 10)
    stream = io.BytesIO()
    image.save(stream, format="PNG", transparency=bytes([0, 128] + [255] * 10))
    np.testing.assert_array_equal(decode_png(stream.getvalue()), np.asarray(Image.open(stream).convert("RGBA")))


def test_interlaced_files_are_refused_clearly():
    data = bytearray(encode_png(np.zeros((4, 4), np.uint8)))
    ihdr = data[8 + 8:8 + 8 + 13]
    ihdr[12] = 1  # interlace method Adam7
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    with pytest.raises(ValueError, match="interlaced"):
        decode_png(bytes(data))


def test_oversized_header_fails_before_allocating():
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 16, 6, 0, 0, 0))
    with pytest.raises(ValueError, match="more than max_pixels"):
        decode_png(data)


def chunk(kind, payload):
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_decompression_bomb_is_cut_off():
    bomb = zlib.compress(b"\x00" * (10 * 1024 * 1024))  # 10 MiB of zeros for a 4x4 image
    header = struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="too much"):
        decode_png(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bomb) + chunk(b"IEND", b""))


GOOD = encode_png(np.random.default_rng(1).integers(0, 256, (12, 10, 3)).astype(np.uint8))


@given(cut=st.integers(0, len(GOOD) - 1))
def test_truncated_files_raise_value_error(cut):
    with pytest.raises(ValueError):
        decode_png(GOOD[:cut])


@given(position=st.integers(0, len(GOOD) - 1), value=st.integers(0, 255))
def test_corrupted_bytes_raise_value_error_or_decode(position, value):
    data = bytearray(GOOD)
    if data[position] == value:
        return
    data[position] = value
    try:
        image = decode_png(bytes(data))
    except ValueError:
        return
    assert image.shape == (12, 10, 3)  # a change the format cannot detect (none expected: CRCs)


@given(junk=st.binary(max_size=200))
def test_random_bytes_raise_value_error(junk):
    with pytest.raises(ValueError):
        decode_png(b"\x89PNG\r\n\x1a\n" + junk)


def test_zero_size_and_non_bytes():
    with pytest.raises(ValueError, match="zero size"):
        decode_png(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 0, 0, 0, 0)))
    with pytest.raises(ValueError, match="bad signature"):
        decode_png(b"")
    with pytest.raises(TypeError, match="bytes"):
        decode_png("not bytes")


def test_file_round_trip_and_image_loading(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3)).astype(np.uint8)
    write_png(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(read_png(tmp_path / "a.png"), rgb)
    batch = load_images([tmp_path / "a.png"])
    assert batch.shape == (1, 3, 20, 30) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], rgb.transpose(2, 0, 1) / 255.0, rtol=1e-6)
    assert load_images([tmp_path / "a.png"], size=(10, 15)).shape == (1, 3, 10, 15)
    write_png(tmp_path / "b.png", rgb[:10])
    with pytest.raises(ValueError, match="different sizes"):
        load_images([tmp_path / "a.png", tmp_path / "b.png"])
    (tmp_path / "c.jpg").write_bytes(b"not really")
    try:
        import PIL  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs Pillow"):
            read_image(tmp_path / "c.jpg")


def test_resize_averages_before_shrinking():
    stripes = np.zeros((1, 1, 8, 8), np.float32)
    stripes[:, :, :, ::2] = 1.0  # one-pixel stripes: plain bilinear sampling would alias to 0 or 1
    np.testing.assert_allclose(resize(stripes, (4, 4)), 0.5)


def test_synthetic_data_is_deterministic_and_masks_are_exact():
    a = synthetic.make_category("woven", n_train=3, n_test_good=2, n_test_defect=4, size=32, seed=5)
    b = synthetic.make_category("woven", n_train=3, n_test_good=2, n_test_defect=4, size=32, seed=5)
    np.testing.assert_array_equal(a.test, b.test)
    assert a.defects == ["good", "good", "scratch", "hole", "stain", "foreign"]
    assert not a.masks[:2].any() and all(m.any() for m in a.masks[2:])
    clean = synthetic.make_category("woven", n_train=3, n_test_good=2, n_test_defect=4, size=32, seed=6)
    assert not np.array_equal(a.train, clean.train)
    for style in synthetic.STYLES:
        c = synthetic.make_category(style, n_train=1, n_test_good=0, n_test_defect=4, size=32)
        assert c.train.min() >= 0 and c.train.max() <= 1 and c.train.dtype == np.float32
    with pytest.raises(ValueError, match="style must be one of"):
        synthetic.make_category("plaid")
    with pytest.raises(ValueError, match="at least 16x16"):
        synthetic.make_category("grid", size=8)


def test_mvtec_layout_round_trip(tmp_path):
    category = synthetic.make_category("grid", n_train=4, n_test_good=2, n_test_defect=4, size=32)
    root = synthetic.write_mvtec(tmp_path, category)
    dataset = open_dataset(root)
    train = dataset.train_images()
    np.testing.assert_allclose(train, np.round(category.train * 255) / 255, atol=1e-6)
    images, labels, masks, defects = dataset.test_images()
    assert labels.sum() == 4 and len(images) == 6
    assert masks.sum() == category.masks.sum()
    assert sorted(defects) == sorted(category.defects)
    os.remove(os.path.join(root, "ground_truth", "hole", "000_mask.png"))
    with pytest.warns(UserWarning, match="no mask"):
        assert mvtec_category(root).test_images()[2] is None


def test_folder_layout_and_clear_errors(tmp_path):
    for name in ("normal", "anomalous", "masks"):
        (tmp_path / name).mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        write_png(tmp_path / "normal" / f"n{i}.png", rng.integers(0, 256, (16, 16, 3)).astype(np.uint8))
    write_png(tmp_path / "anomalous" / "a0.png", rng.integers(0, 256, (16, 16, 3)).astype(np.uint8))
    write_png(tmp_path / "masks" / "a0_mask.png", np.eye(16, dtype=np.uint8) * 255)
    dataset = folder_dataset(tmp_path)
    assert len(dataset.train_paths) == 4  # one normal image held out for testing
    images, labels, masks, _ = dataset.test_images()
    assert labels.tolist() == [False, True] and masks[1].sum() == 16
    streamed = list(dataset.batches(dataset.train_paths, 3, (8, 8)))
    assert [b.shape for b in streamed] == [(3, 3, 8, 8), (1, 3, 8, 8)]
    np.testing.assert_array_equal(np.concatenate(streamed), dataset.train_images((8, 8)))
    empty = tmp_path / "empty"
    (empty / "normal").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images in"):
        open_dataset(empty)
    with pytest.raises(ValueError, match="neither the MVTec AD layout"):
        open_dataset(tmp_path / "masks")
    with pytest.raises(ValueError, match="not a folder"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ValueError, match="broken.png"):
        folder_dataset(tmp_path).train_images()
