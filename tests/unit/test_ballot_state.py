"""The ballot's state in the dashboard (web/prdp_ballot.js), run here under Node.js: clicks in
order -> {"order"}, best / worst -> {"best", "worst"}, skip, undo, "all answered?", the keys and
the phase text; every answer it makes is one the route takes (rewards/human/choices.py's
parse_answer), with the rewards it means. Skipped without a `node` executable."""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess

import pytest

from comfy_harness import REPO_ROOT
from comfy_inprocess import load_plugin_package

SCRIPT = REPO_ROOT / "web" / "prdp_ballot.js"
NODE_JS = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE_JS is None, reason="Node.js is not installed")

#: runs a list of steps on one BallotState; after each step records what the person would see
DRIVER = """
const m = await import(process.argv[1]);
const [ballot, steps] = JSON.parse(process.argv[2]);
const out = [];
let state;
try { state = new m.BallotState(ballot); } catch (error) { console.log(JSON.stringify({error: error.message})); process.exit(0); }
for (const [action, ...args] of steps) {
  let result;
  if (action === "key") result = state.key(args[0]);
  else result = state[action](...args);
  let body = null;
  try { body = state.body(); } catch (error) { body = error.message; }
  out.push(JSON.parse(JSON.stringify({action, result: result === undefined ? null : result, current: state.current,
            left: state.left(), complete: state.complete(), answers: state.answers, labels: state.labels(),
            phase: state.phaseText(), body})));
}
console.log(JSON.stringify(out));
"""


def ballot(prompts=2, images=4):
    return {"id": "b" * 22, "prompts": [f"prompt {k}" for k in range(prompts)], "images_per_prompt": images,
            "images": [[f"/prdp/jobs/j/ballot/x/image/{k}/{i}" for i in range(images)] for k in range(prompts)],
            "answer_url": "/prdp/jobs/j/ballot/x"}


def run(steps, **shape):
    proc = subprocess.run([NODE_JS, "--input-type=module", "-e", DRIVER, SCRIPT.as_uri(),
                           json.dumps([ballot(**shape), steps])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def choices():
    package = load_plugin_package()
    return importlib.import_module(f"{package.__name__}.comfyui_prdp.rewards.human.choices")


def test_clicks_in_order_rank_best_first_and_a_second_click_unranks():
    out = run([["pick", 2], ["pick", 0], ["pick", 3], ["pick", 0], ["pick", 1], ["submitPrompt"]])
    assert [o["labels"] for o in out[:5]] == [[0, 0, 1, 0], [2, 0, 1, 0], [2, 0, 1, 3], [0, 0, 1, 2], [0, 3, 1, 2]]
    # three of four ranked: the fourth (image 0) is ranked last
    assert out[-1]["answers"][0] == {"order": [2, 3, 1, 0]}
    assert out[-1]["current"] == 1 and out[-1]["left"] == 1 and not out[-1]["complete"]


def test_two_ranks_make_an_answer_one_does_not():
    out = run([["pick", 1], ["submitPrompt"], ["pick", 3], ["submitPrompt"]])
    assert "rank at least 2 images" in out[1]["result"] and out[1]["answers"][0] is None and out[1]["current"] == 0
    assert out[3]["result"] == "" and out[3]["answers"][0] == {"order": [1, 3]}


def test_with_two_images_one_click_ranks_both():
    out = run([["pick", 1], ["submitPrompt"]], prompts=1, images=2)
    assert out[-1]["answers"] == [{"order": [1, 0]}] and out[-1]["complete"]
    assert out[-1]["body"] == {"answers": [{"order": [1, 0]}]}


def test_best_and_worst_mode():
    out = run([["setMode", "bestworst"], ["pick", 3], ["pick", 1], ["mark", "best", 1], ["mark", "worst", 0],
               ["submitPrompt"]])
    assert out[1]["labels"] == ["", "", "", "best"] and out[2]["labels"] == ["", "worst", "", "best"]
    assert out[3]["labels"] == ["", "best", "", ""]          # the worst image became the best
    assert out[4]["labels"] == ["worst", "best", "", ""]
    assert out[5]["answers"][0] == {"best": 1, "worst": 0}
    half = run([["setMode", "bestworst"], ["pick", 3], ["submitPrompt"]])
    assert "mark the best and the worst" in half[-1]["result"] and half[-1]["answers"] == [None, None]


def test_skip_moves_on_and_every_prompt_answered_makes_the_body():
    out = run([["key", "S"], ["key", "2"], ["key", "1"], ["key", "Enter"]])
    assert out[0]["answers"] == [{"skip": True}, None] and out[0]["current"] == 1
    assert out[0]["phase"] == "waiting for your choice (1 of 2 prompts left)"
    assert not out[2]["complete"] and "have no answer yet" in out[2]["body"]
    assert out[3]["complete"] and out[3]["body"] == {"answers": [{"skip": True}, {"order": [1, 0]}]}
    assert out[3]["phase"] == "waiting for your choice (0 of 2 prompts left)"


def test_keys_pick_submit_skip_and_undo():
    out = run([["key", "3"], ["key", "Backspace"], ["key", "4"], ["key", "1"], ["key", "Enter"], ["key", "Backspace"],
               ["key", "9"], ["key", "x"]])
    assert out[0]["labels"] == [0, 0, 1, 0] and out[1]["labels"] == [0, 0, 0, 0]          # undo a pick
    assert out[4]["answers"][0] == {"order": [3, 0]} and out[4]["current"] == 1
    # undo an answer: back on prompt 1, unanswered, its marks kept
    assert out[5]["answers"][0] is None and out[5]["current"] == 0 and out[5]["labels"] == [2, 0, 0, 1]
    assert out[6]["result"] == {"handled": True, "error": "this prompt has images 1..4"}
    assert out[7]["result"] == {"handled": False, "error": ""}
    nothing = run([["key", "Backspace"]])
    assert nothing[0]["result"] == {"handled": True, "error": "nothing to undo"}


def test_a_changed_mark_takes_the_answer_back_until_enter():
    out = run([["pick", 0], ["pick", 1], ["submitPrompt"], ["go", 0], ["pick", 2]])
    assert out[2]["answers"][0] == {"order": [0, 1]}
    assert out[4]["answers"][0] is None and out[4]["labels"] == [1, 2, 3, 0] and out[4]["left"] == 2


def test_a_ballot_without_prompts_or_with_one_image_is_refused():
    assert "at least one prompt" in run([], prompts=0)["error"]
    assert "at least 2 images" in run([], images=1)["error"]


def test_every_answer_the_dashboard_makes_is_one_the_route_takes_with_its_rewards(choices):
    """The answers are those of rewards/human/choices.py, and mean what the person did."""
    out = run([["pick", 2], ["pick", 0], ["submitPrompt"], ["setMode", "bestworst"], ["pick", 1], ["pick", 3],
               ["submitPrompt"]])
    answers = out[-1]["body"]["answers"]
    parsed = [choices.parse_answer(answer, 4) for answer in answers]
    assert parsed == [{"order": [2, 0]}, {"best": 1, "worst": 3}]
    first = choices.choices_to_rewards(parsed[0], 4).tolist()
    assert first[2] > first[0] > first[1] == first[3]          # ranked best first, unranked tied below
    second = choices.choices_to_rewards(parsed[1], 4).tolist()
    assert second[1] == max(second) and second[3] == min(second) and second[0] == second[2]
    skipped = run([["skip"], ["skip"]])[-1]["body"]["answers"]
    assert [choices.choices_to_rewards(choices.parse_answer(a, 4), 4) for a in skipped] == [None, None]
