"""One Student-Teacher training step and prediction against torch autograd, in one process.

    python benchmarks/bench_student_teacher.py [--threads 2] [--repeats 5] [--batch 8] [--size 256]

StudentTeacher.default_rgb() (teacher 3->64->128, student 3->32->128, 3x3 stride 2 convolutions with
batch norm and ReLU) on a batch of 8 RGB 256x256 images: npanomaly's train_step (forward through both
nets, the loss gradient, the student's hand-written backward pass, Adam) against the same nets,
weights and optimiser under torch autograd; then predict throughput (images/s) of both.
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


if __name__ == "__main__":
    main()
