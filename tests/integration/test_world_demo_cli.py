"""The world demo's command line (one short epoch on the cached world model): what it writes.

held_out.json holds per-image rewards on UNSEEN captions in one order (prompts, seeds, before,
after; every image its own seed), its summary is the paired statistics of those lists over
n = images independent units (recomputed here) and says so, train_prompts.txt
lists the training captions (none of them unseen), and a run on another reward than
world-alignment carries the alignment of the same images as a guard against reward hacking.
"""
import json
import math

from comfyui_prdp import cli
from comfyui_prdp.world.grammar import held_out_prompts, train_prompts


def paired(before, after):
    diff = [a - b for a, b in zip(after, before)]
    n = len(diff)
    mean = sum(diff) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1))
    mean_before = sum(before) / n
    spread = math.sqrt(sum((b - mean_before) ** 2 for b in before) / (n - 1))
    return mean / (sd / math.sqrt(n)), mean / spread


def test_world_demo_writes_unseen_per_image_rewards_and_the_alignment_guard(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--out", str(out), "--base", "embedded-world", "--reward", "world-preference",
                     "--preset", "world-demo", "--epochs", "1", "--prompts-per-epoch", "2", "--device", "cpu"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads((out / "held_out.json").read_text())
    rows = len(record["prompts"])
    assert rows >= 32 and len(set(record["prompts"])) >= 8
    assert rows == len(record["seeds"]) == len(record["rewards_before"]) == len(record["rewards_after"])
    assert len(set(record["seeds"])) == rows          # no two images share their initial noise
    unseen, trained = set(held_out_prompts()), (out / "train_prompts.txt").read_text().splitlines()
    assert set(record["prompts"]) <= unseen and not unseen & set(trained) and set(trained) <= set(train_prompts())
    values = record["rewards_before"] + record["rewards_after"]
    assert all(math.isfinite(v) for v in values)
    t, gain = paired(record["rewards_before"], record["rewards_after"])
    summary = record["summary"]
    assert math.isclose(summary["paired_t"], t, rel_tol=1e-9) and math.isclose(summary["gain_in_std"], gain, rel_tol=1e-9)
    assert summary["n"] == rows and summary["unit"] == "seed" and summary["degrees_of_freedom"] == rows - 1
    guard = record["alignment_guard"]
    assert guard["images"] == rows and -1 <= guard["mean_before"] <= 1 and math.isfinite(guard["paired_t"])
    # the last lines: the alignment guard, then the paired change on the unseen captions
    assert lines[-1].startswith(f"paired t = {summary['paired_t']:.2f} over n = {rows} images, each with its own "
                                f"seed ({rows - 1} df), gain = {summary['gain_in_std']:.2f} std")
    assert lines[-2].startswith("unseen prompts (")
    assert lines[-3].startswith("world-alignment of the same images")
    assert (out / "before_after.png").stat().st_size > 0
