"""Distributed training (torch.distributed, gloo, 2 CPU processes) against one process.

Two ranks run toy-backend jobs (tests/support/dist_worker.py) with a prompt count that does not divide
by the ranks, minibatches that split unevenly across them, sampling chunks that cut through
prompt groups and subsampled steps, so every sharding and all-reduce path is used. The
reference is the plain single-process Trainer in this process.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import dist_worker
from comfyui_prdp.runs.checkpoints import read_checkpoint
from comfyui_prdp.distributed.group import SINGLE, Distributed, DistributedError, collective_timeout, rank_device
from comfyui_prdp.runs.stop_signals import check_stop_file, stop_requests
from comfyui_prdp.trainer import Trainer
from comfyui_prdp.training.batches import trajectory_generators
from toy_backend import BrightnessReward, ToyBackend

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    "prdp": dict(timestep_fraction=0.75),
    "ddpo": dict(algorithm="ddpo", prompts_per_epoch=4, minibatch_prompts=3, clip_range=0.02,
                 ddpo_buffer_size=8, ddpo_min_count=8),   # epoch 2: prompts seen before use their own stats
}


def jobs(root: Path) -> list:
    listed = [dict(name=name, config=config) for name, config in CASES.items()]
    listed += [
        # SGD's step is lr x the summed gradient: a gradient scaled wrongly after the all-reduce
        # (halved, or not summed) moves the LoRA elsewhere, where AdamW's normalised step hides it
        dict(name="prdp_sgd", config=dict(timestep_fraction=0.75, grad_clip=1e6, learning_rate=0.5),
             optimizer="sgd"),
        dict(name="part", config=dict(checkpoint_every=1), until_epoch=1),
        dict(name="resumed", config={}, resume=str(root / "part" / "out" / "checkpoints" / "epoch_00001")),
        # rank 1 asks to stop in the middle of a minibatch (after its first micro-batch)
        dict(name="stop_update", config=dict(epochs=3), stop=dict(rank=1, epoch=2, phase="update", event="step")),
        # rank 0 asks as sampling starts
        dict(name="stop_sampling", config=dict(epochs=3), stop=dict(rank=0, epoch=2, phase="sampling",
                                                                    event="phase")),
    ]
    for job in listed:
        job.update(out=str(root / job["name"] / "out"), report=str(root / job["name"]))
    # a resume where best/ is ahead of the checkpoint (made by held_out_run_ahead_of_its_checkpoint)
    listed.append(dict(name="held_out_resume", config=HELD_OUT, out=str(root / "held_out_resume" / "out"),
                       report=str(root / "held_out_resume"),
                       resume=str(root / "held_out_resume" / "out" / "checkpoints" / "epoch_00001")))
    return listed


HELD_OUT = dict(eval_every=1, eval_prompts=1, eval_seeds=1, early_stop_patience=2, epochs=4)


def held_out_run_ahead_of_its_checkpoint(out: Path) -> None:
    """A run folder whose epoch-1 checkpoint holds 1 divergence strike against a best of 1e6,
    while best/best.json records a later best (epoch 2, 2e6): on resume the rank that reads
    best/ resets the strikes; any later evaluation diverges (below the best, training above)."""
    made = dist_worker.run_job(dict(config=dict(HELD_OUT, epochs=1), out=str(out)), SINGLE)["trainer"]
    record = {"epoch": 1, "eval": 1e6, "train": -1e6}
    made.held_out.load_state_dict({"evaluations": [record], "best": record, "strikes": 1, "stopped_early": False})
    made.save_checkpoint()
    best = json.loads((out / "best" / "best.json").read_text())
    best.update({"epoch": 2, "eval/reward_mean": 2e6, "train_reward_mean": -1e6})
    (out / "best" / "best.json").write_text(json.dumps(best))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every job run once by 2 gloo ranks; returns the folder of their reports."""
    root = tmp_path_factory.mktemp("two_ranks")
    held_out_run_ahead_of_its_checkpoint(root / "held_out_resume" / "out")
    shutil.copytree(root / "held_out_resume" / "out", root / "held_out_resume_single")   # for one process
    (root / "jobs.json").write_text(json.dumps(jobs(root)))
    mp.spawn(dist_worker.main, args=(2, str(root / "process_group"), str(root / "jobs.json")), nprocs=2,
             join=True)
    return root


def single_process(job_name: str, root: Path, tmp_path: Path):
    """The job of `job_name` in this one process (outputs under tmp_path)."""
    job = next(j for j in jobs(root) if j["name"] == job_name)
    job = dict(job, out=str(tmp_path / job_name))
    return dist_worker.run_job(job, SINGLE)


def rank_outcome(root: Path, name: str, rank: int):
    folder = root / name
    return (load_file(str(folder / f"lora_rank{rank}.safetensors")),
            json.loads((folder / f"outcome_rank{rank}.json").read_text()))


def assert_same_lora(got: dict, expected: dict, moved_from: dict = None) -> None:
    """Equal to float tolerance: the ranks sum float32 gradients in another order, and Adam's
    normalised steps carry that rounding (~1e-6 after a few steps of lr 0.02)."""
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-4, atol=1e-5), (
            key, (got[key] - expected[key]).abs().max().item())
    if moved_from is not None:     # training changed the LoRA: the agreement says something
        change = max((expected[k] - moved_from[k]).abs().max().item() for k in expected)
        assert change > 1e-3, change


@pytest.mark.parametrize("name", [*CASES, "prdp_sgd"])
def test_two_ranks_train_the_lora_one_process_trains(two_ranks, tmp_path, name):
    reference = single_process(name, two_ranks, tmp_path)
    expected = reference["trainer"].backend.lora_state_dict()
    lora0, outcome0 = rank_outcome(two_ranks, name, 0)
    lora1, outcome1 = rank_outcome(two_ranks, name, 1)
    for key in lora0:       # the ranks hold the same weights, bit for bit
        assert torch.equal(lora0[key], lora1[key]), key
    assert_same_lora(lora0, expected, moved_from=ToyBackend().lora_state_dict())
    # rewards, KL and loss are gathered: rank 0's metrics are the single process's
    for got, want in zip(outcome0["metrics"], reference["result"].metrics):
        for metric in ("reward_mean", "reward_std", "kl", "log_ratio_mean", "loss", "clip_frac", "grad_norm",
                       "optimizer_steps"):
            assert got[metric] == pytest.approx(want[metric], rel=1e-4, abs=1e-6), metric
        # the on-policy re-evaluation's rounding (another batch layout on each side: 4e-9 and 1.1e-6
        # measured on one CPU), not a quantity the ranks must reproduce
        assert got["onpolicy_max_diff"] < 1e-4 and want["onpolicy_max_diff"] < 1e-4
    for mine, theirs in zip(outcome0["metrics"], outcome1["metrics"]):    # every rank logs the same
        assert {k: v for k, v in mine.items() if not k.startswith("seconds_")} == \
            {k: v for k, v in theirs.items() if not k.startswith("seconds_")}


def test_rank_zero_alone_writes_files(two_ranks):
    _, outcome0 = rank_outcome(two_ranks, "prdp", 0)
    _, outcome1 = rank_outcome(two_ranks, "prdp", 1)
    out = two_ranks / "prdp" / "out"
    assert outcome0["lora"] == str(out / "lora.safetensors") and outcome1["lora"] is None
    assert sorted(p.name for p in out.iterdir()) == ["lora.safetensors", "metrics.jsonl"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]     # once, not once per rank


def test_resume_from_a_two_rank_checkpoint_in_one_and_in_two_processes(two_ranks, tmp_path):
    checkpoint = two_ranks / "part" / "out" / "checkpoints" / "epoch_00001"
    assert checkpoint.is_dir()
    resumed_two_ranks, _ = rank_outcome(two_ranks, "resumed", 0)
    reference = dist_worker.run_job(dict(config={}, out=str(tmp_path / "full")), SINGLE)   # uninterrupted
    expected = reference["trainer"].backend.lora_state_dict()
    one_process = dist_worker.run_job(dict(config={}, out=str(tmp_path / "one"), resume=str(checkpoint)), SINGLE)
    assert one_process["result"].epochs_done == 2
    assert_same_lora(one_process["trainer"].backend.lora_state_dict(), expected, ToyBackend().lora_state_dict())
    assert_same_lora(resumed_two_ranks, expected)


def test_after_a_resume_every_rank_holds_rank_zeros_held_out_state_and_stops_as_one_process(two_ranks):
    """Rank 0 alone sees best/ (ahead of the checkpoint): its held-out state and early-stop
    decision are every rank's, so 2 ranks stop where one process does (not where rank 1's
    stale strikes would, one epoch earlier)."""
    single_out = two_ranks / "held_out_resume_single"
    single = dist_worker.run_job(dict(config=HELD_OUT, out=str(single_out),
                                      resume=str(single_out / "checkpoints" / "epoch_00001")), SINGLE)["result"]
    assert single.early_stopped and single.epochs_done == 3      # strikes 0 -> 1 (epoch 2) -> 2 (epoch 3)
    _, outcome0 = rank_outcome(two_ranks, "held_out_resume", 0)
    _, outcome1 = rank_outcome(two_ranks, "held_out_resume", 1)
    for outcome in (outcome0, outcome1):
        assert outcome["early_stopped"] and outcome["epochs_done"] == single.epochs_done, outcome["epochs_done"]
    assert outcome0["held_out"]["best"] == outcome1["held_out"]["best"] == {"epoch": 2, "eval": 2e6, "train": -1e6}
    assert outcome0["held_out"]["strikes"] == outcome1["held_out"]["strikes"] == 2


@pytest.mark.parametrize("name", ["stop_update", "stop_sampling"])
def test_a_stop_on_one_rank_stops_both_at_the_same_step_with_one_checkpoint(two_ranks, tmp_path, name):
    lora0, outcome0 = rank_outcome(two_ranks, name, 0)
    lora1, outcome1 = rank_outcome(two_ranks, name, 1)
    assert outcome0["stopped"] and outcome1["stopped"]
    assert outcome0["epochs_done"] == outcome1["epochs_done"] == 1
    for key in lora0:
        assert torch.equal(lora0[key], lora1[key]), key
    out = two_ranks / name / "out"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_00001_stopped"]
    assert outcome1["checkpoint"] is None and outcome0["checkpoint"] == str(out / "checkpoints" / "epoch_00001_stopped")
    # the checkpoint holds the state at the start of the stopped epoch, as one process's does
    reference = single_process(name, two_ranks, tmp_path)
    assert reference["result"].stopped and reference["result"].epochs_done == 1
    stopped = Path("checkpoints") / "epoch_00001_stopped" / "lora.safetensors"
    assert_same_lora(load_file(str(out / stopped)), load_file(str(tmp_path / name / stopped)))
    if name == "stop_sampling":   # asked for at the same moment: no optimizer step of epoch 2 anywhere
        assert_same_lora(lora0, reference["trainer"].backend.lora_state_dict())
    resumed = dist_worker.run_job(dict(config=dict(epochs=2), out=str(tmp_path / "resume"),
                                       resume=str(out / "checkpoints" / "epoch_00001_stopped")), SINGLE)
    assert resumed["result"].epochs_done == 2 and not resumed["result"].stopped


REWARD_GONE = "the reward server at http://127.0.0.1:9 is gone (simulated)"
OUT_OF_MEMORY = "CUDA out of memory on this GPU (simulated)"
DISK_FULL = "No space left on device (simulated)"
FAILURES = {   # job -> (failing rank, its message, where the error says it was, epochs in the checkpoint)
    "fail_reward": (1, REWARD_GONE, "epoch 2 reward", 1),
    "fail_update": (0, OUT_OF_MEMORY, "epoch 2 update", 1),
    "fail_sampling": (1, OUT_OF_MEMORY, "epoch 2 sampling", 1),
    # after the last collective of the run: epoch 2 finished on every rank, so it is kept
    "fail_last_metrics": (0, DISK_FULL, "epoch 2 metrics", 2),
}
FAILURE_TIMEOUT_S = 300


def failure_jobs(root: Path) -> list:
    listed = [dict(name=name, config=dict(checkpoint_every=0),
                   fail=dict(rank=rank, epoch=2, message=message, **(
                       dict(event="epoch") if where.endswith("metrics") else dict(phase=where.split()[-1]))))
              for name, (rank, message, where, _) in FAILURES.items()]
    # the fault removed: 2 ranks continue from the checkpoint that the reward failure left
    listed.append(dict(name="resumed_after_failure", config={},
                       resume=str(root / "fail_reward" / "out" / "checkpoints" / "epoch_00001_stopped")))
    # rank 1 is given a resume folder that does not exist (last: before the fix it raised alone)
    listed.append(dict(name="fail_resume", config={},
                       resume=str(root / "fail_reward" / "out" / "checkpoints" / "epoch_00001_stopped"),
                       resume_on={"1": str(root / "no_such_checkpoint")}))
    for job in listed:
        job.update(out=str(root / job["name"] / "out"), report=str(root / job["name"]))
    return listed


@pytest.fixture(scope="module")
def failing_ranks(tmp_path_factory):
    """The failure jobs run by 2 gloo ranks; (report folder, exit codes). Each process must end
    by itself within FAILURE_TIMEOUT_S: one that hangs in a collective is killed and reported."""
    root = tmp_path_factory.mktemp("failing_ranks")
    (root / "jobs.json").write_text(json.dumps(failure_jobs(root)))
    context = mp.start_processes(dist_worker.main, args=(2, str(root / "process_group"), str(root / "jobs.json")),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + FAILURE_TIMEOUT_S
    codes = []
    for process in context.processes:
        process.join(max(1.0, deadline - time.monotonic()))
        hung = process.is_alive()
        if hung:
            process.kill()
            process.join()
        codes.append("hung" if hung else process.exitcode)
    return root, codes


def test_an_error_on_one_rank_ends_every_rank_with_the_error_and_nonzero_exits(failing_ranks):
    root, codes = failing_ranks
    assert codes[0] != "hung" and codes[1] != "hung", codes          # nobody waits in a collective
    assert codes[0] != 0 and codes[1] != 0, codes                    # and both report the failure
    for name, (rank, message, where, _) in FAILURES.items():
        for reporter in (0, 1):
            error = json.loads((root / name / f"error_rank{reporter}.json").read_text())
            assert error["type"] == "RankFailed" and error["failed_ranks"] == [rank], (name, error)
            assert f"rank {rank}: RuntimeError in {where}: {message}" in error["text"], (name, error["text"])
        assert not (root / name / "outcome_rank0.json").exists()     # no rank finished the run


@pytest.mark.parametrize("name", list(FAILURES))
def test_after_an_error_on_one_rank_rank_zero_keeps_the_state_before_the_failed_epoch(failing_ranks, tmp_path,
                                                                                          name):
    root, _ = failing_ranks
    kept = FAILURES[name][-1]
    out = root / name / "out"
    checkpoint = out / "checkpoints" / f"epoch_{kept:05d}_stopped"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [checkpoint.name]
    errors = [json.loads((root / name / f"error_rank{r}.json").read_text()) for r in (0, 1)]
    assert errors[0]["checkpoint"] == str(checkpoint) and errors[1]["checkpoint"] is None
    assert f"checkpoint: {checkpoint}" in errors[0]["text"]
    # the result of `kept` epochs in one process, computed here: no partial update of the failed epoch
    reference = dist_worker.run_job(dict(config={}, until_epoch=kept, out=str(tmp_path / "ref")), SINGLE)
    assert_same_lora(load_file(str(checkpoint / "lora.safetensors")), reference["trainer"].backend.lora_state_dict(),
                     moved_from=ToyBackend().lora_state_dict())
    saved = read_checkpoint(checkpoint)
    assert saved.epoch == kept and [m["epoch"] for m in saved.metrics] == list(range(1, kept + 1))


def test_the_checkpoint_an_error_left_resumes_to_the_uninterrupted_result(failing_ranks, tmp_path):
    root, _ = failing_ranks
    resumed, outcome = rank_outcome(root, "resumed_after_failure", 0)      # 2 ranks, the fault removed
    assert outcome["epochs_done"] == 2 and not outcome["stopped"]
    uninterrupted = dist_worker.run_job(dict(config={}, out=str(tmp_path / "full")), SINGLE)
    assert_same_lora(resumed, uninterrupted["trainer"].backend.lora_state_dict(), ToyBackend().lora_state_dict())


def test_a_resume_error_on_one_rank_ends_every_rank_with_the_error_and_no_checkpoint(failing_ranks):
    root, _ = failing_ranks
    for reporter in (0, 1):
        error = json.loads((root / "fail_resume" / f"error_rank{reporter}.json").read_text())
        assert error["type"] == "RankFailed" and error["failed_ranks"] == [1], error
        assert "rank 1: CheckpointError in resume: " in error["text"] and "no_such_checkpoint" in error["text"], error
        assert error["checkpoint"] is None                  # nothing trained: nothing to keep
    out = root / "fail_resume" / "out"
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()   # rank 0 wrote nothing


def test_error_messages_cross_ranks_as_fixed_size_utf8():
    assert SINGLE.gather_text("é" * 10, 5) == ["éé"]          # cut at a character boundary, not mid-byte
    assert SINGLE.gather_text("short", 100) == ["short"]


def test_groups_are_contiguous_blocks_that_cover_the_epoch():
    for world in (1, 2, 3, 4):
        for n in range(world, 11):
            shards = [Distributed(rank, world).shard(n) for rank in range(world)]
            assert [i for shard in shards for i in shard] == list(range(n))
            sizes = [len(s) for s in shards]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_fewer_prompt_groups_than_ranks_is_refused_before_any_work():
    config = dist_worker.toy_config(prompts_per_epoch=3)
    with pytest.raises(DistributedError, match="prompts_per_epoch=3 is less than the 4 ranks"):
        Trainer(ToyBackend(), BrightnessReward(), dist_worker.PROMPTS, config, distributed=Distributed(0, 4))


def test_a_trajectory_noise_does_not_depend_on_its_batch():
    """Per-trajectory generators: sampling in chunks of 1 or all at once gives the same epoch."""
    batches = []
    for chunk in (1, 12):
        config = dist_worker.toy_config(sample_batch_size=chunk)
        batches.append(Trainer(ToyBackend(), BrightnessReward(), dist_worker.PROMPTS, config).sample_epoch(1))
    assert torch.allclose(batches[0].traj.latents, batches[1].traj.latents, atol=1e-6)
    first = [g.initial_seed() for g in trajectory_generators(3, 1, range(4))]
    assert len(set(first)) == 4 and first == [g.initial_seed() for g in trajectory_generators(3, 1, range(4))]
    assert first != [g.initial_seed() for g in trajectory_generators(3, 2, range(4))]


def test_the_collective_timeout_defaults_to_an_hour_and_is_set_by_an_environment_variable():
    assert collective_timeout({}) == timedelta(minutes=60)
    assert collective_timeout({"PRDP_DIST_TIMEOUT_MINUTES": "90"}) == timedelta(minutes=90)
    assert collective_timeout({"PRDP_DIST_TIMEOUT_MINUTES": " 0.5 "}) == timedelta(seconds=30)
    for bad in ("0", "-5", "nan", "inf", "an hour"):
        with pytest.raises(DistributedError, match="PRDP_DIST_TIMEOUT_MINUTES=.*positive number"):
            collective_timeout({"PRDP_DIST_TIMEOUT_MINUTES": bad})


def test_a_rank_waits_in_a_collective_for_the_timeout_the_environment_gives(tmp_path, monkeypatch):
    """The timeout reaches the process group: rank 0 waits ~3 s (0.05 min) for rank 1 (gloo's
    own default: 30 min, NCCL's 10 min; a big model's rank-0 evaluation takes longer)."""
    monkeypatch.setenv("PRDP_DIST_TIMEOUT_MINUTES", "0.05")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(dist_worker.timeout_main, args=(2, port, str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    for process in context.processes:
        process.join(90)
        if process.is_alive():
            process.kill()
            process.join()
    record = tmp_path / "rank0_wait.json"
    assert record.is_file(), "rank 0 was still waiting after 90 s: the timeout did not reach the process group"
    wait = json.loads(record.read_text())
    assert wait["outcome"] != "returned" and 2.5 <= wait["seconds"] < 30, wait


def test_rank_device():
    assert rank_device("cpu", 1) == "cpu"
    assert rank_device("cuda", 3) == "cuda:3"
    with pytest.raises(DistributedError, match="each rank uses cuda:LOCAL_RANK"):
        rank_device("cuda:1", 0)


def test_sigterm_and_the_stop_file_set_the_stop_event(tmp_path):
    event = threading.Event()
    with stop_requests(event):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert event.is_set()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL    # restored

    event = threading.Event()
    stop_file = tmp_path / "STOP"
    with stop_requests(event, stop_file=stop_file):
        time.sleep(0.1)
        assert not event.is_set()
        stop_file.write_text("")
        for _ in range(50):
            if event.wait(0.1):
                break
    assert event.is_set()
    with pytest.raises(SystemExit, match="exists already"):
        check_stop_file(stop_file)


EMBEDDED_RUN = ["train", "--epochs", "2", "--prompts-per-epoch", "3", "--images-per-prompt", "2", "--steps", "2",
                "--updates-per-epoch", "2", "--minibatch-prompts", "2", "--sample-batch-size", "2",
                "--train-batch-size", "3", "--no-eval", "--seed", "5", "--learning-rate", "1e-3"]
EMBEDDED_ALGORITHMS = {"prdp": [], "ddpo": ["--algorithm", "ddpo"]}
# The floor: two ranks sum the same gradients in another order, as re-batching one process does
# (1 process at sample/train batch 3/2 instead of 2/3 ends 2.3e-5 apart; 2 ranks 2.2e-4, both
# relative to the LoRA's norm, measured). A difference in what the ranks sample (prompts, noise,
# the base model) shows at epoch 1 already and leaves the LoRA ~4e-2 apart (issue 21).
EMBEDDED_RELATIVE = 1e-3


def relative_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over every LoRA factor (Frobenius norm of all tensors together)."""
    apart = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)
    size = sum((a[k].double() ** 2).sum() for k in a)
    return float((apart / size).sqrt())


@pytest.mark.parametrize("algorithm", list(EMBEDDED_ALGORITHMS))
def test_torchrun_two_ranks_on_the_embedded_model_match_one_process(tmp_path, algorithm):
    """The CLI as users start it: torchrun --nproc_per_node=2 -m comfyui_prdp train, gloo on the CPU,
    3 prompts over 2 ranks, one thread per process on both sides (torchrun's default; the thread
    count changes CPU kernels' rounding, and the default reward counts JPEG bytes, which a rounding
    change can move by one). Epoch 1 samples with the untouched LoRA, so its rewards are the single
    process's exactly; the LoRA ends at the floor of summation-order rounding."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = [*EMBEDDED_RUN, *EMBEDDED_ALGORITHMS[algorithm]]
    single = subprocess.run([sys.executable, "-m", "comfyui_prdp", *args, "--out", str(tmp_path / "one")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    both = subprocess.run([*torchrun, "-m", "comfyui_prdp", *args, "--out", str(tmp_path / "two")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert both.returncode == 0, both.stderr[-3000:]
    metrics = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("one", "two")}
    assert [m["epoch"] for m in metrics["two"]] == [1, 2]
    for metric in ("reward_mean", "reward_std"):      # the same images: the same rewards, to float32 rounding
        assert metrics["two"][0][metric] == pytest.approx(metrics["one"][0][metric], rel=1e-6), metric
    one, two = (load_file(str(tmp_path / name / "lora.safetensors")) for name in ("one", "two"))
    assert one.keys() == two.keys()
    up = [k for k in one if "lora_up" in k]        # zero at the start: the values are what training moved
    assert torch.cat([one[k].flatten() for k in up]).norm().item() > 1e-3          # it trained
    assert relative_distance(one, two) < EMBEDDED_RELATIVE, relative_distance(one, two)
    assert not list((tmp_path / "two").glob("lora_*.safetensors"))         # one LoRA, written once


def torchrun_cli(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "comfyui_prdp", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_torchrun_refusals_end_every_rank_before_the_model_loads(tmp_path):
    too_few = torchrun_cli(["train", "--out", str(tmp_path / "few"), "--prompts-per-epoch", "1"], tmp_path)
    assert too_few.returncode != 0
    assert "prompts_per_epoch=1 is less than the 2 ranks" in too_few.stderr
    assert not (tmp_path / "few").exists()
    # rank 0 decides about --out and tells rank 1: a used folder without --resume ends both
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    refused = torchrun_cli(["train", "--out", str(used)], tmp_path)
    assert refused.returncode != 0 and "already contains files" in refused.stderr
    # nothing but the run lock (kept by design, see runs/run_lock.py) is added, the user's file is untouched
    assert sorted(p.name for p in used.iterdir()) == [".prdp_run.lock", "notes.txt"]
    assert (used / "notes.txt").read_text() == "mine"


def test_torchrun_a_stop_file_stops_both_ranks_with_one_checkpoint(tmp_path):
    out, stop_file = tmp_path / "run", tmp_path / "STOP"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "comfyui_prdp", *EMBEDDED_RUN, "--epochs", "200", "--out", str(out), "--stop-file", str(stop_file)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    process = subprocess.Popen(run, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.5)
        stop_file.write_text("")                  # after epoch 1: both ranks must stop together
        _, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0 and "continue with --resume" in stderr, stderr[-3000:]
    stopped = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(stopped) == 1 and stopped[0].endswith("_stopped"), stopped
    epochs = len((out / "metrics.jsonl").read_text().splitlines())
    assert 1 <= epochs < 200 and stopped[0] == f"epoch_{epochs:05d}_stopped"
    assert (out / "lora.safetensors").is_file()


class FailsOnSmallBatchesAfterTheFirst(BrightnessReward):
    """Served over HTTP: answers 500 to every 2-image request after the first. In EMBEDDED_RUN
    rank 0 scores 2 prompt groups (4 images) and rank 1 one group (2 images) per epoch, so
    only rank 1's reward fails, in epoch 2."""

    def __init__(self):
        super().__init__()
        self.small_batches = 0

    def score_with_components(self, images, prompts):
        if len(images) == 2:
            self.small_batches += 1
            if self.small_batches > 1:
                raise RuntimeError("the reward model crashed (simulated)")
        return super().score_with_components(images, prompts)


def test_torchrun_a_reward_error_on_one_rank_ends_both_ranks_with_a_checkpoint(tmp_path):
    """The CLI as users start it, the reward served by `serve-reward`'s server: rank 1's reward
    fails in epoch 2; both ranks end (no hang) with the error, rank 0 keeps epoch 1."""
    from comfyui_prdp.rewards.server import RewardServer
    server = RewardServer(FailsOnSmallBatchesAfterTheFirst(), "127.0.0.1", 0)
    url = server.start()
    try:
        out = tmp_path / "run"
        run = torchrun_cli([*EMBEDDED_RUN, "--reward", url, "--out", str(out)], tmp_path)
    finally:
        server.stop()
    assert run.returncode != 0, run.stderr[-3000:]
    # each rank prints the error (rank 0 adds the checkpoint)
    assert run.stderr.count("error: rank 1 failed, so every rank stopped at the same point:") == 2, run.stderr[-3000:]
    assert "rank 1: RewardServerError in epoch 2 reward:" in run.stderr
    assert "the reward model crashed (simulated)" in run.stderr
    checkpoint = out / "checkpoints" / "epoch_00001_stopped"
    assert f"checkpoint: {checkpoint}" in run.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [checkpoint.name]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


class AlwaysFails(BrightnessReward):
    """Served over HTTP: every request fails. Rank 0's held-out evaluation before training is
    the first scoring of a run, so that is where the run fails."""

    def score_with_components(self, images, prompts):
        raise RuntimeError("the reward model crashed before training (simulated)")


def test_torchrun_an_error_in_rank_zeros_evaluation_before_training_ends_both_ranks(tmp_path):
    """Rank 0 alone evaluates before training; its error reaches rank 1 (waiting to start the
    Trainer) as the protocol's RankFailed, instead of a closed connection or a hang."""
    from comfyui_prdp.rewards.server import RewardServer
    server = RewardServer(AlwaysFails(), "127.0.0.1", 0)
    url = server.start()
    try:
        out = tmp_path / "run"
        args = [a for a in EMBEDDED_RUN if a != "--no-eval"]
        run = torchrun_cli([*args, "--reward", url, "--out", str(out)], tmp_path)
    finally:
        server.stop()
    assert run.returncode != 0, run.stderr[-3000:]
    assert run.stderr.count("error: rank 0 failed, so every rank stopped at the same point:") == 2, run.stderr[-3000:]
    assert "rank 0: RewardServerError in the held-out evaluation before training:" in run.stderr, run.stderr[-3000:]
    assert "Connection closed" not in run.stderr
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()     # nothing trained


def info_once_server():
    """An HTTP server that answers the reward protocol's GET /info once, then 403: the rank that
    asks second cannot make its reward."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answered = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/info" and not answered:
                answered.append(self.path)
                status, body = 200, {"protocol": 1, "reward": "brightness", "max_images": 64,
                                     "max_body_bytes": 2 ** 24}
            else:
                status, body = 403, {"error": "this reward server lets one client in (simulated)"}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_torchrun_a_loading_error_on_one_rank_ends_both_ranks_before_any_work(tmp_path):
    """One rank cannot make its reward (its server refuses it): every rank ends at the loading
    collective with that rank's error, instead of the others loading on and waiting for it."""
    server, url = info_once_server()
    try:
        out = tmp_path / "run"
        args = [a for a in EMBEDDED_RUN if a != "--no-eval"]     # rank 0 would evaluate before training
        run = torchrun_cli([*args, "--reward", url, "--out", str(out)], tmp_path)
    finally:
        server.shutdown()
    assert run.returncode != 0, run.stderr[-3000:]
    failed = [rank for rank in (0, 1) if f"error: rank {rank} failed, so every rank stopped" in run.stderr]
    assert len(failed) == 1 and run.stderr.count("so every rank stopped at the same point:") == 2, run.stderr[-3000:]
    assert (f"rank {failed[0]}: LoadRefused in loading the model and the reward: reward server {url} refused "
            "GET /info: HTTP 403: this reward server lets one client in (simulated)") in run.stderr, run.stderr[-3000:]
    assert str(ROOT / "comfyui_prdp") not in run.stderr      # no traceback of ours (torchrun prints its own)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert not (out / "before_after.png").exists()          # rank 0 did not evaluate
