// comfyui-prdp: the live training dashboard (plain DOM, no canvas drawing), shown in a DOM
// widget so it works in the classic canvas and in the Nodes 2.0 (Vue) renderer alike.
// This module only builds and updates elements; web/prdp.js wires it to the nodes and events.

const STYLE_ID = "prdp-dashboard-style";
const SVG = "http://www.w3.org/2000/svg";
export const DASHBOARD_MIN_HEIGHT = 380;
export const SCORE_TEXT_MIN_HEIGHT = 76;

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
  constructor(onStop) {
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
    this.root.append(head, this.bar, this.curve, this.metricsLine, this.warnings, this.samplesTitle, this.samples,
                     this.message);
    drawCurve(this.curve, [], 0);
  }

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
    const parts = [detail.phase || detail.status || "", epoch, formatEta(detail.eta_seconds)].filter(Boolean);
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

/** The Score Images node's text, as a DOM widget (never drawn over the node's widgets). */
export function scoreTextElement() {
  const root = element("div", "prdp-score-text prdp-muted", "scores appear here after a run");
  root.dataset.prdp = "score-text";
  return root;
}
