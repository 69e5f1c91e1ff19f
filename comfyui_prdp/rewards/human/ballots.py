"""The ballot box of one run: each epoch's images as PNG files in the run folder, the open
ballot (run_dir/preferences/pending.json), the person's answers and the preference record
(run_dir/preferences.jsonl).

Thread-safe: the training thread opens a ballot and waits; the HTTP routes (another thread)
read it and answer it. One lock guards the ballot's state, so of two concurrent answers exactly
one is taken and the other gets 409.

Files (paths relative to the run folder):

    preferences/epoch_NNNNN/prompt_PP_image_II.png   the images shown (NNNNN: the 1-based epoch)
    preferences/pending.json                          the latest ballot and its state (atomic writes)
    preferences.jsonl                                 one line per answered prompt (appended atomically)

A run resumed in another folder takes the record and the open ballot with it (carry_over.py).
A resumed run (or a restarted server) reads pending.json: when the epoch is sampled again and
gives the same pixels (training is deterministic per seed and epoch), the same ballot is asked
again, or its answer, if it was given, is used without asking twice.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from ...lora.files import atomic_write
from ...runs.stop_signals import StopRequested
from .choices import AnswerError, choices_to_rewards, parse_answer

logger = logging.getLogger(__name__)

FOLDER = "preferences"
PENDING_FILE = "pending.json"
RECORD_FILE = "preferences.jsonl"
FORMAT = "comfyui-prdp-ballot"
MAX_PENDING_BYTES = 4 * 2 ** 20
MAX_RECORD_BYTES = 64 * 2 ** 20


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def image_bytes(image: torch.Tensor) -> bytes:
    """One image [H, W, 3] in 0..1 as PNG bytes (8 bits per channel)."""
    import io

    from PIL import Image
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def pixel_digest(image: torch.Tensor) -> str:
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:32]


@dataclass
class Ballot:
    """One epoch's question: N prompts, each with B images."""
    id: str
    epoch: int                          # 1-based, as in metrics.jsonl
    prompts: List[str]
    images_per_prompt: int
    files: List[List[str]]              # [prompt][image] -> path relative to the run folder
    digests: List[List[str]]            # [prompt][image] -> sha256 of the 8-bit pixels
    seed: int = 0
    noise_seeds: List[List[int]] = field(default_factory=list)
    created: str = ""
    answered: bool = False
    answers: Optional[List[Dict[str, Any]]] = None
    answered_at: Optional[str] = None
    closed: Optional[str] = None        # why it no longer takes answers without one ("timeout: skip", ...)
    event: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        return {"format": FORMAT, "id": self.id, "epoch": self.epoch, "prompts": list(self.prompts),
                "images_per_prompt": self.images_per_prompt, "files": self.files, "digests": self.digests,
                "seed": self.seed, "noise_seeds": self.noise_seeds, "created": self.created,
                "answered": self.answered, "answers": self.answers, "answered_at": self.answered_at,
                "closed": self.closed}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Ballot":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a ballot file")
        prompts, B = data["prompts"], int(data["images_per_prompt"])
        files, digests = data["files"], data["digests"]
        if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts) and B >= 2
                and len(files) == len(digests) == len(prompts)
                and all(isinstance(row, list) and len(row) == B for row in files + digests)):
            raise ValueError("the ballot's prompts, files and digests do not fit together")
        for row in files:
            for name in row:
                if not is_own_file_name(name):
                    raise ValueError(f"unexpected image path {name!r}")
        ballot = cls(id=str(data["id"]), epoch=int(data["epoch"]), prompts=prompts, images_per_prompt=B,
                     files=files, digests=digests, seed=int(data.get("seed", 0)),
                     noise_seeds=data.get("noise_seeds") or [], created=str(data.get("created", "")),
                     answered=bool(data.get("answered")), answers=data.get("answers"),
                     answered_at=data.get("answered_at"), closed=data.get("closed"))
        if ballot.answered:
            if not isinstance(ballot.answers, list) or len(ballot.answers) != len(prompts):
                raise ValueError("the ballot is marked answered without one answer per prompt")
            ballot.answers = [parse_answer(a, B) for a in ballot.answers]
            ballot.event.set()
        return ballot


def _file_name(epoch: int, prompt: int, image: int) -> str:
    return f"{FOLDER}/epoch_{epoch:05d}/prompt_{prompt:02d}_image_{image:02d}.png"


def is_own_file_name(name: Any) -> bool:
    """Only names this module writes (never a path a file could smuggle in)."""
    import re
    return isinstance(name, str) and re.fullmatch(
        rf"{FOLDER}/epoch_\d{{5,}}/prompt_\d{{2,}}_image_\d{{2,}}\.png", name) is not None


class BallotBox:
    """The ballots of one run folder (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / FOLDER
        self.pending_path = self.folder / PENDING_FILE
        self.record_path = self.run_dir / RECORD_FILE
        self._lock = threading.Lock()
        self.pending: Optional[Ballot] = None
        self._retired: Set[str] = set()      # ids of earlier ballots (answers to them: 410)
        self._load_pending()

    # --- the training side ----------------------------------------------------------------
    def open(self, epoch: int, prompts: List[str], images: torch.Tensor, images_per_prompt: int,
             seed: int = 0, noise_seeds: Optional[List[List[int]]] = None) -> Ballot:
        """The ballot for this epoch's images (N*B rows, prompt-major): the pending one when it is
        for the same epoch, prompts and pixels (a resumed run; answered or not), else a new one
        whose images are written first."""
        B = images_per_prompt
        digests = [[pixel_digest(images[k * B + i]) for i in range(B)] for k in range(len(prompts))]
        with self._lock:
            old = self.pending
            if (old is not None and old.epoch == epoch and old.prompts == list(prompts)
                    and old.images_per_prompt == B and old.digests == digests and old.closed is None):
                self._write_images(old, images, only_missing=True)
                logger.info("PRDP: asking ballot %s of epoch %d again (%s)", old.id, epoch,
                            "answered before" if old.answered else "not answered yet")
                return old
            if old is not None:
                self._retired.add(old.id)
            ballot = Ballot(id=secrets.token_urlsafe(16), epoch=epoch, prompts=list(prompts),
                            images_per_prompt=B,
                            files=[[_file_name(epoch, k, i) for i in range(B)] for k in range(len(prompts))],
                            digests=digests, seed=seed, noise_seeds=noise_seeds or [], created=now_iso())
            self._write_images(ballot, images)
            self.pending = ballot
            self._save(ballot)
        return ballot

    def wait(self, ballot: Ballot, stop_event: threading.Event, time_limit: float = 0.0,
             poll_seconds: float = 0.05) -> bool:
        """Block until the ballot is answered (True) or `time_limit` seconds pass (False; 0: no
        limit). A set `stop_event` raises StopRequested within `poll_seconds`."""
        deadline = time.monotonic() + time_limit if time_limit and time_limit > 0 else None
        while True:
            if stop_event.is_set():
                raise StopRequested()
            slice_ = poll_seconds if deadline is None else min(poll_seconds, max(0.0, deadline - time.monotonic()))
            if ballot.event.wait(slice_):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return ballot.event.is_set()

    def close(self, ballot: Ballot, reason: str) -> bool:
        """Stop taking answers for the ballot (its time ran out): True when closed, False when an
        answer came first (then use it)."""
        with self._lock:
            if ballot.answered:
                return False
            ballot.closed = reason
            if self.pending is ballot:
                self._save(ballot)
            return True

    def adopt(self, ballot: Ballot) -> None:
        """Make `ballot` (carried over from an earlier run folder, its images copied here) the
        pending one of this box, which has none of its own: the resumed run asks it again
        (carry_over.py)."""
        with self._lock:
            self.pending = ballot
            self._save(ballot)

    # --- the person's side (HTTP routes) ---------------------------------------------------
    def describe(self) -> Optional[Dict[str, Any]]:
        """The open ballot (id, epoch, prompts, images per prompt); None when none waits."""
        with self._lock:
            ballot = self.pending
            if ballot is None or ballot.answered or ballot.closed:
                return None
            return {"id": ballot.id, "epoch": ballot.epoch, "prompts": list(ballot.prompts),
                    "images_per_prompt": ballot.images_per_prompt, "created": ballot.created}

    def image_file(self, ballot_id: str, prompt: int, image: int) -> Tuple[int, Any]:
        """(200, path of the image) or (4xx, message). Only the file this box wrote for the
        ballot's (prompt, image) is ever named; nothing the client sends becomes a path."""
        with self._lock:
            ballot = self.pending
            if ballot is None or ballot.id != ballot_id:
                if ballot_id in self._retired:
                    return 410, "this ballot is over (a newer one is open)"
                return 404, "unknown ballot id"
            if not (0 <= prompt < len(ballot.prompts)):
                return 404, f"prompt index {prompt} is out of range (0..{len(ballot.prompts) - 1})"
            if not (0 <= image < ballot.images_per_prompt):
                return 404, f"image index {image} is out of range (0..{ballot.images_per_prompt - 1})"
            path = self.run_dir / ballot.files[prompt][image]
        if not path.is_file():
            return 404, "the image file is gone from the run folder"
        return 200, path

    def answer(self, ballot_id: Any, answers: Any) -> Tuple[int, Dict[str, Any]]:
        """Take the person's answers (one per prompt): (200, summary) or (4xx, {"error": ...})."""
        if not isinstance(ballot_id, str):
            return 404, {"error": "unknown ballot id"}
        with self._lock:
            ballot = self.pending
            if ballot is None or ballot.id != ballot_id:
                if ballot_id in self._retired:
                    return 410, {"error": "this ballot is over: a newer one is open (GET the ballot again)"}
                return 404, {"error": "unknown ballot id (GET /prdp/jobs/<job>/ballot for the open one)"}
            if ballot.answered:
                return 409, {"error": "this ballot was answered already"}
            if ballot.closed:
                return 410, {"error": f"this ballot is closed ({ballot.closed}); the run went on without it"}
            if not isinstance(answers, list):
                return 400, {"error": "answers must be a list with one answer per prompt"}
            if len(answers) != len(ballot.prompts):
                return 400, {"error": f"expected {len(ballot.prompts)} answers (one per prompt), got {len(answers)}"}
            try:
                parsed = [parse_answer(a, ballot.images_per_prompt, where=f"answers[{k}]")
                          for k, a in enumerate(answers)]
            except AnswerError as error:
                return 400, {"error": str(error)}
            answered_at = now_iso()
            self._append_record(ballot, parsed, answers, answered_at)
            ballot.answers, ballot.answered, ballot.answered_at = parsed, True, answered_at
            self._save(ballot)
            ballot.event.set()
        return 200, {"ballot": ballot.id, "epoch": ballot.epoch, "answered_at": answered_at}

    # --- files -------------------------------------------------------------------------------
    def _write_images(self, ballot: Ballot, images: torch.Tensor, only_missing: bool = False) -> None:
        B = ballot.images_per_prompt
        for k, row in enumerate(ballot.files):
            for i, name in enumerate(row):
                path = self.run_dir / name
                if only_missing and path.is_file():
                    continue
                data = image_bytes(images[k * B + i])
                atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))

    def _save(self, ballot: Ballot) -> None:
        text = json.dumps(ballot.to_dict(), indent=1)
        atomic_write(self.pending_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def _append_record(self, ballot: Ballot, parsed: List[Dict[str, Any]], given: List[Any],
                       answered_at: str) -> None:
        """One line per prompt, all of the ballot's lines in one os.write on an O_APPEND file,
        fsynced: a crash leaves all of them or none."""
        lines = []
        for k, (answer, raw) in enumerate(zip(parsed, given)):
            rewards = choices_to_rewards(answer, ballot.images_per_prompt)
            values = None if rewards is None else [float(v) for v in rewards]
            ranks = None if values is None else [1 + len({v for v in values if v > value}) for value in values]
            lines.append(json.dumps({
                "epoch": ballot.epoch, "ballot": ballot.id, "prompt_index": k, "prompt": ballot.prompts[k],
                "seed": ballot.seed,
                "noise_seeds": ballot.noise_seeds[k] if k < len(ballot.noise_seeds) else None,
                "images": ballot.files[k], "answer": raw, "rewards": values, "ranks": ranks,
                "answered_at": answered_at}, sort_keys=True))
        data = ("\n".join(lines) + "\n").encode("utf-8")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"{self.record_path}: wrote {written} of {len(data)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)

    def _load_pending(self) -> None:
        try:
            if not self.pending_path.is_file() or self.pending_path.stat().st_size > MAX_PENDING_BYTES:
                return
            self.pending = Ballot.from_dict(json.loads(self.pending_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AnswerError) as error:
            logger.warning("PRDP: ignoring %s (%s); a new ballot will be opened", self.pending_path, error)
            self.pending = None


def read_preferences(run_dir: Path) -> List[Dict[str, Any]]:
    """The lines of run_dir/preferences.jsonl, for reuse and for a resumed run (carry_over.py).
    A line that is not a preference line (torn, or edited by hand) is skipped with a warning;
    a record that cannot be read, or is over MAX_RECORD_BYTES, gives none."""
    path = Path(run_dir) / RECORD_FILE
    try:
        if not path.is_file():
            return []
        if path.stat().st_size > MAX_RECORD_BYTES:
            logger.warning("PRDP: %s is over %d MiB; not read", path, MAX_RECORD_BYTES >> 20)
            return []
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        logger.warning("PRDP: cannot read %s (%s)", path, error)
        return []
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if isinstance(line, dict) and isinstance(line.get("epoch"), int):
            lines.append(line)
        else:
            logger.warning("PRDP: %s line %d is not a preference line; skipped", path, number)
    return lines
