"""Every benchmark script still runs: a smoke run of each at toy sizes (the figures are not checked).

The benchmarks call kernels directly and are not imported by anything else, so a changed kernel
signature would otherwise break them silently until the next time someone measures.
"""

import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")

CASES = [
    ("bench_layers.py", ["--quick", "--no-compile", "--repeats", "1"], "geometric mean ratio", ["torch"]),
    ("bench_student_teacher.py", ["--batch", "2", "--size", "32", "--repeats", "1"], "train step (Adam)", ["torch"]),
    ("bench_backbones.py", ["--batch", "1", "--size", "64", "--repeats", "1"], "resnet18", ["torch"]),
    ("bench_patchcore.py", ["--quick", "--repeats", "1", "--coreset-steps", "20"], "greedy coreset", ["torch"]),
    ("bench_quality.py", ["--size", "32"], "PatchCore", []),
    ("bench_quality.py", ["--hard", "--size", "32", "--seeds", "3"], "mean (min-max)", []),
    ("bench_quality.py", ["--hard", "--size", "32", "--seeds", "3", "--model", "StudentTeacher:seed:multiscale=True,"
                          "epochs=1", "--top-fractions", "0", "0.05"], "epochs=1 top_fraction=0.05", []),
    ("bench_threads.py", ["--rounds", "1", "--steps", "1", "--batch", "1", "--size", "32", "--start-delay", "4"],
     "two processes sharing the machine", ["torch"]),
    ("bench_scale.py", ["--sizes", "6", "12", "--in-memory-up-to", "6", "--backbones", "seed"], "seed  ", []),
    ("bench_distributed.py", ["--quick", "--repeats", "1"], "covering radius", ["distributed", "threadpoolctl"]),
]


@pytest.mark.parametrize("script,args,expected,needs", CASES, ids=[case[0] for case in CASES])
def test_benchmark_script_runs(script, args, expected, needs):
    for module in needs:
        pytest.importorskip(module)
    done = subprocess.run([sys.executable, script, *args], cwd=BENCHMARKS, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout
