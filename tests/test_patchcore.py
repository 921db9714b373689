"""PatchCore: the seed's rules on hand-computed cases, the paper's Eq. 7, maps, detection, persistence, errors."""

import os

import numpy as np
import pytest

import reference as ref
from npanomaly import PatchCore, kernels, load, nn
from npanomaly.patchcore import nearest_other_threshold, reweighted_scores, seed_uniform_indices
from textures import auroc, textures, with_defects


@pytest.fixture(scope="module")
def normal():
    return textures(12, seed=0)


@pytest.fixture(scope="module")
def fitted(normal):
    return PatchCore(feature_dim=64, seed=0).fit(normal, coreset_ratio=0.25)


# ----------------------------------------------------------------------------- the seed's rules

def test_seed_uniform_subsampling_hand_computed():
    # keep = int(10 * 0.3) = 3, step = ceil(10 / 3) = 4 -> rows 0, 4, 8
    np.testing.assert_array_equal(seed_uniform_indices(10, 0.3), [0, 4, 8])
    # keep = int(7 * 0.5) = 3, step = ceil(7 / 3) = 3 -> rows 0, 3, 6
    np.testing.assert_array_equal(seed_uniform_indices(7, 0.5), [0, 3, 6])
    # keep = max(1, int(5 * 0.1)) = 1, step = 5 -> row 0 only
    np.testing.assert_array_equal(seed_uniform_indices(5, 0.1), [0])
    np.testing.assert_array_equal(seed_uniform_indices(4, 1.0), [0, 1, 2, 3])


def test_seed_threshold_hand_computed():
    # nearest other distances of 0, 1, 3 on a line: 1, 1, 2 -> mean 4/3, population std sqrt(2)/3
    bank = np.array([[0.0], [1.0], [3.0]], np.float32)
    assert nearest_other_threshold(bank) == pytest.approx(4 / 3 + 3 * np.sqrt(2) / 3, rel=1e-6)
    assert nearest_other_threshold(bank[:1]) == 1.0  # the seed's value for a bank of one
    assert nearest_other_threshold(np.zeros((2, 3), np.float32)) == 0.0  # duplicates are each other's neighbour


def test_seed_compatible_configuration_reproduces_the_seed_pipeline(normal):
    pc = PatchCore.seed_compatible(feature_dim=32).fit(normal, coreset_ratio=0.1)
    # The seed's features: the last block's map, one vector per position, in (image, y, x) order.
    net = pc.backbone
    features = net(normal).transpose(0, 2, 3, 1).reshape(-1, 32)
    np.testing.assert_array_equal(pc.memory_bank, features[seed_uniform_indices(len(features), 0.1)])
    assert pc.threshold == pytest.approx(nearest_other_threshold(pc.memory_bank))
    test = with_defects(normal[:4])[0]
    patch = net(test).transpose(0, 2, 3, 1).reshape(4, -1, 32)
    dist, _ = ref.knn_bruteforce(patch.reshape(-1, 32), pc.memory_bank, 1)
    np.testing.assert_allclose(pc.score_samples(test), dist.reshape(4, -1).max(axis=1), rtol=1e-6)


def test_seed_backbone_structure_frozen_and_in_eval_mode():
    pc = PatchCore.default_rgb()
    kinds = [type(layer) for layer in pc.backbone.layers]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3
    convs = pc.backbone.layers[0::3]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (3, 64, (3, 3), 2, 1), (64, 128, (3, 3), 2, 1), (128, 256, (3, 3), 2, 1)]
    assert all(c.bias is not None for c in convs)
    assert not pc.backbone.training and not any(p.requires_grad for p in pc.backbone.parameters())


def test_scores_do_not_depend_on_batch_mates(fitted, normal):
    """The seed's eval() did nothing, so its batch norms used batch statistics at predict time."""
    batch = with_defects(normal[:4])[0]
    alone = np.concatenate([fitted.score_samples(batch[i:i + 1]) for i in range(4)])
    np.testing.assert_array_equal(fitted.score_samples(batch), alone)


# ----------------------------------------------------------------------------- the paper

def test_eq7_reweighting_matches_the_paper_transcription():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((50, 6)).astype(np.float32)
    patches = rng.standard_normal((3, 10, 6)).astype(np.float32) * 1.5
    dist, index = ref.knn_bruteforce(patches.reshape(-1, 6), bank, 1)
    dist, index = dist[:, 0].reshape(3, 10), index[:, 0].reshape(3, 10)
    ours = reweighted_scores(patches, dist.astype(np.float32), index, bank, 9)
    for i in range(3):
        p = int(np.argmax(dist[i]))
        expected = ref.patchcore_eq7(patches[i, p], dist[i, p], index[i, p], bank, 9)
        assert ours[i] == pytest.approx(expected, rel=1e-6)
        assert 0 < ours[i] < dist[i, p]


def test_scores_and_maps_against_a_torch_oracle(fitted):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    images = with_defects(textures(4, size=(48, 80), seed=5))[0]
    pc = PatchCore(feature_dim=64, seed=0).fit(textures(6, size=(48, 80), seed=6), coreset_ratio=0.3)
    features = pc._patch_features(images)
    n, h, w, d = features.shape
    f = torch.from_numpy(features.reshape(n, h * w, d)).double()
    bank = torch.from_numpy(pc.memory_bank).double()
    # anomalib's PatchcoreModel: nearest neighbour, then the weight of Eq. 7 from the support samples.
    patch_scores, locations = torch.cdist(f.reshape(-1, d), bank).min(dim=1)
    patch_scores, locations = patch_scores.reshape(n, -1), locations.reshape(n, -1)
    worst = patch_scores.argmax(dim=1)
    rows = torch.arange(n)
    score = patch_scores[rows, worst]
    support = torch.cdist(bank[locations[rows, worst]], bank).topk(9, largest=False).indices
    distances = torch.linalg.norm(f[rows, worst][:, None, :] - bank[support], dim=2)
    expected = (1 - torch.softmax(distances, dim=1)[:, 0]) * score
    np.testing.assert_allclose(pc.score_samples(images), expected.numpy(), rtol=1e-5)

    # Map: bilinear upsampling to the input size, then anomalib's Gaussian blur (sigma 4, reflect).
    up = F.interpolate(patch_scores.reshape(n, 1, h, w).float(), size=(48, 80), mode="bilinear", align_corners=False)
    taps = torch.from_numpy(kernels.gaussian_kernel1d(4.0)).float()
    kernel = (taps[:, None] * taps[None, :])[None, None]
    r = taps.numel() // 2
    blurred = F.conv2d(F.pad(up, (r, r, r, r), mode="reflect"), kernel)[:, 0]
    maps = pc.anomaly_map(images)
    assert maps.shape == (4, 48, 80)
    np.testing.assert_allclose(maps, blurred.numpy(), rtol=1e-4, atol=1e-5 * float(blurred.max()))


def test_detects_synthetic_defects(normal):
    pc = PatchCore(feature_dim=64, seed=0).fit(normal, coreset_ratio=0.25)
    good = textures(10, seed=100)
    bad, masks = with_defects(textures(10, seed=200))
    assert auroc(pc.score_samples(good), pc.score_samples(bad)) >= 0.95
    maps = pc.anomaly_map(bad)
    # the map is higher inside the defect than outside it, image by image
    assert np.mean([m[k].mean() > m[~k].mean() for m, k in zip(maps, masks)]) >= 0.9
    pc.calibrate_threshold(good, quantile=1.0)
    results = pc.predict(bad)
    assert sum(r.is_anomalous for r in results) >= 8
    assert all(r.heatmap.shape == (48, 48) for r in results)
    np.testing.assert_allclose(pc.decision_function(bad), [r.score - pc.threshold for r in results])


def test_same_seed_same_bank_same_scores(normal):
    a = PatchCore(feature_dim=32, seed=3).fit(normal)
    b = PatchCore(feature_dim=32, seed=3).fit(normal)
    np.testing.assert_array_equal(a.memory_bank, b.memory_bank)
    np.testing.assert_array_equal(a.score_samples(normal[:3]), b.score_samples(normal[:3]))
    assert not np.array_equal(a.memory_bank, PatchCore(feature_dim=32, seed=4).fit(normal).memory_bank)


def test_streaming_in_batches_changes_nothing(normal):
    one = PatchCore(feature_dim=32, batch_size=100).fit(normal)
    many = PatchCore(feature_dim=32, batch_size=5).fit(normal)
    np.testing.assert_array_equal(one.memory_bank, many.memory_bank)
    np.testing.assert_array_equal(one.anomaly_map(normal[:7]), many.anomaly_map(normal[:7]))


def test_options(normal):
    pc = PatchCore(feature_dim=32, layers=("block1", "block2", "block3"), target_dim=50,
                   sampler="greedy", projection_dim=None).fit(normal[:4], coreset_ratio=0.05)
    assert pc.memory_bank.shape[1] == 50
    assert pc.memory_bank.shape[0] == int(4 * 24 * 24 * 0.05)  # block1 grid of a 48x48 image is 24x24


def test_the_smallest_images_are_the_deepest_stage_s_stride():
    """8x8 gives block3 one position; 7 pixels on either side would give the backbone less than one."""
    images = np.random.default_rng(0).random((3, 3, 8, 8)).astype(np.float32)
    pc = PatchCore(feature_dim=16).fit(images, coreset_ratio=1.0)
    assert pc.min_image_size == 8
    assert pc.memory_bank.shape == (3 * 4, 144)  # block2's 2x2 grid
    assert pc.anomaly_map(images).shape == (3, 8, 8)
    for shape in ((3, 3, 7, 8), (3, 3, 8, 7), (3, 3, 1, 1)):
        with pytest.raises(ValueError, match=r"block3 stage \(stride 8\) needs at least 8x8"):
            PatchCore(feature_dim=16).fit(np.zeros(shape, np.float32))
    assert PatchCore(layers=("block1", "block2")).min_image_size == 4


# ----------------------------------------------------------------------------- persistence

def test_save_and_load_predict_bit_identically(fitted, normal, tmp_path):
    path = tmp_path / "model.npz"
    fitted.save(path)
    assert os.listdir(tmp_path) == ["model.npz"]  # the temporary file was renamed, none left behind
    with np.load(path, allow_pickle=False) as data:
        assert int(data["npanomaly_format"]) == 1 and str(data["model"]) == "PatchCore"
    test = with_defects(normal[:5])[0]
    for loaded in (PatchCore.load(path), load(path)):
        assert isinstance(loaded, PatchCore)
        expected, got = fitted.predict(test), loaded.predict(test)
        assert [r.score for r in expected] == [r.score for r in got]
        assert all(np.array_equal(a.heatmap, b.heatmap) for a, b in zip(expected, got))
        assert loaded.threshold == fitted.threshold


def test_loading_foreign_or_damaged_files_fails_cleanly(fitted, tmp_path):
    good = tmp_path / "good.npz"
    fitted.save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.npz").write_bytes(os.urandom(300))
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with np.load(good) as arrays:
        damaged = dict(arrays)
    damaged["memory_bank"] = damaged["memory_bank"][:, :5]
    np.savez(tmp_path / "damaged.npz", **damaged)
    damaged["npanomaly_format"] = np.array(99)
    np.savez(tmp_path / "future.npz", **damaged)
    for name, match in (("truncated", "not a readable"), ("garbage", "not a readable"), ("foreign", "no format marker"),
                        ("damaged", "memory_bank has shape"), ("future", "format 99")):
        with pytest.raises(ValueError, match=match):
            load(tmp_path / f"{name}.npz")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- errors

def test_errors(fitted, normal):
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchCore().predict(normal)
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchCore().save("never.npz")
    for bad_ratio in (0, -0.1, 1.5, float("nan"), np.float32(1.5)):
        with pytest.raises(ValueError, match="coreset_ratio must be in"):
            PatchCore(feature_dim=16).fit(normal, coreset_ratio=bad_ratio)
    with pytest.raises(TypeError, match="coreset_ratio must be a number in"):
        PatchCore(feature_dim=16).fit(normal, coreset_ratio="0.1")
    with pytest.raises(ValueError, match="3 channels"):
        fitted.predict(normal[:, :1])
    with pytest.raises(ValueError, match="48x48 images like the ones"):
        fitted.predict(textures(2, size=(32, 48)))
    nan = normal[:2].copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fitted.score_samples(nan)
    with pytest.raises(ValueError, match="empty batch"):
        fitted.predict(normal[:0])
    with pytest.raises(TypeError, match="float32 or float64"):
        fitted.predict((normal * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="sampler must be one of"):
        PatchCore(sampler="random")
    with pytest.raises(ValueError, match="layers must be"):
        PatchCore(layers=("layer2",))
    with pytest.raises(ValueError, match="quantile"):
        fitted.calibrate_threshold(normal, quantile=0)
