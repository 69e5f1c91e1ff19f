// comfyui-prdp: the state of one ballot of the human reward while a person answers it (pure
// logic, no DOM: web/prdp_dashboard.js draws it, tests/unit/test_ballot_state.py runs it under
// Node.js). A ballot (GET /prdp/jobs/<job>/ballot) has N prompts with B images each; the person
// answers each prompt, then all answers go out in one POST (one answer per prompt), as the
// route takes them (comfyui_prdp/rewards/human/choices.py):
//   {"order": [i, j, ...]}  best first (rank mode: each click is the next rank)
//   {"best": i, "worst": j} (best / worst mode)
//   {"skip": true}          no preference: the prompt gives PRDP no pairs
// Indices are 0-based here and in the answers; the person sees and types 1..B.

export const MODES = ["rank", "bestworst"];

function emptyMarks() {
  return { order: [], best: null, worst: null };
}

function copy(value) {
  return JSON.parse(JSON.stringify(value));
}

export class BallotState {
  /** `ballot`: the route's JSON ({id, prompts, images_per_prompt, images, answer_url}). */
  constructor(ballot, mode = "rank") {
    if (!ballot || !Array.isArray(ballot.prompts) || !ballot.prompts.length) {
      throw new Error("a ballot needs at least one prompt");
    }
    const count = Number(ballot.images_per_prompt);
    if (!Number.isInteger(count) || count < 2) throw new Error("a ballot needs at least 2 images per prompt");
    this.id = ballot.id;
    this.prompts = ballot.prompts.slice();
    this.count = count;
    this.images = ballot.images || [];
    this.answerUrl = ballot.answer_url;
    this.mode = MODES.includes(mode) ? mode : "rank";
    this.current = 0;
    this.marks = this.prompts.map(() => emptyMarks());
    this.answers = this.prompts.map(() => null);
    this.history = [];
  }

  _remember() {
    this.history.push(copy({ current: this.current, marks: this.marks, answers: this.answers }));
  }

  setMode(mode) {
    if (!MODES.includes(mode) || mode === this.mode) return;
    this.mode = mode;
  }

  _checkImage(image) {
    if (!Number.isInteger(image) || image < 0 || image >= this.count) {
      return `image ${Number.isInteger(image) ? image + 1 : image} is not one of 1..${this.count}`;
    }
    return "";
  }

  /** Rank mode: `image` becomes the next rank of the current prompt, or leaves the ranking when
   *  it is ranked already (the images after it move up). Best / worst mode: the first pick is
   *  the best, the next the worst. Returns "" or a message. */
  pick(image) {
    const problem = this._checkImage(image);
    if (problem) return problem;
    if (this.mode === "bestworst") {
      const marks = this.marks[this.current];
      return this.mark(marks.best === null || marks.best === image ? "best" : "worst", image);
    }
    this._remember();
    const marks = this.marks[this.current];
    const at = marks.order.indexOf(image);
    if (at >= 0) marks.order.splice(at, 1);
    else marks.order.push(image);
    this.answers[this.current] = null;
    return "";
  }

  /** Best / worst mode: mark `image` as the current prompt's best or worst (again: unmark; the
   *  other role taken by the same image moves to it). */
  mark(role, image) {
    const problem = this._checkImage(image);
    if (problem) return problem;
    if (role !== "best" && role !== "worst") return `unknown mark ${role}`;
    this._remember();
    const marks = this.marks[this.current];
    const other = role === "best" ? "worst" : "best";
    if (marks[role] === image) marks[role] = null;
    else {
      if (marks[other] === image) marks[other] = null;
      marks[role] = image;
    }
    this.answers[this.current] = null;
    return "";
  }

  /** The 1-based rank each image of `prompt` has (0: none), in rank mode; for best / worst,
   *  "best" / "worst" / "". */
  labels(prompt = this.current) {
    const marks = this.marks[prompt];
    if (this.mode === "bestworst") {
      return Array.from({ length: this.count }, (_, i) => (i === marks.best ? "best" : i === marks.worst ? "worst" : ""));
    }
    return Array.from({ length: this.count }, (_, i) => marks.order.indexOf(i) + 1);
  }

  /** The answer the current marks of `prompt` make, or null when they make none yet. Ranking
   *  all images but one ranks that one last. */
  answerFor(prompt = this.current) {
    const marks = this.marks[prompt];
    if (this.mode === "bestworst") {
      return marks.best !== null && marks.worst !== null ? { best: marks.best, worst: marks.worst } : null;
    }
    const order = marks.order.slice();
    if (order.length === this.count - 1) {
      order.push([...Array(this.count).keys()].find((i) => !order.includes(i)));
    }
    return order.length >= 2 ? { order } : null;
  }

  _advance() {
    const next = this.answers.findIndex((answer, k) => answer === null && k > this.current);
    const first = this.answers.findIndex((answer) => answer === null);
    this.current = next >= 0 ? next : first >= 0 ? first : this.current;
  }

  /** Take the current prompt's answer (Enter) and move to the next prompt without one.
   *  Returns "" or what is missing. */
  submitPrompt() {
    const answer = this.answerFor(this.current);
    if (!answer) {
      return this.mode === "bestworst"
        ? "mark the best and the worst image (or S to skip this prompt)"
        : "rank at least 2 images: click the best first, then the next (or S to skip this prompt)";
    }
    this._remember();
    this.answers[this.current] = answer;
    this._advance();
    return "";
  }

  /** No preference for the current prompt (S): it gives no pairs. */
  skip() {
    this._remember();
    this.answers[this.current] = { skip: true };
    this._advance();
    return "";
  }

  /** Go to prompt `k` (to look at it again or change its answer). */
  go(k) {
    if (Number.isInteger(k) && k >= 0 && k < this.prompts.length) this.current = k;
  }

  /** Take back the last pick, mark, answer or skip (Backspace). False when there is none. */
  undo() {
    const last = this.history.pop();
    if (!last) return false;
    Object.assign(this, last);
    return true;
  }

  left() {
    return this.answers.filter((answer) => answer === null).length;
  }

  complete() {
    return this.left() === 0;
  }

  /** The POST body: every prompt's answer. */
  body() {
    if (!this.complete()) throw new Error(`${this.left()} prompt(s) have no answer yet`);
    return { answers: copy(this.answers) };
  }

  phaseText() {
    const left = this.left();
    return `waiting for your choice (${left} of ${this.prompts.length} prompt${this.prompts.length === 1 ? "" : "s"} left)`;
  }

  /** A key pressed while the dashboard has focus: digits 1..9 pick that image, Enter submits
   *  the prompt, S skips it, Backspace undoes. {handled, error}. */
  key(name) {
    if (/^[1-9]$/.test(name)) {
      const image = Number(name) - 1;
      if (image >= this.count) return { handled: true, error: `this prompt has images 1..${this.count}` };
      return { handled: true, error: this.pick(image) };
    }
    if (name === "Enter") return { handled: true, error: this.submitPrompt() };
    if (name === "s" || name === "S") return { handled: true, error: this.skip() };
    if (name === "Backspace") return { handled: true, error: this.undo() ? "" : "nothing to undo" };
    return { handled: false, error: "" };
  }
}
