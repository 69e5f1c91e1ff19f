"""benchmarks/stability.py --quick (issue 12 section 3): it must write a results.json with one
row per algorithm x prompt-set size, every number finite, the same compute for every algorithm,
unseen prompts that no run trained on, and a PNG. About a minute on two cores."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from comfyui_prdp.world.grammar import held_out_prompts, train_prompts

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_RUNS = {(algorithm, size) for algorithm in ("prdp", "ddpo", "prdp-noclip") for size in ("small", "large")}
ROW_NUMBERS = ("unseen_reward_before", "unseen_reward_after", "unseen_gain", "unseen_paired_t")
COLLAPSE = ("seed_diversity", "distance_from_base", "retrieval_accuracy", "roughness")


def numbers_in(value, where="results"):
    """(path, number) of every number in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numbers_in(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers_in(item, f"{where}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, value


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability") / "run"
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stability.py"), "--quick", "--out", str(out)],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_quick_mode_writes_one_row_per_algorithm_and_prompt_set(quick_results):
    _, results = quick_results
    runs = [(row["algorithm"], row["prompt_set"]) for row in results["rows"]]
    assert sorted(runs) == sorted(EXPECTED_RUNS), runs           # none missing, none twice
    assert results["complete"] is True
    sizes = {row["prompt_set"]: row["prompt_set_size"] for row in results["rows"]}
    assert sizes == {"small": 4, "large": len(train_prompts())}
    assert all(isinstance(row["seed"], int) for row in results["rows"])


def test_every_number_is_finite_and_each_row_has_its_measures(quick_results):
    _, results = quick_results
    numbers = list(numbers_in(results))
    bad = [(where, value) for where, value in numbers if not math.isfinite(value)]
    assert not bad, bad
    for row in results["rows"]:
        for name in ROW_NUMBERS:
            assert isinstance(row[name], float), (row["algorithm"], name)
        for name in COLLAPSE:
            assert isinstance(row["collapse_after"][name], float) and isinstance(row["collapse_before"][name], float)
        assert 0 <= row["collapse_after"]["retrieval_accuracy"] <= 1
        assert row["unseen_gain"] == pytest.approx(row["unseen_reward_after"] - row["unseen_reward_before"], abs=1e-9)
        # the curve: the base model at epoch 0, then every evaluated epoch up to the last
        epochs = [point["epoch"] for point in row["curve"]]
        assert epochs[0] == 0 and epochs == sorted(set(epochs)) and epochs[-1] == row["epochs_done"]
        assert row["curve"][0]["unseen_reward"] == pytest.approx(row["unseen_reward_before"])
        assert row["curve"][-1]["unseen_reward"] == pytest.approx(row["unseen_reward_after"])
        assert len(row["training"]) == row["epochs_done"] == results["settings"]["epochs"]


def test_runs_have_equal_compute_and_only_unseen_prompts_are_evaluated(quick_results):
    _, results = quick_results
    settings = results["settings"]
    per_epoch = settings["prompts_per_epoch"] * settings["images_per_prompt"]
    for row in results["rows"]:
        assert row["sampled_images"] == settings["epochs"] * per_epoch
        assert row["unet_evaluation_budget"] == results["rows"][0]["unet_evaluation_budget"]
        assert 0 < row["unet_evaluations"] <= row["unet_evaluation_budget"]
    clip = settings["clip_range_by_algorithm"]
    assert clip["prdp"] == clip["ddpo"] and clip["prdp-noclip"] >= 1e3 * clip["prdp"]
    for row in results["rows"]:     # the "no clip" runs' clip never binds
        if row["algorithm"] == "prdp-noclip":
            assert all(epoch["clip_frac"] == 0 for epoch in row["training"]), row["training"]
    unseen = results["unseen"]["prompts"]
    assert unseen and set(unseen) <= set(held_out_prompts()) and not set(unseen) & set(train_prompts())


def test_the_figure_is_written(quick_results):
    out, results = quick_results
    with Image.open(out / "stability.png") as image:
        width, height = image.size
    assert width >= 600 and height >= 300 + 40 * (len(results["rows"]) + 1)


def test_clip_range_and_beta_reach_prdp_and_ddpo_but_not_the_no_clip_ablation():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import stability

    args = stability.parse_args(["--clip-range", "1e-4", "--beta", "0.003"])
    chosen = stability.settings(args)
    configs = {a: stability.train_config(chosen, args, a, 0) for a in ("prdp", "ddpo", "prdp-noclip")}
    assert configs["prdp"].clip_range == configs["ddpo"].clip_range == 1e-4
    assert configs["prdp"].beta == 0.003
    assert configs["prdp-noclip"].clip_range == 1e6 and configs["prdp-noclip"].beta == 0.003
