// comfyui-prdp: the live training dashboard (plain DOM, no canvas drawing), shown in a DOM
// widget so it works in the classic canvas and in the Nodes 2.0 (Vue) renderer alike.
// This module only builds and updates elements; web/prdp.js wires it to the nodes and events.
// While the human reward waits for a person, the dashboard shows its ballot (BallotPanel): each
// prompt's images, marked by clicks or keys (state: web/prdp_ballot.js).
import { BallotState } from "./prdp_ballot.js";

const STYLE_ID = "prdp-dashboard-style";
const SVG = "http://www.w3.org/2000/svg";
export const DASHBOARD_MIN_HEIGHT = 380;
export const SCORE_TEXT_MIN_HEIGHT = 76;
export const BALLOT_MIN_HEIGHT = 640;
export const BALLOT_MIN_WIDTH = 520;

const CSS = `
.prdp-dash { box-sizing: border-box; width: 100%; height: 100%; display: flex; flex-direction: column;
  gap: 4px; padding: 6px; font: 12px/1.35 ui-monospace, monospace; color: #ddd; background: #1b1b1b;
  border-radius: 6px; overflow: hidden; }
.prdp-dash > * { flex: none; }
.prdp-row { display: flex; align-items: center; gap: 6px; }
.prdp-status { flex: 1; white-space: normal; overflow-wrap: anywhere; }
.prdp-stop { font: inherit; padding: 2px 10px; border-radius: 4px; border: 1px solid #a44; color: #fff;
  background: #7a2222; cursor: pointer; }
.prdp-stop:disabled { opacity: 0.4; cursor: default; }
.prdp-bar { height: 4px; background: #333; border-radius: 2px; overflow: hidden; }
.prdp-bar > div { height: 100%; width: 0%; background: #4a9; transition: width 0.3s; }
.prdp-curve { width: 100%; height: 96px; flex: none; background: #222; border-radius: 4px; }
.prdp-metrics { white-space: normal; overflow-wrap: anywhere; color: #bbb; }
.prdp-samples-title { color: #999; }
.prdp-samples { display: flex; gap: 4px; flex-wrap: nowrap; overflow: hidden; min-height: 0; }
.prdp-samples figure { margin: 0; flex: 1 1 0; min-width: 0; text-align: center; }
.prdp-samples img { width: 100%; height: 64px; object-fit: contain; display: block; background: #000; }
.prdp-samples figcaption { color: #ccc; font-size: 11px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.prdp-warnings { white-space: pre-wrap; overflow-wrap: anywhere; color: #eb5; }
.prdp-message { white-space: pre-wrap; overflow-wrap: anywhere; color: #9d9; }
.prdp-message.prdp-failed { color: #e88; }
.prdp-score-text { box-sizing: border-box; width: 100%; height: 100%; padding: 4px 6px; overflow: auto;
  white-space: pre-wrap; overflow-wrap: anywhere; font: 12px/1.35 ui-monospace, monospace; color: #ddd;
  background: #1b1b1b; border-radius: 6px; }
.prdp-muted { color: #888; }
.prdp-dash.prdp-choosing > .prdp-curve, .prdp-dash.prdp-choosing > .prdp-metrics,
.prdp-dash.prdp-choosing > .prdp-samples-title, .prdp-dash.prdp-choosing > .prdp-samples { display: none; }
.prdp-ballot { display: flex; flex-direction: column; gap: 5px; flex: 1 1 auto; min-height: 0; overflow: auto;
  padding: 6px; border: 1px solid #4a9; border-radius: 6px; background: #202622; outline: none; }
.prdp-ballot:focus { border-color: #8fd; box-shadow: 0 0 0 1px #8fd; }
.prdp-ballot[hidden] { display: none; }
.prdp-ballot-head { display: flex; align-items: center; gap: 6px; flex-wrap: wrap; }
.prdp-ballot-title { flex: 1; color: #cfe; font-weight: bold; }
.prdp-ballot button { font: inherit; padding: 2px 8px; border-radius: 4px; border: 1px solid #666; color: #eee;
  background: #333; cursor: pointer; }
.prdp-ballot button.prdp-on { border-color: #8fd; background: #2d5548; }
.prdp-ballot button.prdp-primary { border-color: #5c9; background: #2d6a50; }
.prdp-ballot-prompt { font-size: 13px; color: #fff; white-space: normal; overflow-wrap: anywhere; }
.prdp-ballot-images { display: grid; gap: 6px; }
.prdp-ballot-images figure { position: relative; margin: 0; min-width: 0; cursor: pointer; border: 3px solid transparent;
  border-radius: 5px; background: #000; }
.prdp-ballot-images figure.prdp-ranked { border-color: #5c9; }
.prdp-ballot-images figure.prdp-best { border-color: #5c9; }
.prdp-ballot-images figure.prdp-worst { border-color: #d66; }
.prdp-ballot-images img { display: block; width: 100%; aspect-ratio: 1 / 1; object-fit: contain; image-rendering: auto; }
.prdp-ballot-badge { position: absolute; top: 3px; left: 3px; min-width: 18px; padding: 1px 5px; border-radius: 9px;
  background: rgba(0,0,0,0.75); color: #fff; font-weight: bold; text-align: center; }
.prdp-ballot-badge.prdp-mark { background: #2d6a50; }
.prdp-ballot-badge.prdp-worst-mark { background: #8a2a2a; }
.prdp-ballot-images .prdp-zoom { position: absolute; top: 3px; right: 3px; padding: 0 5px; }
.prdp-ballot-roles { position: absolute; bottom: 3px; left: 3px; right: 3px; display: flex; gap: 3px; justify-content: center; }
.prdp-ballot-actions { display: flex; gap: 6px; flex-wrap: wrap; align-items: center; }
.prdp-ballot-dots { display: flex; gap: 4px; margin-left: auto; }
.prdp-ballot-dots span { width: 10px; height: 10px; border-radius: 5px; background: #555; cursor: pointer; }
.prdp-ballot-dots span.prdp-done { background: #5c9; }
.prdp-ballot-dots span.prdp-current { outline: 2px solid #fff; }
.prdp-ballot-help { color: #999; font-size: 11px; white-space: normal; }
.prdp-ballot-error { color: #e88; white-space: pre-wrap; overflow-wrap: anywhere; }
.prdp-overlay { position: fixed; inset: 0; z-index: 100000; background: rgba(0,0,0,0.88); display: flex;
  flex-direction: column; align-items: center; justify-content: center; gap: 8px; cursor: zoom-out;
  font: 13px/1.4 ui-monospace, monospace; color: #eee; }
.prdp-overlay img { max-width: 92vw; max-height: 84vh; min-width: min(512px, 92vw); object-fit: contain;
  image-rendering: pixelated; background: #000; }
`;

export function injectStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  document.head.appendChild(style);
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function formatNumber(value, digits = 4) {
  return typeof value === "number" && Number.isFinite(value) ? value.toPrecision(digits) : "-";
}

/** "62%" for a fraction, "-" for anything else. */
export function formatPercent(value) {
  return typeof value === "number" && Number.isFinite(value) ? `${Math.round(value * 100)}%` : "-";
}

/** The metrics line of one epoch. pair_agreement (PRDP): how often the model's predicted
 *  preference between two images of a prompt matches the reward's (50% = chance); the raw
 *  loss (a squared error in units of 1/beta, often ~1e7) only in the tooltip and metrics.jsonl. */
export function metricsText(m, epoch, epochs) {
  const head = `epoch ${epoch}/${epochs}  reward ${formatNumber(m.reward_mean)} ± ${formatNumber(m.reward_std)}`;
  const judged = typeof m.pair_agreement === "number"
    ? `pairs ranked as the reward ranks them ${formatPercent(m.pair_agreement)}`
    : `loss ${formatNumber(m.loss, 3)}`;
  return `${head}\nkl ${formatNumber(m.kl, 3)}  clip ${formatNumber(m.clip_frac, 3)}  ${judged}`;
}

export function formatEta(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `ETA ${s}s`;
  if (s < 3600) return `ETA ${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `ETA ${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

/** Up to `count` integer ticks from 1 to n, always including both ends. */
export function epochTicks(n, count = 6) {
  if (n <= 1) return [1];
  const step = Math.max(1, Math.ceil((n - 1) / (count - 1)));
  const ticks = [];
  for (let t = 1; t < n; t += step) ticks.push(t);
  if (n - ticks[ticks.length - 1] < step / 2 && ticks.length > 1) ticks.pop();
  ticks.push(n);
  return ticks;
}

function svg(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  return node;
}

/** Reward mean ± std per epoch, drawn into an <svg> (viewBox units; scales with the node). */
export function drawCurve(target, metrics, totalEpochs) {
  const W = 300, H = 96, left = 38, right = 6, top = 6, bottom = 16;
  target.replaceChildren();
  target.setAttribute("viewBox", `0 0 ${W} ${H}`);
  target.setAttribute("preserveAspectRatio", "none");
  const points = metrics.filter((m) => Number.isFinite(m?.reward_mean));
  const label = (x, y, text, anchor = "start") => {
    const t = svg("text", { x, y, fill: "#999", "font-size": 9, "text-anchor": anchor });
    t.textContent = text;
    target.appendChild(t);
  };
  if (!points.length) {
    label(W / 2, H / 2, "reward per epoch appears after epoch 1", "middle");
    return;
  }
  const lastEpoch = Math.max(totalEpochs || 1, ...points.map((m) => m.epoch || 1));
  const std = (m) => (Number.isFinite(m.reward_std) ? m.reward_std : 0);
  let low = Math.min(...points.map((m) => m.reward_mean - std(m)));
  let high = Math.max(...points.map((m) => m.reward_mean + std(m)));
  if (high - low < 1e-9) { low -= 0.5; high += 0.5; }
  const x = (epoch) => left + (lastEpoch <= 1 ? 0.5 : (epoch - 1) / (lastEpoch - 1)) * (W - left - right);
  const y = (value) => top + (1 - (value - low) / (high - low)) * (H - top - bottom);
  target.appendChild(svg("line", { x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, stroke: "#555" }));
  for (const tick of epochTicks(lastEpoch)) {
    target.appendChild(svg("line", { x1: x(tick), y1: H - bottom, x2: x(tick), y2: H - bottom + 3, stroke: "#777" }));
    label(x(tick), H - 3, String(tick), "middle");
  }
  label(2, top + 8, formatNumber(high, 3));
  label(2, H - bottom, formatNumber(low, 3));
  const band = points.map((m) => `${x(m.epoch)},${y(m.reward_mean + std(m))}`)
    .concat(points.slice().reverse().map((m) => `${x(m.epoch)},${y(m.reward_mean - std(m))}`));
  target.appendChild(svg("polygon", { points: band.join(" "), fill: "rgba(80,170,140,0.25)", stroke: "none" }));
  target.appendChild(svg("polyline", { points: points.map((m) => `${x(m.epoch)},${y(m.reward_mean)}`).join(" "),
                                      fill: "none", stroke: "#5c9", "stroke-width": 1.5 }));
  for (const m of points) target.appendChild(svg("circle", { cx: x(m.epoch), cy: y(m.reward_mean), r: 2, fill: "#8fd" }));
}

/** The dashboard of one PRDP Train LoRA node: build once, then feed it events. */
export class Dashboard {
  constructor(onStop, ballot = {}) {
    this.metrics = [];
    this.epochs = 0;
    this.root = element("div", "prdp-dash");
    this.root.dataset.prdp = "dashboard";
    const head = element("div", "prdp-row");
    this.status = element("div", "prdp-status prdp-muted", "idle: queue the prompt to train");
    this.status.dataset.prdp = "status";
    this.stopButton = element("button", "prdp-stop", "Stop");
    this.stopButton.dataset.prdp = "stop";
    this.stopButton.title = "Stop before the model's next block; the LoRA trained so far is saved and the prompt's outputs are kept";
    this.stopButton.disabled = true;
    this.stopButton.addEventListener("click", (event) => { event.stopPropagation(); onStop(); });
    head.append(this.status, this.stopButton);
    this.bar = element("div", "prdp-bar");
    this.barFill = element("div");
    this.bar.appendChild(this.barFill);
    this.curve = document.createElementNS(SVG, "svg");
    this.curve.setAttribute("class", "prdp-curve");
    this.curve.dataset.prdp = "curve";
    this.metricsLine = element("div", "prdp-metrics", "");
    this.metricsLine.dataset.prdp = "metrics";
    this.samplesTitle = element("div", "prdp-samples-title", "");
    this.samples = element("div", "prdp-samples");
    this.samples.dataset.prdp = "samples";
    this.warnings = element("div", "prdp-warnings", "");
    this.warnings.dataset.prdp = "warnings";
    this.message = element("div", "prdp-message", "");
    this.message.dataset.prdp = "message";
    this.ballot = new BallotPanel({ ...ballot, onChange: (what, text) => this.ballotChanged(what, text) });
    this.root.append(head, this.bar, this.ballot.root, this.curve, this.metricsLine, this.warnings, this.samplesTitle,
                     this.samples, this.message);
    this.onBallotChange = ballot.onChange || (() => {});
    drawCurve(this.curve, [], 0);
  }

  /** The human reward's open ballot (the route's JSON), or null: the panel shows or goes. */
  showBallot(ballot) {
    if (ballot) this.ballot.show(ballot);
    else this.ballot.hide();
    this.root.classList.toggle("prdp-choosing", !!ballot);
    this.onBallotChange(ballot ? "shown" : "hidden");
  }

  get choosing() { return !this.ballot.root.hidden; }

  ballotChanged(what, text) {
    if (what === "refused") {
      this.setMessage(text, true);       // stays when the ballot goes (answered elsewhere)
    } else if (what === "sent") {
      this.setMessage("");
      this.root.classList.remove("prdp-choosing");
      this.setStatus("choices sent: training goes on ...");
    } else if (this.ballot.state) {
      this.setStatus(`${this.ballot.state.phaseText()} · ETA paused`);
    }
    this.onBallotChange(what);
  }

  /** The dashboard's minimum height in the node: taller while a ballot is shown. */
  minHeight() { return this.choosing ? BALLOT_MIN_HEIGHT : DASHBOARD_MIN_HEIGHT; }

  setStoppable(enabled) { this.stopButton.disabled = !enabled; }

  setStatus(text, muted = false) {
    this.status.textContent = text;
    this.status.classList.toggle("prdp-muted", muted);
  }

  setProgress(fraction) {
    const value = Number.isFinite(fraction) ? Math.min(1, Math.max(0, fraction)) : 0;
    this.barFill.style.width = `${(value * 100).toFixed(1)}%`;
  }

  /** A new run: forget the previous run's curve, samples and message. */
  reset(epochs) {
    this.showBallot(null);
    this.metrics = [];
    this.epochs = epochs || 0;
    this.metricsLine.textContent = "";
    this.samplesTitle.textContent = "";
    this.samples.replaceChildren();
    this.setWarnings([]);
    this.setMessage("");
    this.setProgress(0);
    drawCurve(this.curve, this.metrics, this.epochs);
  }

  setMessage(text, failed = false) {
    this.message.textContent = text || "";
    this.message.classList.toggle("prdp-failed", failed);
  }

  /** Lines saying which metric left its sane range (see nodes/train_progress.py). */
  setWarnings(lines) {
    this.warnings.textContent = (lines || []).map((line) => `⚠ ${line}`).join("\n");
  }

  statusLine(detail) {
    const epoch = detail.epoch ? `epoch ${detail.epoch}/${detail.epochs || this.epochs}` : "";
    const phase = this.ballot.state ? this.ballot.state.phaseText() : detail.phase || detail.status || "";
    const eta = detail.eta_paused ? "ETA paused" : formatEta(detail.eta_seconds);
    const parts = [phase, epoch, eta].filter(Boolean);
    return parts.join(" · ");
  }

  addEpoch(detail) {
    const m = detail.metrics || {};
    this.epochs = detail.epochs || this.epochs;
    const epoch = detail.epoch ?? m.epoch;
    this.metrics = this.metrics.filter((row) => row.epoch !== epoch).concat([{ ...m, epoch }]);
    this.metrics.sort((a, b) => a.epoch - b.epoch);
    drawCurve(this.curve, this.metrics, this.epochs);
    this.metricsLine.textContent = metricsText(m, epoch, this.epochs);
    this.metricsLine.title = `loss ${formatNumber(m.loss, 4)} (the raw PRDP objective; also in metrics.jsonl)`;
    this.metricsLine.style.whiteSpace = "pre-wrap";
    if (detail.warnings) this.setWarnings(detail.warnings);
    if (detail.samples?.length) this.setSamples(epoch, detail.samples);
  }

  setSamples(epoch, samples) {
    this.samplesTitle.textContent = `latest samples (training epoch ${epoch}):`;
    this.samples.replaceChildren(...samples.map((sample) => {
      const figure = element("figure");
      const image = element("img");
      image.src = sample.src;
      image.alt = sample.prompt || "sample";
      image.title = sample.prompt || "";
      const caption = element("figcaption", "", formatNumber(sample.reward));
      caption.title = sample.prompt || "";
      figure.append(image, caption);
      return figure;
    }));
  }

  /** A run fetched from /prdp/jobs/<id> or /prdp/last_run (after a page reload or a tab
   *  switch): its curve, latest metrics, warnings and samples, and how it ended. */
  restore(job) {
    this.reset(job.info?.epochs);
    for (const m of job.metrics || []) this.addEpoch({ epoch: m.epoch, epochs: job.info?.epochs, metrics: m });
    this.setWarnings(job.outputs?.warnings || []);
    if (job.samples?.length) this.setSamples(job.samples_epoch ?? job.epoch, job.samples);
    this.setProgress(job.progress);
    const message = job.outputs?.message || (job.status === "failed" ? job.error : "");
    if (message) this.setMessage(message, job.status === "failed");
  }
}

function button(text, title, onClick, prdp) {
  const node = element("button", "", text);
  node.type = "button";
  if (title) node.title = title;
  if (prdp) node.dataset.prdp = prdp;
  node.addEventListener("click", (event) => { event.stopPropagation(); onClick(event); });
  return node;
}

/** One image of the ballot large, over the page; a click or Esc closes it. */
export function showEnlarged(src, caption) {
  closeEnlarged();
  const overlay = element("div", "prdp-overlay");
  overlay.dataset.prdp = "overlay";
  const image = element("img");
  image.src = src;
  image.alt = caption;
  overlay.append(image, element("div", "", `${caption}  (click or Esc to close)`));
  const close = () => closeEnlarged();
  overlay.addEventListener("click", (event) => { event.stopPropagation(); close(); });
  overlay.prdpKeys = (event) => {
    if (event.key === "Escape") { event.preventDefault(); event.stopPropagation(); close(); }
  };
  document.addEventListener("keydown", overlay.prdpKeys, true);
  document.body.appendChild(overlay);
  return overlay;
}

export function closeEnlarged() {
  for (const overlay of document.querySelectorAll("[data-prdp=overlay]")) {
    document.removeEventListener("keydown", overlay.prdpKeys, true);
    overlay.remove();
  }
}

/** Columns of the image grid: large enough to judge inside the node (4 images: 2 x 2). */
export function ballotColumns(count) {
  return count <= 2 ? count : count === 4 ? 2 : 3;
}

/** The human reward's ballot inside the dashboard. `send(url, body)` posts the answers and
 *  resolves to {ok, error}; `refresh()` asks the route for the open ballot again; `resolve(url)`
 *  turns a URL the route gave into one for <img> (the API prefix, nothing else). */
export class BallotPanel {
  constructor({ send, refresh, resolve, onChange }) {
    this.send = send;
    this.refresh = refresh;
    this.resolve = resolve || ((url) => url);
    this.onChange = onChange || (() => {});
    this.state = null;
    this.sending = false;
    this.root = element("div", "prdp-ballot");
    this.root.dataset.prdp = "ballot";
    this.root.tabIndex = 0;
    this.root.hidden = true;
    const head = element("div", "prdp-ballot-head");
    this.title = element("div", "prdp-ballot-title", "");
    this.title.dataset.prdp = "ballot-title";
    this.rankMode = button("rank by clicks", "each click gives the next rank: best first (click again to unrank)",
                           () => this.setMode("rank"), "ballot-mode-rank");
    this.bestWorstMode = button("best / worst", "mark only the best and the worst image",
                                () => this.setMode("bestworst"), "ballot-mode-bestworst");
    head.append(this.title, this.rankMode, this.bestWorstMode);
    this.prompt = element("div", "prdp-ballot-prompt", "");
    this.prompt.dataset.prdp = "ballot-prompt";
    this.images = element("div", "prdp-ballot-images");
    this.images.dataset.prdp = "ballot-images";
    const actions = element("div", "prdp-ballot-actions");
    this.done = button("Done with this prompt (Enter)", "take this prompt's marks and go to the next prompt",
                       () => this.act(() => this.state.submitPrompt()), "ballot-done");
    this.done.classList.add("prdp-primary");
    this.skipButton = button("Skip (S)", "no preference: this prompt gives PRDP no pairs",
                             () => this.act(() => this.state.skip()), "ballot-skip");
    this.undoButton = button("Undo (⌫)", "take back the last click, answer or skip",
                             () => this.act(() => (this.state.undo() ? "" : "nothing to undo")), "ballot-undo");
    this.dots = element("div", "prdp-ballot-dots");
    actions.append(this.done, this.skipButton, this.undoButton, this.dots);
    this.help = element("div", "prdp-ballot-help", "");
    this.error = element("div", "prdp-ballot-error", "");
    this.error.dataset.prdp = "ballot-error";
    this.root.append(head, this.prompt, this.images, actions, this.help, this.error);
    this.root.addEventListener("keydown", (event) => this.onKey(event));
    this.root.addEventListener("pointerdown", () => this.root.focus({ preventScroll: true }));
  }

  get id() { return this.state?.id ?? null; }

  show(ballot) {
    if (this.state?.id === ballot.id) return;
    this.state = new BallotState(ballot, this.state?.mode);
    this.sending = false;
    this.error.textContent = "";
    this.root.hidden = false;
    this.render();
  }

  hide() {
    this.state = null;
    this.sending = false;
    this.root.hidden = true;
    this.images.replaceChildren();
    closeEnlarged();
  }

  setMode(mode) {
    if (!this.state) return;
    this.state.setMode(mode);
    this.render();
  }

  /** Run one change of the state; show its message; post when every prompt has its answer. */
  act(change) {
    if (!this.state || this.sending) return;
    const problem = change();
    this.error.textContent = problem || "";
    this.render();
    if (!problem && this.state.complete()) this.submit();
  }

  onKey(event) {
    if (!this.state || event.ctrlKey || event.metaKey || event.altKey) return;
    if (this.sending) { event.preventDefault(); event.stopPropagation(); return; }
    let result = { handled: false };
    this.act(() => { result = this.state.key(event.key); return result.error; });
    if (result.handled) { event.preventDefault(); event.stopPropagation(); }
  }

  async submit() {
    const state = this.state;
    this.sending = true;
    this.title.textContent = "sending your choices ...";
    let outcome;
    try {
      outcome = await this.send(state.answerUrl, state.body());
    } catch (error) {
      outcome = { ok: false, error: String(error?.message || error) };
    }
    if (this.state !== state) return;          // another ballot came meanwhile
    this.sending = false;
    if (outcome.ok) {
      this.hide();
      this.onChange("sent");
      return;
    }
    const refused = `your choices were not taken: ${outcome.error || "the server refused them"}`;
    this.error.textContent = refused;
    this.render();
    this.onChange("refused", refused);
    await this.refresh(outcome);        // the ballot again, or none (answered elsewhere: 409)
  }

  render() {
    const state = this.state;
    if (!state) return;
    const k = state.current;
    this.title.textContent = `${state.phaseText()} · prompt ${k + 1} of ${state.prompts.length}`;
    this.rankMode.classList.toggle("prdp-on", state.mode === "rank");
    this.bestWorstMode.classList.toggle("prdp-on", state.mode === "bestworst");
    const answered = state.answers[k];
    this.prompt.textContent = `“${state.prompts[k]}”` + (answered?.skip ? "  (skipped)" : answered ? "  (answered)" : "");
    const labels = state.labels(k);
    this.images.style.gridTemplateColumns = `repeat(${ballotColumns(state.count)}, minmax(0, 1fr))`;
    this.images.replaceChildren(...(state.images[k] || []).map((url, i) => this.figure(url, i, labels[i])));
    this.dots.replaceChildren(...state.prompts.map((text, index) => {
      const dot = element("span");
      dot.title = `prompt ${index + 1}: ${text}`;
      dot.classList.toggle("prdp-done", state.answers[index] !== null);
      dot.classList.toggle("prdp-current", index === k);
      dot.addEventListener("click", (event) => { event.stopPropagation(); state.go(index); this.render(); });
      return dot;
    }));
    this.help.textContent = state.mode === "rank"
      ? `click the best image first, then the next best ... (click again to unrank); ${state.count === 2 ? "one click ranks both" : `ranking ${state.count - 1} ranks the last too`}. Keys: 1-${state.count} rank, Enter done, S skip, ⌫ undo`
      : `mark the best and the worst (first click best, then worst). Keys: 1-${state.count} mark, Enter done, S skip, ⌫ undo`;
    this.onChange("render");
  }

  figure(url, i, label) {
    const state = this.state;
    const figure = element("figure");
    figure.dataset.prdp = "ballot-image";
    figure.dataset.index = String(i);
    const src = this.resolve(url);
    const image = element("img");
    image.src = src;
    image.alt = `image ${i + 1}`;
    image.draggable = false;
    const caption = `image ${i + 1} of “${state.prompts[state.current]}”`;
    figure.title = `${caption}: click to ${state.mode === "rank" ? "rank it next (again: unrank)" : "mark it"}`;
    const badge = element("div", "prdp-ballot-badge", String(i + 1));
    if (state.mode === "rank" && label) {
      badge.textContent = `#${label}`;
      badge.classList.add("prdp-mark");
      figure.classList.add("prdp-ranked");
    } else if (label === "best" || label === "worst") {
      badge.textContent = `${i + 1} ${label}`;
      badge.classList.add(label === "best" ? "prdp-mark" : "prdp-worst-mark");
      figure.classList.add(`prdp-${label}`);
    }
    badge.dataset.prdp = "ballot-badge";
    const zoom = button("⤢", "enlarge (Esc closes)", () => showEnlarged(src, caption), "ballot-zoom");
    zoom.classList.add("prdp-zoom");
    figure.append(image, badge, zoom);
    if (state.mode === "bestworst") {
      const roles = element("div", "prdp-ballot-roles");
      roles.append(button("best", "the best image", () => this.act(() => state.mark("best", i))),
                   button("worst", "the worst image", () => this.act(() => state.mark("worst", i))));
      figure.append(roles);
    }
    figure.addEventListener("click", (event) => { event.stopPropagation(); this.act(() => state.pick(i)); });
    figure.addEventListener("dblclick", (event) => { event.stopPropagation(); showEnlarged(src, caption); });
    return figure;
  }
}

/** The Score Images node's text, as a DOM widget (never drawn over the node's widgets). */
export function scoreTextElement() {
  const root = element("div", "prdp-score-text prdp-muted", "scores appear here after a run");
  root.dataset.prdp = "score-text";
  return root;
}
