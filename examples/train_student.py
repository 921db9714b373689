"""Train the seed Student-Teacher student and draw its loss curve (an SVG file, no plotting library).

    python examples/train_student.py [--epochs 30] [--size 64] [--out loss.svg]

The training and held-out losses per epoch come from ``fit``'s ``loss_history_`` and
``val_loss_history_``: the student's hand-written backward pass and Adam at work.
"""

import argparse

import npanomaly
from npanomaly import metrics, synthetic


def svg_curves(curves, width=480, height=280, pad=40):
    """A minimal line chart of {name: [values]} as an SVG document."""
    values = [v for curve in curves.values() for v in curve]
    low, high = min(values), max(values)
    longest = max(len(curve) for curve in curves.values())

    def point(i, v):
        x = pad + (width - 2 * pad) * i / max(1, longest - 1)
        y = height - pad - (height - 2 * pad) * (v - low) / ((high - low) or 1.0)
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    for (name, curve), colour, row in zip(curves.items(), ("#1f77b4", "#d62728"), (0, 1)):
        points = " ".join(point(i, v) for i, v in enumerate(curve))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        parts.append(f'<text x="{width - pad}" y="{pad + 16 * row}" text-anchor="end" fill="{colour}">{name}</text>')
    parts.append(f'<text x="{pad}" y="{height - 10}">epoch 1 .. {longest}; loss {low:.4g} .. {high:.4g}</text></svg>')
    return "\n".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default="loss.svg")
    args = parser.parse_args()
    category = synthetic.make_category("grid", n_train=48, size=args.size, seed=0)
    train, held_out = category.train[:40], category.train[40:]

    st = npanomaly.StudentTeacher.default_rgb()
    st.fit(train, epochs=args.epochs, batch_size=8, lr=1e-3, validation=held_out, verbose=False)
    print(f"loss {st.loss_history_[0]:.4f} -> {st.loss_history_[-1]:.4f} over {args.epochs} epochs, "
          f"held-out {st.val_loss_history_[-1]:.4f}")
    scores = st.score_samples(category.test)
    print(f"image AUROC on the test images: {metrics.auroc(scores, category.labels):.3f}")
    with open(args.out, "w") as stream:
        stream.write(svg_curves({"training": st.loss_history_, "held out": st.val_loss_history_}))
    print(f"loss curve in {args.out}")


if __name__ == "__main__":
    main()
