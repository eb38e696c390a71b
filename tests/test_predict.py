"""`deferredseg predict` on a run folder built by hand: masks, capacity-bounded deferral maps, review list."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from PIL import Image

from cli.main import main
from client.engine import predict
from client.predict import load_site_predictor, read_new_images
from common.config import RunSettings, TrainSettings
from common.losses import LossWeights
from common.model import DeferredSegNet, NetworkConfig, local_state, shared_state
from common.site import load_site_spec, load_split
from common.weights import save_weights

RUN_NAME = "run-a"
CHOSEN_ROUND = 2
CAPACITY_OVERRIDE = 0.1
# A large expert bias makes every pixel prefer an expert, so the capacity cap decides the whole map.
EXPERT_BIAS = 6.0
# One test case gets an ROI file that covers its left columns. The others have none, so their ROI is the whole image.
ROI_CASE = "case-006"
ROI_COLUMNS = 20


def build_network(settings: RunSettings, num_experts: int, seed: int) -> DeferredSegNet:
    torch.manual_seed(seed)
    model = DeferredSegNet(settings.network, num_experts)
    with torch.no_grad():
        model.expert_heads.bias.fill_(EXPERT_BIAS)
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run of one synthetic site: settings, federation, summary, weights of rounds 1 and 2, heads."""
    from common.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("predict")
    site_dir = write_synthetic_sites(root / "sites", n_sites=1, seed=3, image_size=32, cases_per_site=8)[0]
    roi = np.zeros((32, 32), dtype=np.uint8)
    roi[:, :ROI_COLUMNS] = 255
    (site_dir / "roi").mkdir()
    Image.fromarray(roi).save(site_dir / "roi" / f"{ROI_CASE}.png")
    spec = load_site_spec(site_dir)
    num_experts = len(spec.experts)
    first_expert = spec.experts[0].id

    run_dir = root / RUN_NAME
    state_dir = root / "state"
    settings = RunSettings(
        network=NetworkConfig(in_channels=1, features=8, channels=(8, 16)),
        train=TrainSettings(patch_size=32, inference_window=32, device="cpu"),
        loss=LossWeights(),
        local_epochs=1,
    )
    run_dir.mkdir()
    (run_dir / "settings.json").write_text(settings.to_json())
    federation = {
        "sites": [{"dir": str(site_dir), "state-dir": str(state_dir), "capacity": {first_expert: CAPACITY_OVERRIDE}}]
    }
    (run_dir / "federation.toml").write_text(tomli_w.dumps(federation))
    (run_dir / "summary.json").write_text(json.dumps({"chosen_round": CHOSEN_ROUND, "rounds": 2}))

    models = {}
    for round_number in (1, CHOSEN_ROUND):
        model = build_network(settings, num_experts, seed=round_number)
        save_weights(run_dir / "checkpoints" / f"round-{round_number:04d}.safetensors", shared_state(model))
        save_weights(state_dir / RUN_NAME / "heads" / f"round-{round_number:04d}.safetensors", local_state(model))
        models[round_number] = model
    save_weights(run_dir / "model-final.safetensors", shared_state(models[CHOSEN_ROUND]))

    capacity = {e.id: e.capacity for e in spec.experts} | {first_expert: CAPACITY_OVERRIDE}
    return {
        "run_dir": run_dir,
        "site_dir": site_dir,
        "state_dir": state_dir,
        "settings": settings,
        "models": models,
        "spec": spec,
        "capacity": capacity,
    }


@pytest.fixture(scope="module")
def split_output(run, tmp_path_factory):
    """Output folder of `deferredseg predict` on the site's test split, with overlays."""
    out = tmp_path_factory.mktemp("out-test-split")
    code = main(
        ["predict", "--run", str(run["run_dir"]), "--site", str(run["site_dir"]), "--out", str(out), "--overlays"]
    )
    assert code == 0
    return out


def read_review(out: Path) -> list[dict[str, str]]:
    with (out / "review.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def read_owner_indices(path: Path) -> np.ndarray:
    picture = Image.open(path)
    assert picture.mode == "P"
    return np.asarray(picture)


def expected_model_mask(model: DeferredSegNet, image: np.ndarray, settings: RunSettings) -> np.ndarray:
    prob = predict(model, image, settings.train, torch.device("cpu")).prob
    return (prob > 0.5).numpy()


def test_predict_split_files(run, split_output):
    for case_id in run["spec"].splits["test"]:
        assert (split_output / f"{case_id}_model.png").is_file()
        assert (split_output / f"{case_id}_deferral.png").is_file()
        assert (split_output / "overlays" / f"{case_id}.png").is_file()
    assert (split_output / "deferral_legend.json").is_file()


def test_predict_model_mask(run, split_output):
    cases = load_split(run["spec"], "test")
    model = run["models"][CHOSEN_ROUND]
    for case in cases:
        written = np.asarray(Image.open(split_output / f"{case.case_id}_model.png"))
        expected = expected_model_mask(model, case.image, run["settings"]) & case.roi
        assert set(np.unique(written)) <= {0, 255}
        np.testing.assert_array_equal(written == 255, expected)


def test_predict_within_capacity(run, split_output):
    expert_ids = [e.id for e in run["spec"].experts]
    for case in load_split(run["spec"], "test"):
        indices = read_owner_indices(split_output / f"{case.case_id}_deferral.png")
        n_roi = int(case.roi.sum())
        assert indices.max() <= len(expert_ids)
        for k, expert_id in enumerate(expert_ids):
            count = int((indices == k + 1).sum())
            budget = math.floor(run["capacity"][expert_id] * n_roi)
            assert count <= budget
            # Every pixel prefers an expert here, so each expert's budget is filled exactly.
            assert count == budget


def test_predict_roi_outside_model(run, split_output):
    indices = read_owner_indices(split_output / f"{ROI_CASE}_deferral.png")
    model_mask = np.asarray(Image.open(split_output / f"{ROI_CASE}_model.png"))

    assert (indices[:, ROI_COLUMNS:] == 0).all()
    assert (model_mask[:, ROI_COLUMNS:] == 0).all()
    assert (indices[:, :ROI_COLUMNS] > 0).any()


def test_predict_review_counts(run, split_output):
    rows = read_review(split_output)
    expert_ids = [e.id for e in run["spec"].experts]
    recount = {}
    for case in load_split(run["spec"], "test"):
        indices = read_owner_indices(split_output / f"{case.case_id}_deferral.png")
        for k, expert_id in enumerate(expert_ids):
            pixels = int((indices == k + 1).sum())
            if pixels:
                recount[(case.case_id, expert_id)] = (pixels, pixels / case.roi.sum())

    assert {(r["case"], r["expert"]) for r in rows} == set(recount)
    for row in rows:
        pixels, fraction = recount[(row["case"], row["expert"])]
        assert int(row["pixels"]) == pixels
        assert float(row["roi_fraction"]) == pytest.approx(fraction, abs=1e-6)
        assert float(row["capacity"]) == run["capacity"][row["expert"]]
        assert row["source"].endswith(f"{row['case']}.png")


def test_predict_legend_real_ids(run, split_output):
    legend = json.loads((split_output / "deferral_legend.json").read_text())
    owners = [entry["owner"] for entry in legend["indices"]]
    assert owners == ["model", *(e.id for e in run["spec"].experts)]
    assert [entry["index"] for entry in legend["indices"]] == list(range(len(owners)))


def test_predict_new_images(run, tmp_path):
    rng = np.random.default_rng(0)
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    pixels = rng.integers(0, 256, size=(40, 24), dtype=np.uint8)
    Image.fromarray(pixels).save(new_dir / "scan-a.png")
    out = tmp_path / "out"

    code = main(
        ["predict", "--run", str(run["run_dir"]), "--site", str(run["site_dir"]), "--images", str(new_dir / "*.png"),
         "--out", str(out)]
    )

    assert code == 0
    # Normalized over the whole image, because a new image has no ROI file.
    values = pixels.astype(np.float64)
    image = ((values - values.mean()) / values.std())[None].astype(np.float32)
    expected = expected_model_mask(run["models"][CHOSEN_ROUND], image, run["settings"])
    written = np.asarray(Image.open(out / "scan-a_model.png")) == 255
    np.testing.assert_array_equal(written, expected)

    indices = read_owner_indices(out / "scan-a_deferral.png")
    assert indices.shape == (40, 24)
    rows = read_review(out)
    assert {r["case"] for r in rows} == {"scan-a"}
    for k, expert in enumerate(run["spec"].experts):
        count = int((indices == k + 1).sum())
        assert count == math.floor(run["capacity"][expert.id] * indices.size)
        assert [int(r["pixels"]) for r in rows if r["expert"] == expert.id] == [count]


def test_predict_round_option(run):
    predictor = load_site_predictor(run["run_dir"], run["site_dir"], round_number=1, device=torch.device("cpu"))
    case = load_split(run["spec"], "test")[0]

    got = predict(predictor.model, case.image, run["settings"].train, torch.device("cpu")).prob
    expected = predict(run["models"][1], case.image, run["settings"].train, torch.device("cpu")).prob

    assert predictor.round == 1
    assert predictor.heads_path.name == "round-0001.safetensors"
    torch.testing.assert_close(got, expected)


def test_predict_missing_heads(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="--state-dir"):
        load_site_predictor(run["run_dir"], run["site_dir"], state_dir=tmp_path / "empty")


def test_predict_expert_mismatch(run, tmp_path):
    state_dir = tmp_path / "state"
    fewer = build_network(run["settings"], len(run["spec"].experts) - 1, seed=0)
    save_weights(state_dir / RUN_NAME / "heads" / f"round-{CHOSEN_ROUND:04d}.safetensors", local_state(fewer))

    with pytest.raises(ValueError, match="routes to 2 experts, but the site now declares 3"):
        load_site_predictor(run["run_dir"], run["site_dir"], state_dir=state_dir)


def test_predict_missing_round(run):
    with pytest.raises(FileNotFoundError, match="round-0007"):
        load_site_predictor(run["run_dir"], run["site_dir"], round_number=7)


def test_predict_missing_settings(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="settings.json"):
        load_site_predictor(tmp_path, run["site_dir"])


def test_predict_wrong_channels(run, tmp_path):
    path = tmp_path / "colour.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path)

    with pytest.raises(ValueError, match="colour.png: image has 3 channel"):
        read_new_images(str(tmp_path / "*.png"), in_channels=1, slice_axis=2)


def test_predict_unreadable_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")

    with pytest.raises(ValueError, match="broken.png"):
        read_new_images(str(tmp_path / "*.png"), in_channels=1, slice_axis=2)


def test_predict_no_match(tmp_path):
    with pytest.raises(ValueError, match="matches no image"):
        read_new_images(str(tmp_path / "*.png"), in_channels=1, slice_axis=2)


def test_predict_cli_error(run, tmp_path, capsys):
    code = main(
        ["predict", "--run", str(run["run_dir"]), "--site", str(run["site_dir"]), "--state-dir", str(tmp_path),
         "--out", str(tmp_path / "out")]
    )

    assert code == 2
    assert "--state-dir" in capsys.readouterr().err
