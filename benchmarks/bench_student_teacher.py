"""One Student-Teacher training step and prediction against torch autograd, in one process.

    python benchmarks/bench_student_teacher.py [--threads 2] [--repeats 5] [--batch 8] [--size 256]

StudentTeacher.default_rgb() (teacher 3->64->128, student 3->32->128, 3x3 stride 2 convolutions with
batch norm and ReLU) on a batch of 8 RGB 256x256 images: npanomaly's train_step (forward through both
nets, the loss gradient, the student's hand-written backward pass, Adam) against the same nets,
weights and optimiser under torch autograd; then predict throughput (images/s) of both. Then STFPM
with a ResNet-18 teacher and student (random weights; layer1-3, L2-normalised features, Adam), one
training step against torch autograd on the same architecture (tests/torch_backbones.py); --no-stfpm
leaves it out.
Medians over --repeats runs taken in turns after a warm-up; ratio = npanomaly / torch (below 1: npanomaly faster).
"""

import argparse

from _common import add_import_order, median_times, use_threads

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--threads", type=int, default=2)
add_import_order(parser)
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--size", type=int, default=256)
parser.add_argument("--no-stfpm", action="store_true", help="skip the ResNet-18 STFPM training step")
ARGS = parser.parse_args()
use_threads(ARGS.threads, ARGS.import_order)

import numpy as np  # noqa: E402  (after use_threads: BLAS reads its thread variables at load time)



def torch_twin(net, torch):
    layers = []
    for layer in net.layers:
        name = type(layer).__name__
        if name == "Conv2d":
            layers.append(torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                          layer.padding))
        elif name == "BatchNorm2d":
            layers.append(torch.nn.BatchNorm2d(layer.num_features))
        else:
            layers.append(torch.nn.ReLU())
    twin = torch.nn.Sequential(*layers)
    twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in net.state_dict().items()})
    return twin


def main():
    import numba
    import torch

    import npanomaly
    from npanomaly import optim

    numba.set_num_threads(ARGS.threads)
    torch.set_num_threads(ARGS.threads)
    images = np.random.default_rng(0).random((ARGS.batch, 3, ARGS.size, ARGS.size), dtype=np.float32)
    st = npanomaly.StudentTeacher.default_rgb()
    teacher, student = torch_twin(st.teacher, torch).eval(), torch_twin(st.student, torch).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    ours = optim.Adam(st.student_parameters(), lr=1e-3)
    theirs = torch.optim.Adam(student.parameters(), lr=1e-3)
    timages = torch.from_numpy(images)

    def torch_step():
        theirs.zero_grad()
        with torch.no_grad():
            target = teacher(timages)
        loss = torch.mean((student(timages) - target) ** 2)
        loss.backward()
        theirs.step()

    st.train()
    t_ours, t_torch = median_times([lambda: st.train_step(images, ours), torch_step], ARGS.repeats)
    print(f"threads={ARGS.threads} batch={ARGS.batch}x3x{ARGS.size}x{ARGS.size} numba={numba.__version__} "
          f"torch={torch.__version__}")
    print(f"train step (Adam):  npanomaly {t_ours * 1e3:8.1f} ms   torch {t_torch * 1e3:8.1f} ms   "
          f"ratio {t_ours / t_torch:.2f}x")

    st.eval().set_threshold(0.0)
    student.eval()

    def torch_predict():
        with torch.no_grad():
            t, s = teacher(timages), student(timages)
            per_position = ((t - s) ** 2).mean(dim=1, keepdim=True)
            torch.nn.functional.interpolate(per_position, size=(ARGS.size, ARGS.size), mode="bilinear")
            per_position.mean(dim=(1, 2, 3)).sqrt()

    p_ours, p_torch = median_times([lambda: st.predict(images), torch_predict], ARGS.repeats)
    print(f"predict (maps):     npanomaly {ARGS.batch / p_ours:8.1f} img/s torch {ARGS.batch / p_torch:8.1f} img/s "
          f"ratio {p_ours / p_torch:.2f}x (time)")
    if not ARGS.no_stfpm:
        stfpm_step(images, torch)


def stfpm_step(images, torch):
    """One STFPM training step with ResNet-18 nets, npanomaly against torch autograd."""
    import os
    import sys

    import torch.nn.functional as F

    import npanomaly
    from npanomaly import optim

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import torch_backbones as tb

    st = npanomaly.StudentTeacher(backbone="resnet18", weights="random")
    ours = optim.Adam(st.student_parameters(), lr=1e-3)
    teacher, student = tb.ResNet(False, (2, 2, 2, 2)), tb.ResNet(False, (2, 2, 2, 2))
    tb.randomise(teacher, seed=0)
    tb.randomise(student, seed=1)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    theirs = torch.optim.Adam([p for name, p in student.named_parameters() if name.startswith(
        ("conv1", "bn1", "layer1", "layer2", "layer3"))], lr=1e-3)
    timages = torch.from_numpy(st._teacher.prepare(images))

    def features(net, x):
        x = F.max_pool2d(F.relu(net.bn1(net.conv1(x))), 3, 2, 1)
        out = []
        for i in (1, 2, 3):
            x = getattr(net, f"layer{i}")(x)
            out.append(x)
        return out

    def torch_step():
        theirs.zero_grad()
        with torch.no_grad():
            targets = features(teacher, timages)
        loss = 0.0
        for t, s in zip(targets, features(student, timages)):
            loss = loss + 0.5 * ((F.normalize(s, dim=1) - F.normalize(t, dim=1)) ** 2).sum() / (
                s.shape[0] * s.shape[2] * s.shape[3])
        loss.backward()
        theirs.step()

    st.train()
    student.train()
    t_ours, t_torch = median_times([lambda: st.train_step(images, ours), torch_step], ARGS.repeats)
    print(f"STFPM ResNet-18 train step (Adam): npanomaly {t_ours * 1e3:8.1f} ms   torch {t_torch * 1e3:8.1f} ms   "
          f"ratio {t_ours / t_torch:.2f}x")


if __name__ == "__main__":
    main()
