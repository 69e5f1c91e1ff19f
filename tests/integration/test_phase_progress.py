"""The long phases outside the epochs report progress (progress.py): pretraining the embedded
models, loading the model and the reward, the held-out evaluation before training (CLI lines on
stderr) and during training (phase events: the CLI bar and a node's dashboard phase text). The
pretrainings run a few steps here; every step sends a line (EVERY_SECONDS = 0)."""
from comfyui_prdp import cli, progress
from comfyui_prdp.models import embedded_pretrain
from comfyui_prdp.models.embedded import UNET_CONFIG, build_embedded_pipeline
from comfyui_prdp.service.jobs import Job
from comfyui_prdp.progress import PhaseProgress, phase_listener
from test_cli_outdir import run_cli, toy  # noqa: F401  (fixture)
from test_heldout_eval import eval_config, trainer_with_held_out


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_phase_reports_its_fraction_and_an_estimate_at_most_every_few_seconds():
    lines, clock = [], FakeClock()
    phase = PhaseProgress("pretraining", 400, every=5.0, clock=clock, listener=lines.append)
    for step in range(1, 401):
        clock.now += 0.125                     # 50 s in all
        phase.update(step)
    phase.finish()
    assert lines[0] == "pretraining: 0/400 steps" and lines[-1] == "pretraining: done in 50 s"
    assert len(lines) == 2 + 9                 # one line per 5 s in between
    assert lines[1] == "pretraining: 10 % (40/400 steps), about 45 s left"


def test_texture_pretraining_reports_progress(monkeypatch):
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
    components = build_embedded_pipeline(0, pretrained=False)
    lines = []
    with phase_listener(lines.append):
        embedded_pretrain.pretrain_unet(components["unet"], components["text_encoder"], components["tokenizer"],
                                        components["scheduler"].alphas_cumprod, (4, 8, 8), 0, steps=3)
    phase = "pretraining the embedded model (once, then cached)"
    assert lines[0] == f"{phase}: 0/3 steps" and lines[-1].startswith(f"{phase}: done in ")
    assert [line.split("(")[-1].split(" ")[0] for line in lines[1:-1]] == ["1/3", "2/3"]
    assert "left" in lines[1]


def test_world_pretraining_reports_progress(monkeypatch):
    import random

    from comfyui_prdp.world import pretrain
    from comfyui_prdp.world.grammar import split_scenes
    from comfyui_prdp.world.model import build_world_pipeline

    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
    monkeypatch.setattr(pretrain, "POOL_SIZE", 16)
    parts = build_world_pipeline(0, pretrained=False)
    lines = []
    with phase_listener(lines.append):
        pretrain.pretrain_unet(parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["vae"],
                               parts["scheduler"].alphas_cumprod, split_scenes()[0], random.Random(0), steps=2)
    assert lines[0].endswith(": 0/2 steps") and "1/2 steps" in lines[1] and "done in" in lines[-1]


def test_cli_reports_loading_and_the_held_out_evaluation_before_training(tmp_path, toy, capsys):  # noqa: F811
    assert run_cli(tmp_path / "run", evaluate=True) == 0
    err = capsys.readouterr().err.splitlines()
    images = len(cli.HELD_OUT_PROMPTS) * cli.HELD_OUT_IMAGES_PER_PROMPT
    before = [line for line in err if line.startswith(f"held-out evaluation before training ({images} images)")]
    steps = 3 * -(-images // 16)                  # --steps 3, batches of cpu-smoke's 16 images
    assert before[0].endswith(f": 0/{steps} denoising steps") and "done in" in before[-1]
    assert any(line.startswith("loading the model") and "done in" in line for line in err)
    assert any(line.startswith("loading the reward") and "done in" in line for line in err)


def test_the_held_out_evaluation_during_training_is_the_dashboards_phase(monkeypatch):
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
    job, phases = Job(name="run"), []

    def record(event):
        job.record(event)
        if event["type"] == "phase" and event["phase"].startswith("held-out evaluation ("):
            phases.append(job.snapshot(with_metrics=False)["phase"])    # what the dashboard shows
    trainer, held = trainer_with_held_out(eval_config(epochs=1))
    trainer.callback = record
    trainer.run()
    steps = trainer.config.steps
    assert phases[0] == f"held-out evaluation ({held.pairs} images): 0/{steps} denoising steps"
    assert phases[-1].startswith(f"held-out evaluation ({held.pairs} images): done in ")


def test_texture_cache_key_names_the_thread_count(monkeypatch):
    key = embedded_pretrain.cache_key(UNET_CONFIG, 0, 3)
    monkeypatch.setattr(embedded_pretrain, "PRETRAIN_THREADS", embedded_pretrain.PRETRAIN_THREADS + 1)
    assert embedded_pretrain.cache_key(UNET_CONFIG, 0, 3) != key


def test_texture_pretraining_is_deterministic_under_any_thread_count(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("PRDP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(embedded_pretrain.load_or_pretrain, "__defaults__", (3,))   # 3 steps, own cache key
    first = {k: v.clone() for k, v in build_embedded_pipeline(0)["unet"].state_dict().items()}
    files = list(tmp_path.glob("embedded-unet-*.safetensors"))
    assert len(files) == 1
    files[0].write_bytes(b"not a safetensors file")          # rebuilt, never trusted
    ambient = torch.get_num_threads()
    other = 1 if ambient != 1 else 3
    torch.set_num_threads(other)     # another OMP_NUM_THREADS: the same weights
    try:
        rebuilt = build_embedded_pipeline(0)["unet"].state_dict()
        assert torch.get_num_threads() == other    # restored after pretraining
    finally:
        torch.set_num_threads(ambient)
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)


def test_world_alignment_scorer_training_reports_progress(monkeypatch):
    from comfyui_prdp.world import alignment

    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
    monkeypatch.setattr(alignment, "POOL_SIZE", 16)
    lines = []
    with phase_listener(lines.append):
        alignment.train_alignment(alignment.AlignmentModel(), 0, steps=2)
    assert lines[0].endswith(": 0/2 steps") and "1/2 steps" in lines[1] and "done in" in lines[-1]
