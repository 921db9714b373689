"""PatchCore on a Dask cluster (issue 16, part 2): two worker processes of one thread each."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")
import dask.array as da  # noqa: E402

import npanomaly  # noqa: E402
from npanomaly import search, synthetic  # noqa: E402
from npanomaly import distributed as nd  # noqa: E402
from npanomaly.data import open_dataset  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster) as client:
        yield client
    cluster.close()


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    category = synthetic.make_category("granular", n_train=22, size=SIZE, seed=2)
    dataset = open_dataset(synthetic.write_mvtec(tmp_path_factory.mktemp("data"), category))
    return dataset.train_paths, dataset.train_images((SIZE, SIZE))


def covering_radius(rows, bank):
    """The largest distance from any row to its nearest bank row (exact float64 search)."""
    return float(search.knn(rows.astype(np.float64), bank.astype(np.float64), k=1)[0].max())


def test_import_npanomaly_never_imports_dask_and_the_module_names_the_extra():
    script = ("import sys, npanomaly; assert 'dask' not in sys.modules, 'dask imported'\n"
              "sys.modules['dask'] = None\n"
              "try:\n    import npanomaly.distributed\nexcept ImportError as error:\n    print(error)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "pip install npanomaly[dask]" in out


def test_fit_keeps_the_composable_coreset_bound_against_one_machine(client, textures):
    _, images = textures
    options = dict(batch_size=4, projection_dim=None)  # exact distances: the bound is about them
    single = npanomaly.PatchCore(**options).fit(images, 0.1)
    chunks = da.from_array(images, chunks=(8, 3, SIZE, SIZE))
    spread = nd.fit(npanomaly.PatchCore(**options), chunks, client, coreset_ratio=0.1)
    assert spread.memory_bank_.shape == single.memory_bank_.shape
    assert spread.image_size_ == (SIZE, SIZE) and np.isfinite(spread.threshold_)
    rows = np.concatenate([spread._patch_features(images[i:i + 4]).reshape(-1, spread.feature_size)
                           for i in range(0, len(images), 4)])
    r_single, r_spread = covering_radius(rows, single.memory_bank_), covering_radius(rows, spread.memory_bank_)
    assert r_spread <= 4 * r_single, (r_spread, r_single)
    # every bank row is one of the patch rows
    assert search.knn(spread.memory_bank_, rows, k=1)[0].max() == 0.0


def test_one_partition_keeps_the_single_machine_bank(client, textures, capsys):
    _, images = textures
    single = npanomaly.PatchCore(batch_size=4).fit(images, 0.1)
    whole = da.from_array(images, chunks=(len(images), 3, SIZE, SIZE))
    model = npanomaly.PatchCore(batch_size=4)
    model.show_progress = True
    spread = nd.fit(model, whole, client, coreset_ratio=0.1)
    assert "local coresets" in capsys.readouterr().err
    def sorted_rows(bank):
        return bank[np.lexsort(bank.T)]

    assert np.array_equal(sorted_rows(spread.memory_bank_), sorted_rows(single.memory_bank_))


def test_scores_and_maps_equal_one_machine_in_input_order_with_the_model_sent_once(client, textures):
    paths, images = textures
    model = npanomaly.PatchCore(batch_size=4).fit(images[:12], 0.2)
    scores, maps = model.scores_and_maps(images)
    before = sum(client.run(lambda: nd.ModelPlugin.builds).values())
    spread_scores, spread_maps = nd.scores_and_maps(model, da.from_array(images, chunks=(5, 3, SIZE, SIZE)), client)
    assert sum(client.run(lambda: nd.ModelPlugin.builds).values()) - before == 2  # once per worker
    assert np.array_equal(spread_scores, scores) and np.array_equal(spread_maps, maps)
    assert np.array_equal(nd.score_samples(model, paths, client, size=SIZE), scores)
    assert np.array_equal(nd.anomaly_map(model, paths, client), maps)  # size: the fitted one
    threshold = nd.calibrate_threshold(model, paths, 0.9, client).threshold
    assert threshold == model.calibrate_threshold(images, 0.9).threshold
    left = client.run(lambda dask_worker: [name for name in dask_worker.plugins if name.startswith("npanomaly-")])
    assert all(names == [] for names in left.values())  # each call removes its model from the workers


def test_sharded_bank_search_equals_one_search_over_the_whole_bank(client):
    rng = np.random.default_rng(5)
    bank = rng.standard_normal((301, 24)).astype(np.float32)
    bank[200] = bank[10]  # equal rows in different shards: ties must go to the lower index
    bank[250] = bank[10]
    queries = np.concatenate([rng.standard_normal((40, 24)).astype(np.float32), bank[[10, 0, 300]]])
    with nd.ShardedBank(bank, client, shards=3) as sharded:
        for k in (1, 4, 150):
            expected = search.knn(queries, bank, k=k)
            got = sharded.knn(queries, k=k)
            assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]), k
        picks = np.array([300, 0, 150, 10, 10])
        assert np.array_equal(sharded.rows(picks), bank[picks])
        with pytest.raises(ValueError, match="exceeds the 301 bank rows"):
            sharded.knn(queries, k=302)


def test_patchcore_scores_with_a_sharded_bank_equal_one_machine(client, textures):
    paths, images = textures
    for score in ("reweighted", "max"):
        model = npanomaly.PatchCore(batch_size=4, score=score).fit(images[:10], 0.2)
        scores, maps = model.scores_and_maps(images)
        with nd.ShardedBank(model.memory_bank_, client) as bank:
            got_scores, got_maps = nd.scores_and_maps(model, paths, client, bank=bank)
        assert np.array_equal(got_scores, scores) and np.array_equal(got_maps, maps), score


def _slow_block(images, seconds):
    time.sleep(seconds)
    return images


def _slow_array(images, per_block, seconds):
    blocks = [da.from_delayed(dask.delayed(_slow_block)(images[i:i + per_block], seconds),
                              shape=images[i:i + per_block].shape, dtype=images.dtype)
              for i in range(0, len(images), per_block)]
    return da.concatenate(blocks)


def _kill_a_worker_soon(client, delay):
    """SIGKILL one worker `delay` seconds after it starts running tasks (waiting for that rather than
    for a fixed time: on a busy machine a fixed delay could land before the fit's tasks, e.g. while
    the model is being sent)."""
    address, pid = next(iter(client.run(os.getpid).items()))

    def kill():
        deadline = time.monotonic() + 60
        while not client.processing().get(address) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def test_a_worker_killed_mid_fit_is_replaced_and_the_fit_finishes(client, textures):
    _, images = textures
    expected = nd.fit(npanomaly.PatchCore(batch_size=4), da.from_array(images, chunks=(8, 3, SIZE, SIZE)), client,
                      coreset_ratio=0.1)
    before = set(client.run(os.getpid).values())
    killer = _kill_a_worker_soon(client, 1.0)
    model = nd.fit(npanomaly.PatchCore(batch_size=4), _slow_array(images, 8, 2.0), client, coreset_ratio=0.1)
    killer.join()
    assert np.array_equal(model.memory_bank_, expected.memory_bank_)
    client.wait_for_workers(2, timeout=60)
    assert len(before - set(client.run(os.getpid).values())) == 1  # the killed worker was replaced


def test_a_fit_dask_gives_up_on_fails_with_one_error_and_keeps_no_bank(textures):
    _, images = textures
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        with cluster, distributed.Client(cluster) as client:
            killer = _kill_a_worker_soon(client, 1.0)
            model = npanomaly.PatchCore(batch_size=4)
            with pytest.raises(RuntimeError, match="local coresets failed: a worker died .* nothing was kept"):
                nd.fit(model, _slow_array(images, 8, 3.0), client, coreset_ratio=0.1)
            killer.join()
            assert model.memory_bank_ is None and model.threshold_ is None


def test_bad_arguments_get_clear_errors(client, textures):
    paths, images = textures
    with pytest.raises(ValueError, match="pass size="):
        nd.fit(npanomaly.PatchCore(), paths, client)
    with pytest.raises(TypeError, match="a dask array .* or a list of image file paths"):
        nd.fit(npanomaly.PatchCore(), images, client)
    with pytest.raises(ValueError, match="sampler must be 'greedy'"):
        nd.fit(npanomaly.PatchCore(sampler="uniform"), paths, client, size=SIZE)
    with pytest.raises(TypeError, match="must be a PatchCore"):
        nd.fit(npanomaly.StudentTeacher(), paths, client, size=SIZE)
    with pytest.raises(RuntimeError, match="not fitted"):
        nd.score_samples(npanomaly.PatchCore(), paths, client, size=SIZE)
    with pytest.raises(ValueError, match="broken.png"):
        broken = os.path.join(os.path.dirname(paths[0]), "..", "broken.png")
        with open(broken, "wb") as file:
            file.write(b"\x89PNG\r\n\x1a\nbroken")
        nd.fit(npanomaly.PatchCore(batch_size=4), paths[:6] + [broken], client, size=SIZE)


def test_cli_fits_and_predicts_on_a_scheduler_and_agrees_with_one_machine(client, textures, tmp_path, capsys):
    from npanomaly import cli

    paths, _ = textures
    root = os.path.dirname(os.path.dirname(os.path.dirname(paths[0])))  # <category>/train/good/x.png
    out = tmp_path / "model.npz"
    address = client.scheduler.address
    assert cli.main(["fit", root, "--size", str(SIZE), "--out", str(out), "--quiet", "--scheduler", address]) == 0
    model = npanomaly.load(out)
    assert model.memory_bank_.shape[1] == model.feature_size and model.image_size_ == (SIZE, SIZE)
    capsys.readouterr()
    assert cli.main(["predict", str(out), *paths[:5], "--json", "--scheduler", "local:2"]) == 0
    spread = [row["score"] for row in json.loads(capsys.readouterr().out)]
    assert cli.main(["predict", str(out), *paths[:5], "--json"]) == 0
    local = [row["score"] for row in json.loads(capsys.readouterr().out)]
    assert spread == local
    assert cli.main(["eval", str(out), root, "--scheduler", address]) == 0
    spread_table = capsys.readouterr().out.splitlines()[:-1]  # the last line has images/s
    assert cli.main(["eval", str(out), root]) == 0
    assert spread_table == capsys.readouterr().out.splitlines()[:-1]
    assert cli.main(["fit", root, "--model", "student-teacher", "--size", str(SIZE), "--out", str(tmp_path / "s.npz"),
                     "--quiet", "--scheduler", address]) == 1
    assert "must be a PatchCore" in capsys.readouterr().err
    assert cli.main(["predict", str(out), paths[0], "--scheduler", "local:x"]) == 1
    assert "local:N needs a number of workers" in capsys.readouterr().err


def test_a_worker_lost_while_the_model_is_sent_is_one_clear_error():
    """register_plugin raises distributed's CommClosedError (an OSError) when a worker dies during
    the broadcast; a fit or a scoring then fails with the same one-line RuntimeError as a lost task."""
    assert issubclass(distributed.comm.core.CommClosedError, OSError)

    class DyingCluster:
        def register_plugin(self, plugin, name):
            raise distributed.comm.core.CommClosedError("in <TCP (closed) register_worker_plugin>: Stream is closed")

        def unregister_worker_plugin(self, name):
            raise OSError("the cluster is gone")

    with pytest.raises(RuntimeError, match=r"local coresets failed: a worker died while the model was being sent .*"
                                           r"Stream is closed.*nothing was kept"):
        with nd._ModelOnWorkers(DyingCluster(), npanomaly.PatchCore(), fitted=False, what="local coresets"):
            pytest.fail("the body must not run")
