"""Feature extractors, reference statistics, FID/dFID protocols and the evaluation CLI."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import micro_network, run_cli, uint8_features_input, write_mnist_subset
from PIL import Image

from tcm_core.data import open_dataset
from tcm_core.errors import RefusedFileError
from tcm_core.evaluation import commands as evaluation
from tcm_core.evaluation import metrics
from tcm_core.evaluation.features import load_extractor, train_feature_net
from tcm_core.sampling import generate, sample_batches, to_uint8

OFFICIAL_INCEPTION = Path(os.environ.get("TCM_OFFICIAL_INCEPTION", "/tmp/inception-2015-12-05.pt"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lenet_world(tmp_path_factory):
    """1,000 real MNIST digits at 16x16, a LeNet trained on them for 2 epochs, and their statistics."""
    root = tmp_path_factory.mktemp("lenet_world")
    data = write_mnist_subset(root / "mnist1000.zip", 1000)
    meta = train_feature_net(data, root / "lenet.pt", epochs=2, log=None)
    extractor = load_extractor("lenet", feature_net=root / "lenet.pt")
    ref = evaluation.compute_reference_stats(data, extractor, cache_dir=root / "cache", progress=False)
    return {"root": root, "data": data, "ds": open_dataset(data), "meta": meta, "extractor": extractor, "ref": ref}


# ---------------------------------------------------------------------------------------------------
# Inception
# ---------------------------------------------------------------------------------------------------
def test_inception_bundled_weights_follow_cleanfid_clean_mode(tmp_path):
    """Our streamed Inception features equal clean-fid's own folder pipeline (mode="clean") on the same PNGs."""
    from tcm_core.data import load_mnist5k, mnist_to_resolution
    from tcm_core.evaluation.tv_compat import import_cleanfid_fid

    digits, _ = load_mnist5k()
    grey = np.stack([mnist_to_resolution(d, 16) for d in digits[:10]])  # (10, 1, 16, 16): repeated to RGB
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(grey[:4]):
        Image.fromarray(img[0]).save(folder / f"img{i:03d}.png")
    extractor = load_extractor("inception")
    assert extractor.label == "FID (Inception)" and extractor.dim == 2048
    ours = extractor(uint8_features_input(grey)).numpy()
    assert ours.shape == (10, 2048) and np.isfinite(ours).all() and ours.std() > 0

    fid = import_cleanfid_fid()
    raw = torch.jit.load(str(extractor.weights_path), map_location="cpu").eval()
    theirs = fid.get_folder_features(str(folder), model=lambda x: raw((x - 128) / 128), num_workers=0,
                                     batch_size=4, device=torch.device("cpu"), mode="clean", verbose=False)
    assert np.allclose(ours[:4], theirs, rtol=1e-4, atol=1e-4)
    # FID(A, A) = 0 (exact low-rank route: a 2048-d square root costs ~45 s on one busy core).
    scale = metrics.feature_stats(ours)[1].trace()
    assert abs(metrics.fid_from_features(ours, ours)) < 1e-9 * scale
    assert metrics.fid_from_features(ours[:5], ours[5:]) > 1e-3 * scale  # and different sets are apart


@pytest.mark.skipif(not OFFICIAL_INCEPTION.is_file(), reason=f"{OFFICIAL_INCEPTION} (clean-fid's weights) absent")
def test_official_inception_file_gives_the_bundled_features():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)).float()
    bundled = load_extractor("inception")(images)
    official = load_extractor("inception", inception_path=OFFICIAL_INCEPTION)(images)
    assert torch.allclose(bundled, official, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------
# LeNet, statistics, dFID
# ---------------------------------------------------------------------------------------------------
def test_lenet_features_and_pixel_shift_monotone(lenet_world):
    ext, ds, ref = lenet_world["extractor"], lenet_world["ds"], lenet_world["ref"]
    assert lenet_world["meta"]["accuracy"] > 0.7  # 2 epochs on 900 digits; chance is 0.1
    assert ext.label == "FID (LeNet features)" and ext.dim == 128
    images = ds.get_batch(range(len(ds)))[0]
    grey = uint8_features_input(images)
    assert torch.allclose(ext(grey), ext(grey.repeat(1, 3, 1, 1)), atol=1e-5)  # RGB-repeated greys read the same
    assert ref.meta["num"] == 1000 and ref.meta["extractor_identity"] == ext.identity
    values = []
    for delta in [0, 32, 96, 192]:
        shifted = (grey + delta).clamp(0, 255)  # brighten every pixel
        values.append(metrics.frechet_distance(*metrics.feature_stats(ext(shifted)), *ref.as_tuple()))
    assert values[0] < 1e-6 * np.trace(ref.sigma)
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_reference_stats_cache_and_external_npz(lenet_world, tmp_path):
    ext, ref = lenet_world["extractor"], lenet_world["ref"]
    cached = evaluation.compute_reference_stats(lenet_world["data"], ext, cache_dir=lenet_world["root"] / "cache",
                                                progress=False)
    assert cached.meta["key"] == ref.meta["key"] and np.array_equal(cached.sigma, ref.sigma)
    assert (lenet_world["root"] / "cache" / "ref-stats" / f"{ref.meta['key']}.npz").is_file()
    assert ref.meta["key"] != evaluation.reference_stats_key(ref.meta["dataset_sha256"], ext.identity, 32)
    # A clean-fid / EDM style file: only mu and sigma.
    np.savez(tmp_path / "external.npz", mu=ref.mu, sigma=ref.sigma)
    external = evaluation.load_ref_stats(tmp_path / "external.npz")
    assert external.meta["format"] == "external" and np.array_equal(external.mu, ref.mu)
    evaluation.check_compatible(external, ext)
    np.savez(tmp_path / "wrong_dim.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(RefusedFileError, match="2048 dims"):
        evaluation.check_compatible(evaluation.load_ref_stats(tmp_path / "wrong_dim.npz"), ext)


def test_dfid_at_t_max_matches_one_step_generation(lenet_world):
    """dFID at t = 80 sees x = y + 80 z; 1-step generation sees 80 z with the same z (noise seed = seed set).

    Inside the net the input is scaled by c_in = 1 / sqrt(80^2 + 0.5^2), so y (|y| <= 1) moves it by at most
    0.0125 per pixel: the two FIDs must agree far better than two generation FIDs with *different* latents
    (seed sets 0 and 1), whose gap is the sampling noise at this N. We require the agreement to be within
    half that gap, and check that the statistic is not blind: at t = 1 dFID is far from generation FID.
    """
    ext, ds, ref = lenet_world["extractor"], lenet_world["ds"], lenet_world["ref"].as_tuple()
    net = micro_network()
    num = 300
    # The dFID noise is the very latent sample_batches draws for image i of seed set 0.
    z = metrics.per_image_normal((1, 16, 16), range(8), seed=0)
    assert torch.equal(to_uint8(generate(net, z, [80.0])), next(sample_batches(net, 8, 0, [80.0], 8, "cpu")))

    gen = [metrics.fid_of_generator(net, extractor=ext, ref_stats=ref, num=num, seed=k, batch_size=100)[0]
           for k in (0, 1)]
    d = metrics.dfid(net, ds, [80.0, 1.0], extractor=ext, ref_stats=ref, num=num, batch_size=100)
    spread = abs(gen[0] - gen[1])
    assert spread > 0
    assert abs(d[80.0] - gen[0]) < 0.5 * spread, (d, gen)
    assert abs(d[1.0] - gen[0]) > 5 * spread, (d, gen)


def test_periodic_evaluator_keys_and_determinism(lenet_world):
    evaluate = evaluation.make_periodic_evaluator(extractor=lenet_world["extractor"], ref_stats=lenet_world["ref"]
                                                  .as_tuple(), data=lenet_world["ds"], num=24, mid_t=1.0,
                                                  dfid_ts=(1.0, 0.5))
    net = micro_network().train()
    first = evaluate(net, 10)
    assert set(first) == {"fid_1step", "fid_2step", "dfid_t1", "dfid_t0.5"}
    assert all(np.isfinite(v) for v in first.values())
    assert net.training  # mode restored
    assert evaluate(net, 20) == first
    with pytest.raises(ValueError, match="data"):
        evaluation.make_periodic_evaluator(extractor=lenet_world["extractor"], ref_stats=lenet_world["ref"].as_tuple(),
                                           num=40, dfid_ts=(1.0,))


def test_grid_layout():
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 2, 2) * 50
    grid = evaluation.image_grid(images)
    assert grid.shape == (4, 6, 1)  # 3 columns, 2 rows of 2x2
    assert grid[0, 0, 0] == 0 and grid[0, 2, 0] == 50 and grid[2, 2, 0] == 200 and grid[2, 4, 0] == 0


def test_labels_and_constants():
    class Ext:
        label = "FID (Inception)"

    assert evaluation.fid_label(Ext, 50000, 3) == "FID (Inception, 50k, min of 3)"
    assert evaluation.fid_label(Ext, 300) == "FID (Inception, 300)"
    assert evaluation.DFID_TS_OFFICIAL == (1.0, 2.0, 3.0, 4.0)
    assert evaluation.DFID_TS_WIDE == (0.2, 0.5, 0.8, 1.0, 1.5, 2.0, 4.0, 10.0, 40.0, 80.0)
    with pytest.raises(ValueError, match="--steps"):
        evaluation.parse_floats("80,-1", "--steps")


# ---------------------------------------------------------------------------------------------------
# The real CLI, end to end
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lenet_pipeline_through_cli(tmp_path):
    from tcm_core.io.network_files import save_network

    env = {"TCM_CACHE_DIR": str(tmp_path / "cache")}
    data, lenet, stats = tmp_path / "mnist5k.zip", tmp_path / "lenet.pt", tmp_path / "ref.npz"
    run_cli(["prepare-dataset", "--name", "mnist5k", "--resolution", "16", "--out", str(data)], env)
    ds = open_dataset(data)
    assert (len(ds), ds.resolution, ds.channels, ds.label_dim) == (5000, 16, 1, 10)
    run_cli(["train-feature-net", "--data", str(data), "--out", str(lenet), "--epochs", "1"], env)
    assert json.loads(lenet.with_suffix(".json").read_text())["dataset_sha256"] == ds.sha256
    run_cli(["reference-stats", "--data", str(data), "--extractor", "lenet", "--feature-net", str(lenet),
             "--out", str(stats), "--device", "cpu", "--no-progress"], env)
    ref = evaluation.load_ref_stats(stats)
    assert ref.mu.shape == (128,) and ref.meta["num"] == 5000 and ref.meta["dataset_sha256"] == ds.sha256

    ckpt = tmp_path / "net.safetensors"
    save_network(micro_network(), ckpt, iteration=1234, provenance={"note": "test"})
    common = ["--extractor", "lenet", "--feature-net", str(lenet), "--ref-stats", str(stats), "--device", "cpu",
              "--no-progress"]
    out, grid = tmp_path / "eval" / "fid.json", tmp_path / "eval" / "grid.png"
    run_cli(["evaluate", "fid", "--ckpt", str(ckpt), "--steps", "80,1.0", "--num", "32", "--seeds", "2",
             "--out", str(out), "--grid", str(grid), "--grid-num", "16", "--batch", "16",
             "--run-key", "eval_fid_test", *common], env)
    record = json.loads(out.read_text())
    assert record["metric"] == "fid_2step" and record["label"] == "FID (LeNet features, 32, min of 2)"
    assert record["iteration"] == 1234 and record["steps"] == [80.0, 1.0] and len(record["per_seed"]) == 2
    assert record["min"] == min(record["per_seed"]) and record["per_seed"][0] != record["per_seed"][1]
    assert record["ckpt_sha256"] and record["images_per_second"] > 0
    assert Image.open(grid).size == (64, 64)
    logged = [json.loads(line) for line in (out.parent / "fid.tracking" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [{"step": 1234, "fid_2step": record["min"]}]
    dfid_out = tmp_path / "dfid.json"
    run_cli(["evaluate", "dfid", "--ckpt", str(ckpt), "--data", str(data), "--ts", "1,80", "--num", "32",
             "--out", str(dfid_out), *common], env)
    drec = json.loads(dfid_out.read_text())
    assert drec["metric"] == "dfid" and set(drec["values"]) == {"1", "80"} and drec["num"] == 32
    run_cli(["evaluate", "grid", "--ckpt", str(ckpt), "--steps", "80", "--num", "10", "--out",
             str(tmp_path / "g.png"), "--device", "cpu"], env)
    assert Image.open(tmp_path / "g.png").size == (64, 48)  # 4 columns x 3 rows of 16x16


# ---------------------------------------------------------------------------------------------------
# Several evaluations in one process (evaluate many: the workflow's evaluate_network)
# ---------------------------------------------------------------------------------------------------
_TIMING = ("seconds", "images_per_second", "ckpt", "ref_stats", "data")


def test_evaluate_many_writes_what_each_command_writes_alone_with_its_own_mlflow_run(lenet_world, tmp_path,
                                                                                    monkeypatch):
    """`evaluate many --each "fid ..." --each "grid ..." --each "dfid ..."`: each output equals the one of the
    command run alone (the same values and grid pixels), and each evaluation is its own FINISHED MLflow child run
    with its own run key, the rule that would run it alone, the job's shared tags and only its own file."""
    import shlex

    from mlflow.tracking import MlflowClient

    from tcm_core.cli import main
    from tcm_core.io.network_files import save_network
    from tcm_core.tracking.tracker import ENV_ARTIFACTS, ENV_TAGS

    root = lenet_world["root"]
    [ref] = list((root / "cache" / "ref-stats").glob("*.npz"))
    ckpt = tmp_path / "net.safetensors"
    save_network(micro_network(5), ckpt, iteration=40, provenance={"mode": "stage1", "config": {}})
    features = f"--extractor lenet --feature-net {root / 'lenet.pt'} --ref-stats {ref}"
    uri, parent = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlflow.json"
    assert main(["mlflow-init", "--tracking-uri", uri, "--experiment", "tcm-many", "--study", "s",
                 "--out", str(parent)]) == 0

    def commands(folder: Path, tracked: bool) -> list[str]:
        def track(key: str) -> str:
            return f" --mlflow-uri {uri} --mlflow-parent {parent} --run-key {key}" if tracked else ""

        common = f"--ckpt {ckpt} --device cpu --no-progress"
        return [f"fid {common} --steps 80,1.0 --num 24 --seeds 2 {features} --out {folder / 'fid_2step.json'}"
                + track("fid:x:net:2step"),
                f"grid {common} --steps 80 --num 9 --out {folder / 'grid_1step.png'}"
                + track("sample_grid:x:net:1step"),
                f"dfid {common} --data {lenet_world['data']} --ts 1,4 --num 24 {features}"
                f" --out {folder / 'dfid.json'}" + track("dfid:x:net:dfid")]

    for each in commands(tmp_path / "alone", tracked=False):
        assert main(["evaluate", *shlex.split(each)]) == 0
    monkeypatch.setenv(ENV_TAGS, '{"tcm.preset": "x", "tcm.stage": "eval"}')
    monkeypatch.setenv(ENV_ARTIFACTS, json.dumps([str(ckpt)]))  # a job's files: not logged on every evaluation
    argv = ["evaluate", "many"] + [w for each in commands(tmp_path / "many", tracked=True) for w in ("--each", each)]
    assert main(argv) == 0
    assert os.environ[ENV_TAGS] == '{"tcm.preset": "x", "tcm.stage": "eval"}'  # the job's environment is restored
    for name in ("fid_2step.json", "dfid.json"):
        alone, many = (json.loads((tmp_path / f / name).read_text()) for f in ("alone", "many"))
        assert {k: v for k, v in alone.items() if k not in _TIMING} == {k: v for k, v in many.items()
                                                                        if k not in _TIMING}
    assert np.array_equal(np.asarray(Image.open(tmp_path / "alone" / "grid_1step.png")),
                          np.asarray(Image.open(tmp_path / "many" / "grid_1step.png")))

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([json.loads(parent.read_text())["experiment_id"]], "tags.`tcm.stage` = 'eval'")
    by_key = {r.data.tags["tcm.run_key"]: r for r in runs}
    assert set(by_key) == {"fid:x:net:2step", "sample_grid:x:net:1step", "dfid:x:net:dfid"}
    fid = json.loads((tmp_path / "many" / "fid_2step.json").read_text())
    assert by_key["fid:x:net:2step"].data.metrics == {"fid_2step": fid["min"]}
    for key, run in by_key.items():
        assert run.info.status == "FINISHED" and run.data.tags["tcm.rule"] == key.split(":")[0]
        assert run.data.tags["tcm.preset"] == "x"
        files = {a.path for a in client.list_artifacts(run.info.run_id)} - {"metrics.jsonl", "params.json"}
        assert len(files) == 1 and files <= {"fid_2step.json", "grid_1step.png", "dfid.json"}, (key, files)


def test_evaluate_many_checks_every_evaluation_before_running_any(lenet_world, tmp_path, capsys):
    from tcm_core.cli import main

    out = tmp_path / "fid.json"
    good = f"grid --ckpt {tmp_path / 'absent.safetensors'} --num 4 --out {tmp_path / 'g.png'}"
    assert main(["evaluate", "many", "--each", f"fid --num 4 --out {out}", "--each", "many --each x"]) == 2
    assert "--each" in capsys.readouterr().err
    for bad in ("mid-t-sweep --ckpt x", "", f"{good} --mlflow-uri sqlite:///{tmp_path / 'x.db'}"):
        assert main(["evaluate", "many", "--each", good, "--each", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--each" in err[0], err
    assert not (tmp_path / "g.png").exists()


# ---------------------------------------------------------------------------------------------------
# The 2-step middle-time sweep (issue 28)
# ---------------------------------------------------------------------------------------------------
def test_mid_t_sweep_skips_below_t_prime_and_each_point_is_the_fid_command(lenet_world, tmp_path):
    """A Stage-2 network (t' = 1 in its provenance) is swept from t' on: 0.5 is recorded as skipped; every point
    equals `evaluate fid --steps 80,t_mid` on the same seed sets; the best is the lowest. A Stage-1 network is
    swept everywhere."""
    from tcm_core.cli import main
    from tcm_core.io.network_files import save_network

    [ref] = list((lenet_world["root"] / "cache" / "ref-stats").glob("*.npz"))
    common = ["--num", "16", "--seeds", "2", "--extractor", "lenet", "--feature-net",
              str(lenet_world["root"] / "lenet.pt"), "--ref-stats", str(ref), "--device", "cpu", "--no-progress"]
    stage2 = tmp_path / "stage2.safetensors"
    save_network(micro_network(3), stage2, iteration=800, provenance={"mode": "stage2", "config": {"t_prime": 1.0}})
    out = tmp_path / "sweep.json"
    assert main(["evaluate", "mid-t-sweep", "--ckpt", str(stage2), "--mid-ts", "2,0.5,1", "--out", str(out),
                 *common]) == 0
    record = json.loads(out.read_text())
    assert record["mid_ts"] == [1.0, 2.0] and record["skipped_below_t_prime"] == [0.5] and record["t_prime"] == 1.0
    for mid_t, fid in zip(record["mid_ts"], record["fids"]):
        one = tmp_path / f"fid_{mid_t:g}.json"
        assert main(["evaluate", "fid", "--ckpt", str(stage2), "--steps", f"80,{mid_t:g}", "--out", str(one),
                     *common]) == 0
        assert json.loads(one.read_text())["min"] == pytest.approx(fid, rel=1e-9)
    assert record["best"] == min(record["fids"]) and record["fids"][record["mid_ts"].index(record["best_mid_t"])] \
        == record["best"]
    stage1 = tmp_path / "stage1.safetensors"
    save_network(micro_network(3), stage1, iteration=400, provenance={"mode": "stage1", "config": {"t_prime": None}})
    assert main(["evaluate", "mid-t-sweep", "--ckpt", str(stage1), "--mid-ts", "0.5,1", "--out", str(out),
                 *common]) == 0
    assert json.loads(out.read_text())["skipped_below_t_prime"] == []
    assert main(["evaluate", "mid-t-sweep", "--ckpt", str(stage2), "--mid-ts", "0.5", "--out", str(out),
                 *common]) == 2  # nothing at or above t': one line, the config error's exit code
