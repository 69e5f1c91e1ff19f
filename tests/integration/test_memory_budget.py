"""benchmarks/memory_budget.py: the byte counter against bytes counted by hand, flatness of the
update peak in the number of steps T (trajectories live on the CPU), and the table / exit code."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("memory_budget", ROOT / "benchmarks" / "memory_budget.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_budget"] = module
    spec.loader.exec_module(module)
    return module


mb = _load()

TINY = dict(
    SD15_UNET=dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, attention_head_dim=8,
                   layers_per_block=1, norm_num_groups=8, in_channels=4, out_channels=4, sample_size=8),
    VAE_SD=dict(block_out_channels=[8, 8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                scaling_factor=0.18215),
    CLIP_L=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                max_position_embeddings=77, vocab_size=1000, projection_dim=32),
    CLIP_H=dict(text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                                 max_position_embeddings=77, vocab_size=1000),
                vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                                   image_size=224, patch_size=32),
                projection_dim=16),
)


def small_epoch(steps):
    """consumer-gpu with fewer trajectories (a faster test; the flatness in T is the same)."""
    return mb.prdp_config.preset("consumer-gpu", steps=steps, prompts_per_epoch=2, images_per_prompt=2,
                                 sample_batch_size=2, train_batch_size=2)


@pytest.fixture
def tiny(monkeypatch):
    """The script's real SD1.5 / reward configs replaced by tiny ones (same code path)."""
    for name, value in TINY.items():
        monkeypatch.setattr(mb, name, value)


def test_counter_matches_bytes_counted_by_hand():
    meter = mb.LiveBytes()
    f32 = 4
    with mb.fake_gpu(meter) as fake_mode:
        with fake_mode, torch.device(mb.GPU):
            first = torch.nn.Linear(256, 512, bias=False)
            second = torch.nn.Linear(512, 128, bias=False)
        weights = (256 * 512 + 512 * 128) * f32
        assert meter.live["gpu"] == weights
        meter.phase("forward")
        with fake_mode:
            x = torch.randn(64, 256, device=mb.GPU)
        hidden = first(x)
        y = second(hidden.relu())
        # x, hidden, relu(hidden) (kept for the second layer's weight gradient), y
        live = weights + (64 * 256 + 2 * 64 * 512 + 64 * 128) * f32
        assert meter.live["gpu"] == live
        assert meter.gpu(meter.phase_peaks["forward"]) == live
        del hidden, y                 # the graph goes: only the weights and x stay
        assert meter.live["gpu"] == weights + 64 * 256 * f32
        y = second(first(x).relu()).sum()
        y.backward()                  # gradients of both weights, same size as the weights
        del y
        assert meter.live["gpu"] == 2 * weights + 64 * 256 * f32
        assert meter.peak["gpu"] >= live
        half = x.to(torch.float16).cpu()     # a copy on the host is counted there, not on the GPU
        assert meter.live["cpu"] == 64 * 256 * 2
        del half
        assert meter.live["cpu"] == 0


def test_fused_attention_keeps_no_score_matrix():
    meter = mb.LiveBytes()
    with mb.fake_gpu(meter):
        q = torch.randn(2, 8, 4096, 64, device=mb.GPU, dtype=torch.float16)
        meter.phase("attention")
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    extra = meter.gpu(meter.phase_peaks["attention"]) - q.numel() * 2
    scores = 2 * 8 * 4096 * 4096 * 2
    assert out.shape == q.shape
    assert extra < scores / 10       # flash attention: output + log-sum-exp, not [S, S] scores


def test_update_peak_is_flat_in_steps(tiny):
    case = mb.CASES[0]
    at_2 = mb.measure(case, small_epoch(2))
    at_5 = mb.measure(case, small_epoch(5))
    assert at_2.phases["update"] == at_5.phases["update"]
    # sampling: the schedule's few values per step may sit on the GPU, nothing of trajectory size
    assert abs(at_2.phases["sampling"] - at_5.phases["sampling"]) * mb.GB < 4096
    assert at_2.phases["update"] > 0


def test_trajectories_on_the_gpu_would_not_be_flat(tiny, monkeypatch):
    """The check above can fail: trajectories left on the GPU grow the update peak with T."""
    keep = []
    original = mb.join_trajectories

    def join_on_gpu(chunks):
        joined = original(chunks)
        keep.append(joined.latents.to(mb.GPU))
        return joined
    monkeypatch.setattr(mb, "join_trajectories", join_on_gpu)
    case = mb.CASES[0]
    assert mb.measure(case, small_epoch(2)).phases["update"] < \
        mb.measure(case, small_epoch(5)).phases["update"]


def test_table_round_trip_and_exit_code(tiny, capsys):
    assert mb.main(["--only", "consumer-gpu", "--steps", "2"]) == 0
    rows = mb.parse_table(capsys.readouterr().out)
    assert [(r["preset"], r["host"], r["family"]) for r in rows] == [("consumer-gpu", "CLI", "SD1.5")]
    assert not rows[0]["over"] and rows[0]["budget"] == 8.0
    assert rows[0]["peak"] == max(rows[0]["phases"].values())
    assert mb.main(["--only", "consumer-gpu", "--steps", "2", "--budget", "consumer-gpu=0.01"]) == 1
    rows = mb.parse_table(capsys.readouterr().out)
    assert rows[0]["over"] and rows[0]["budget"] == 0.01
    assert mb.exit_code([dict(rows[0], over=False)]) == 1     # the total over the budget alone fails


def test_bad_budget_is_one_line_error():
    with pytest.raises(SystemExit, match="PRESET=GB"):
        mb.main(["--budget", "consumer-gpu"])
