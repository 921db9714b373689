"""PNG reading and writing with the standard library's zlib and NumPy (no Pillow needed).

Reads every non-interlaced PNG: bit depths 1-16, grey, grey+alpha, RGB, RGBA and palette (with its
tRNS transparency), all five row filters. Interlaced (Adam7) files are refused with a clear error.
Damaged input (bad signature, truncated or corrupted chunks, CRC mismatches, absurd sizes, too much
or too little image data) raises ValueError before any large allocation: the decompressor is never
allowed to produce more than the header promises, and the header may promise at most
``max_pixels`` pixels.
"""

import struct
import zlib

import numpy as np
from numba import njit

from npanomaly._files import atomic_write
from npanomaly.kernels._config import JIT_OPTIONS

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
ALLOWED_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
DEFAULT_MAX_PIXELS = 1 << 28


@njit(**JIT_OPTIONS)
def _unfilter(raw, height, stride, bpp):
    """Undo the per-row PNG filters (None, Sub, Up, Average, Paeth) in place order, row by row.

    Shapes: raw [height * (stride + 1)] uint8 (each row: filter byte, then stride bytes)
            -> [height, stride] uint8, or a filter byte > 4 reported as row index via the second value.
    Math (a = byte bpp to the left, b = byte above, c = above-left, all 0 outside the image):
    Sub x + a; Up x + b; Average x + floor((a + b) / 2); Paeth x + the one of a, b, c closest to
    a + b - c (ties a, then b). All modulo 256.
    """
    out = np.zeros((height, stride), dtype=np.uint8)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        row = raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)]
        if kind > 4:
            return out, y
        for x in range(stride):
            a = np.int32(out[y, x - bpp]) if x >= bpp else 0
            b = np.int32(out[y - 1, x]) if y > 0 else 0
            c = np.int32(out[y - 1, x - bpp]) if (x >= bpp and y > 0) else 0
            if kind == 0:
                predictor = 0
            elif kind == 1:
                predictor = a
            elif kind == 2:
                predictor = b
            elif kind == 3:
                predictor = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                predictor = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
            out[y, x] = (np.int32(row[x]) + predictor) & 0xFF
    return out, -1


def _chunks(data):
    """Yield (type, payload) of each chunk, checking lengths and CRCs."""
    position = len(SIGNATURE)
    while position < len(data):
        if position + 8 > len(data):
            raise ValueError("PNG is truncated inside a chunk header")
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        end = position + 12 + length
        if end > len(data):
            raise ValueError(f"PNG is truncated: chunk {kind!r} declares {length} bytes, fewer remain")
        payload = data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(kind + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"PNG chunk {kind!r} is corrupted (CRC mismatch)")
        yield kind, payload
        if kind == b"IEND":
            return
        position = end
    raise ValueError("PNG has no IEND chunk (truncated file?)")


def _check_header(header, max_pixels):
    """Refuse a header describing an invalid or too large image, before any pixel is decompressed."""
    width, height, depth, colour, compression, filter_method, interlace = header
    if width == 0 or height == 0:
        raise ValueError(f"PNG has a zero size: {width}x{height}")
    if colour not in CHANNELS or depth not in ALLOWED_DEPTHS[colour]:
        raise ValueError(f"PNG colour type {colour} with bit depth {depth} is not valid")
    if compression != 0 or filter_method != 0:
        raise ValueError(f"PNG uses unknown compression {compression} or filter method {filter_method}")
    if interlace == 1:
        raise ValueError("interlaced (Adam7) PNG files are not supported; re-save the image without interlacing")
    if interlace != 0:
        raise ValueError(f"PNG interlace method {interlace} is not valid")
    if width * height > max_pixels:
        raise ValueError(f"PNG is {width}x{height} = {width * height} pixels, more than max_pixels={max_pixels}")


def decode_png(data, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode PNG bytes to an array [H, W] (grey) or [H, W, C] (C = 2, 3 or 4), uint8 or uint16."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG file (bad signature)")
    header = palette = transparency = None
    compressed = []
    for kind, payload in _chunks(data):
        if kind == b"IHDR":
            if len(payload) != 13:
                raise ValueError(f"PNG IHDR must be 13 bytes, got {len(payload)}")
            header = struct.unpack(">IIBBBBB", payload)
            _check_header(header, max_pixels)
        elif header is None:
            raise ValueError(f"PNG chunk {kind!r} comes before IHDR")
        elif kind == b"PLTE":
            if len(payload) % 3 or not 0 < len(payload) <= 768:
                raise ValueError(f"PNG palette has an invalid length {len(payload)}")
            palette = np.frombuffer(payload, np.uint8).reshape(-1, 3)
        elif kind == b"tRNS":
            transparency = np.frombuffer(payload, np.uint8)
        elif kind == b"IDAT":
            compressed.append(payload)
    if header is None:
        raise ValueError("PNG has no IHDR chunk")
    width, height, depth, colour = header[:4]
    if colour == 3 and palette is None:
        raise ValueError("palette PNG has no PLTE chunk")
    if not compressed:
        raise ValueError("PNG has no image data (IDAT)")
    channels = CHANNELS[colour]
    bits_per_pixel = channels * depth
    stride = (width * bits_per_pixel + 7) // 8
    expected = height * (stride + 1)
    decompressor = zlib.decompressobj()
    try:
        raw = decompressor.decompress(b"".join(compressed), expected + 1)
    except zlib.error as error:
        raise ValueError(f"PNG image data is corrupted: {error}") from error
    if len(raw) != expected or decompressor.unconsumed_tail:
        raise ValueError(f"PNG image data has {'too much' if len(raw) > expected else 'too little'} data for "
                         f"{width}x{height} (expected {expected} bytes)")
    rows, bad_row = _unfilter(np.frombuffer(raw, np.uint8), height, stride, max(1, bits_per_pixel // 8))
    if bad_row >= 0:
        raise ValueError(f"PNG row {bad_row} has an unknown filter type")
    if depth == 16:
        samples = rows.view(">u2").astype(np.uint16).reshape(height, width, channels)
    elif depth == 8:
        samples = rows.reshape(height, width, channels)
    else:
        per_byte = 8 // depth
        shifts = (8 - depth * (np.arange(per_byte) + 1)).astype(np.uint8)
        unpacked = (rows[:, :, None] >> shifts) & ((1 << depth) - 1)
        samples = unpacked.reshape(height, -1)[:, :width].reshape(height, width, 1)
        if colour == 0:  # scale grey levels to the full 8-bit range, as every viewer shows them
            samples = (samples.astype(np.uint16) * (255 // ((1 << depth) - 1))).astype(np.uint8)
    if colour == 3:
        index = samples[:, :, 0]
        if index.max() >= len(palette):
            raise ValueError(f"PNG pixel refers to palette entry {index.max()}, the palette has {len(palette)}")
        image = palette[index]
        if transparency is not None:
            alpha = np.full(len(palette), 255, np.uint8)
            alpha[:min(len(transparency), len(palette))] = transparency[:len(palette)]
            image = np.concatenate([image, alpha[index][:, :, None]], axis=2)
        return image
    return samples[:, :, 0] if channels == 1 else samples


def encode_png(image, compression=6):
    """Encode [H, W] or [H, W, C] (C = 1..4) uint8/uint16 to PNG bytes (filter None on every row)."""
    image = np.asarray(image)
    if image.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"image must be uint8 or uint16, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or 0 in image.shape:
        raise ValueError(f"image must be [H, W] or [H, W, C] with C in 1..4 and H, W > 0, got {image.shape}")
    height, width, channels = image.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    depth = 16 if image.dtype == np.uint16 else 8
    samples = image.astype(">u2").view(np.uint8) if depth == 16 else image
    rows = samples.reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload)
                                                                              & 0xFFFFFFFF)

    return (SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, compression)) + chunk(b"IEND", b""))


def read_png(path, max_pixels=DEFAULT_MAX_PIXELS):
    """Read a PNG file (see decode_png)."""
    with open(path, "rb") as stream:
        return decode_png(stream.read(), max_pixels)


def write_png(path, image, compression=6):
    """Write an image array as a PNG file (see encode_png)."""
    data = encode_png(image, compression)
    return atomic_write(path, lambda stream: stream.write(data))
