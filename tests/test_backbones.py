"""Pretrained backbones without torch: the checkpoint reader, the architectures against torch twins,
the new layers' gradients, and the real EfficientNet-Lite0, -Lite1 and -Lite2 weights."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from npanomaly import PatchCore, StudentTeacher, backbones, nn
from npanomaly.checkpoint import load_torch_checkpoint
from strategies import random_array
from test_gradcheck import check_gradients
import reference as ref


# ----------------------------------------------------------------------------- checkpoint reader

@pytest.mark.parametrize("zipped", [True, False])
def test_reads_both_torch_formats_views_and_dtypes(zipped, tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {"view": base[1:5, 2:7].t(), "double": torch.randn(3, dtype=torch.float64), "long": torch.tensor(7),
             "half": torch.ones(2, 2, dtype=torch.float16), "shared": base, "bool": torch.tensor([True, False])}
    path = tmp_path / "state.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zipped)
    loaded = load_torch_checkpoint(path)
    assert list(loaded) == list(state)
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key], value.numpy())
        assert loaded[key].dtype == value.numpy().dtype


def test_wrapped_state_dicts_and_npz(tmp_path):
    torch = pytest.importorskip("torch")
    conv = torch.nn.Conv2d(2, 3, 3)
    torch.save({"state_dict": conv.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    assert sorted(load_torch_checkpoint(tmp_path / "wrapped.pth")) == ["bias", "weight"]
    np.savez(tmp_path / "w.npz", weight=np.ones((3, 2, 3, 3)))
    assert load_torch_checkpoint(tmp_path / "w.npz")["weight"].shape == (3, 2, 3, 3)


def test_a_pickle_that_would_run_a_command_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name, data in (("legacy.pt", pickle.dumps(Payload(), protocol=2)),):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + data)
        with pytest.raises(ValueError, match="refused to load"):
            load_torch_checkpoint(path)
    import zipfile
    with zipfile.ZipFile(tmp_path / "zipped.pt", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": Payload()}, protocol=2))
    with pytest.raises(ValueError, match="refused to load posix.system|refused to load nt.system"):
        load_torch_checkpoint(tmp_path / "zipped.pt")
    # and the same file really would have run the command under plain pickle
    assert not marker.exists()
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.loads(open({str(tmp_path / name)!r}, 'rb')"
                                          f".read()[{len(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))}:])"])
    assert marker.exists()


def test_damaged_checkpoints_fail_cleanly(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(100)}, tmp_path / "good.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:-50])
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02junk")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    for name, match in (("cut.pt", "truncated"), ("junk.pt", "not a readable"), ("module.pt", "refused to load")):
        with pytest.raises(ValueError, match=match):
            load_torch_checkpoint(tmp_path / name)


# ----------------------------------------------------------------------------- architectures vs torch

def torch_features(twin, images, prepare):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return {k: v.numpy() for k, v in twin(torch.from_numpy(prepare(images))).items()}


ARCHITECTURES = [(name, algorithm) for name in ("efficientnet_lite0", "resnet18", "resnet50", "wide_resnet50_2")
                 for algorithm in ("im2col", "winograd")]
# Lite1-4 have no dense 3x3 stride-1 convolution (their 3x3s are depthwise): Winograd never applies
ARCHITECTURES += [(name, "im2col") for name in ("efficientnet_lite1", "efficientnet_lite2", "efficientnet_lite3",
                                                "efficientnet_lite4")]


@pytest.mark.parametrize("name,algorithm", ARCHITECTURES)
def test_architecture_matches_torch_with_saved_random_weights(name, algorithm, tmp_path):
    pytest.importorskip("torch")
    import torch
    import torch_backbones as tb

    if name.startswith("efficientnet_lite"):
        twin, stages = tb.Lite(name), ["stride4", "stride8", "stride16", "stride32", "head"]
    else:
        kind, counts, widen = backbones.RESNETS[name]
        twin, stages = tb.ResNet(kind == "bottleneck", counts, widen), ["layer1", "layer2", "layer3", "layer4"]
    tb.randomise(twin, seed=1)
    path = tmp_path / "weights.pth"
    torch.save(twin.state_dict(), path)
    ours = backbones.build(name, str(path))
    nn.set_conv_algorithm(ours.net.eval(), algorithm)  # every 3x3 stride-1 convolution, for "winograd"
    images = np.random.default_rng(2).random((2, 3, 45, 61)).astype(np.float32)  # odd, non-square
    expected = torch_features(twin, images, ours.prepare)
    for stage, got in zip(stages, ours.features(images, stages)):
        want = expected[stage]
        assert got.shape == want.shape, stage
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=stage)


def test_weights_that_do_not_match_are_named(tmp_path):
    torch = pytest.importorskip("torch")
    import torch_backbones as tb

    state = tb.ResNet(False, (2, 2, 2, 2)).state_dict()
    state["layer1.0.conv9.weight"] = state.pop("layer1.0.conv2.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \['layer1.0.conv2.weight'\].*unexpected keys "
                                         r"\['layer1.0.conv9.weight'\]"):
        backbones.build("resnet18", str(tmp_path / "bad.pth"))
    state = tb.ResNet(False, (2, 2, 2, 2)).state_dict()
    state["conv1.weight"] = state["conv1.weight"][:, :, :5, :5]
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="'conv1.weight' has shape"):
        backbones.build("resnet18", str(tmp_path / "shape.pth"))


# ----------------------------------------------------------------------------- new layers

@pytest.mark.parametrize("groups,kernel,stride,padding", [(4, 3, 2, 1), (4, 5, 1, "same"), (2, 3, 1, 1),
                                                          (1, 3, 2, "same"), (4, 3, 2, "same")])
def test_grouped_depthwise_and_same_padded_conv_gradients(groups, kernel, stride, padding):
    conv = nn.Conv2d(4, 4, kernel, stride=stride, padding=padding, groups=groups, seed=3)
    check_gradients(conv, random_array(4, (2, 4, 7, 6)))


def test_depthwise_and_grouped_conv_match_the_reference():
    x = random_array(5, (2, 6, 9, 7))
    for groups in (6, 3):
        conv = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=groups, seed=6).to(np.float64)
        w, b = conv.weight.data, conv.bias.data
        per = 6 // groups
        expected = np.concatenate([ref.conv2d(x[:, g * per:(g + 1) * per], w[g * per:(g + 1) * per],
                                              b[g * per:(g + 1) * per], (2, 2), (1, 1)) for g in range(groups)], axis=1)
        np.testing.assert_allclose(conv(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 6])
@pytest.mark.parametrize("size,kernel", [((8, 7), 3), ((9, 10), 5), ((6, 6), 3)])
def test_same_padding_matches_the_reference_on_an_explicitly_padded_input(groups, size, kernel):
    """TensorFlow's 'same' at stride 2: zeros split (before, after) = (t // 2, t - t // 2). The
    depthwise kernel takes the output size instead of a padded copy; both paths must agree with
    the plain reference run on the padded input."""
    x = random_array(7, (2, 6) + size)
    conv = nn.Conv2d(6, 6, kernel, stride=2, padding="same", groups=groups, seed=7).to(np.float64)
    pads = []
    for n in size:
        total = max((-(-n // 2) - 1) * 2 + kernel - n, 0)
        pads.append((total // 2, total - total // 2))
    padded = np.pad(x, ((0, 0), (0, 0), *pads))
    per = 6 // groups
    w, b = conv.weight.data, conv.bias.data
    expected = np.concatenate([ref.conv2d(padded[:, g * per:(g + 1) * per], w[g * per:(g + 1) * per],
                                          b[g * per:(g + 1) * per], (2, 2), (0, 0)) for g in range(groups)], axis=1)
    assert expected.shape[2:] == tuple(-(-n // 2) for n in size)
    np.testing.assert_allclose(conv(x), expected, rtol=1e-12, atol=1e-12)


def test_relu6_residual_and_resnet_block_gradients():
    x = random_array(7, (2, 3, 5, 5)) * 8  # spans both kinks of ReLU6
    x[np.abs(x) < 0.1] = 1.0
    x[np.abs(x - 6) < 0.1] = 3.0
    check_gradients(nn.ReLU6(), x)
    body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, seed=8), nn.BatchNorm2d(3), nn.ReLU6(), nn.Conv2d(3, 3, 1, seed=9))
    check_gradients(nn.Residual(*body.layers), random_array(10, (3, 3, 5, 4)))
    block = nn.ResidualBlock(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, seed=11), nn.BatchNorm2d(4)),
                             nn.Sequential(nn.Conv2d(3, 4, 1, stride=2, seed=12), nn.BatchNorm2d(4)))
    check_gradients(block, random_array(13, (3, 3, 6, 5)) + 0.3)


# ----------------------------------------------------------------------------- real weights

def lite0_or_skip():
    return lite_or_skip("efficientnet_lite0")


def lite_or_skip(name):
    try:
        return backbones.build(name)
    except ValueError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_real_lite_weights_classify_natural_images(name):
    skimage_data = pytest.importorskip("skimage.data")
    from npanomaly.data import resize

    net = lite_or_skip(name)
    net.net.eval()
    size = backbones.LITE_SCALING[name][2]  # the input size each was trained at
    # ImageNet classes: 281-285 are domestic cats, 967/968 espresso and cup, 657 missile / 744 projectile.
    # The rocket stands in its launch tower (crane, 517, is a fair second guess): it must be in the top 3.
    for image_name, classes, top in (("chelsea", range(281, 286), 1), ("coffee", (967, 968), 1),
                                      ("rocket", (657, 744), 3)):
        image = getattr(skimage_data, image_name)().astype(np.float32) / 255
        logits = net.logits(resize(np.ascontiguousarray(image.transpose(2, 0, 1)[None]), (size, size)))[0]
        assert set(np.argsort(logits)[::-1][:top].tolist()) & set(classes), (name, image_name)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_real_lite_weights_match_the_torch_twin(name):
    torch = pytest.importorskip("torch")
    import torch_backbones as tb

    ours = lite_or_skip(name)
    ours.net.eval()
    twin = tb.Lite(name)
    twin.load_state_dict(torch.load(backbones.pretrained_path(name), map_location="cpu"))
    twin.eval()
    images = np.random.default_rng(3).random((2, 3, 57, 70)).astype(np.float32)
    expected = torch_features(twin, images, ours.prepare)
    stages = ["stride4", "stride8", "stride16", "stride32", "head"]
    for stage, got in zip(stages, ours.features(images, stages)):
        want = expected[stage]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=stage)


@pytest.mark.slow
def test_patchcore_with_lite0_beats_the_random_backbone_on_a_stochastic_texture():
    lite0_or_skip()
    from npanomaly import metrics, synthetic

    category = synthetic.make_category("granular", n_train=30, n_test_good=12, n_test_defect=24, size=64)
    results = {}
    for backbone in ("seed", "efficientnet_lite0"):
        model = PatchCore(backbone=backbone).fit(category.train)
        results[backbone] = metrics.auroc(model.score_samples(category.test), category.labels)
    assert results["efficientnet_lite0"] >= 0.95 and results["efficientnet_lite0"] >= results["seed"] + 0.05


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_each_pretrained_configuration_detects_obvious_defects(name):
    """PatchCore and STFPM with each installed Lite, at their defaults (STFPM's recipe, fewer epochs)."""
    lite_or_skip(name)
    from textures import auroc, textures, with_defects

    normal, good = textures(16, size=(64, 64), seed=0), textures(6, size=(64, 64), seed=100)
    bad, _ = with_defects(textures(6, size=(64, 64), seed=200))
    patchcore = PatchCore(backbone=name).fit(normal)
    assert auroc(patchcore.score_samples(good), patchcore.score_samples(bad)) >= 0.9, "PatchCore"
    stfpm = StudentTeacher(backbone=name).fit(normal, epochs=15, verbose=False)
    assert auroc(stfpm.score_samples(good), stfpm.score_samples(bad)) >= 0.9, "STFPM"


def test_pretrained_teacher_student_round_trip(tmp_path):
    lite0_or_skip()
    from npanomaly import load, synthetic

    category = synthetic.make_category("woven", n_train=6, n_test_good=2, n_test_defect=2, size=32)
    st = StudentTeacher(backbone="efficientnet_lite0", stages=("stride4", "stride8"))
    assert st.multiscale and st.student.layers[0].out_channels == st.teacher.layers[0].out_channels
    st.fit(category.train, epochs=2, batch_size=3, verbose=False)
    assert st.loss_history_[1] < st.loss_history_[0]
    st.save(tmp_path / "st.npz")
    np.testing.assert_array_equal(load(tmp_path / "st.npz").anomaly_map(category.test), st.anomaly_map(category.test))
    pc = PatchCore(backbone="efficientnet_lite0").fit(category.train)
    pc.save(tmp_path / "pc.npz")
    np.testing.assert_array_equal(load(tmp_path / "pc.npz").score_samples(category.test), pc.score_samples(category.test))


def test_backbone_errors():
    with pytest.raises(ValueError, match="backbone must be one of"):
        PatchCore(backbone="vgg16")
    with pytest.raises(ValueError, match="resnet50 needs weights=PATH"):
        PatchCore(backbone="resnet50")
    with pytest.raises(ValueError, match="in_channels must be 3"):
        PatchCore(in_channels=1, backbone="resnet18", weights="random")
    with pytest.raises(ValueError, match="layers must be distinct names from"):
        PatchCore(backbone="resnet18", weights="random", layers=("block2",))
    with pytest.raises(ValueError, match="multiscale must be True"):
        StudentTeacher(backbone="resnet18", weights="random", multiscale=False)
