"""The reward curve's x axis names several epochs, not only the first and the last."""
import pytest

from comfyui_prdp.runs.plots import epoch_ticks, reward_curve


@pytest.mark.parametrize("first,last,expected", [
    (1, 1, [1]), (1, 2, [1, 2]), (1, 40, [1, 10, 20, 30, 40]), (1, 1000, [1, 200, 400, 600, 800, 1000])])
def test_epoch_ticks(first, last, expected):
    assert epoch_ticks(first, last) == expected


def test_curve_draws_tick_labels_between_the_ends():
    metrics = [{"epoch": e, "reward_mean": 0.01 * e, "reward_std": 0.01} for e in range(1, 41)]
    image = reward_curve(metrics).convert("L")
    width, height = image.size
    strip = image.crop((width // 4, height - 40, 3 * width // 4, height - 20))   # the tick labels' row
    assert strip.getextrema()[0] < 128, "no tick label drawn inside the axis"
