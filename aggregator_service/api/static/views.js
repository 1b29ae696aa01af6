// What the dashboard shows, built from the API's JSON with textContent only:
// names from configs and devices never become markup.

import {lineChart} from "./charts.js";

const DASH = "\u2013";
export const MAX_DEVICE_ROWS = 200;
const MAX_VERSIONS = 30;

/** Build an element: attributes (class, data-*, ...) and children (nodes or text). */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

function num(value, digits) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : DASH;
}

export function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString();
}

function ago(seconds) {
  if (!seconds) return "never";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return clock(seconds);
}

function reasons(rejected) {
  const entries = Object.entries(rejected || {});
  return entries.length ? entries.map(([reason, n]) => `${reason}: ${n}`).join(", ") : DASH;
}

function state(text) {
  return el("span", {class: "state-" + text}, text);
}

function table(target, head, rows) {
  const header = el("tr", {}, ...head.map(([label, cls]) => el("th", {class: cls}, label)));
  target.replaceChildren(el("thead", {}, header), el("tbody", {}, ...rows));
}

/** The experiments list; a click on a row calls select(id). */
export function renderExperiments(target, experiments, selected, select) {
  const rows = experiments.map(exp => {
    const row = el("tr", {class: "selectable" + (exp.id === selected ? " selected" : ""),
      "data-experiment": exp.id},
      el("td", {}, exp.name, el("br"), el("small", {class: "meta"}, exp.id)),
      el("td", {}, state(exp.state)),
      el("td", {}, `${exp.current_round}/${exp.rounds_requested}`),
      el("td", {}, "v" + exp.model_version));
    row.addEventListener("click", () => select(exp.id));
    return row;
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: 4}, "No experiments yet.")));
  table(target, [["experiment"], ["state"], ["rounds"], ["model"]], rows);
}

/** Why nothing runs, or why the last round failed, in words. */
export function explanations(exp, rounds) {
  const lines = [];
  const waiting = exp.waiting;
  if (waiting) {
    lines.push(["note", "waiting",
      `Waiting for ${waiting.needed} devices, ${waiting.online} online.`]);
    if (waiting.grace_until) {
      lines.push(["note", "grace", "The service restarted: devices that were online get "
        + `until ${clock(waiting.grace_until)} to check in again.`]);
    }
  }
  const ended = rounds.filter(r => r.state !== "training");
  const last = ended[ended.length - 1];
  if (last && last.state === "abandoned") {
    lines.push(["error", "abandoned", `Round ${last.round} was abandoned: ${last.reason}.`]);
  }
  const abandoned = ended.filter(r => r.state === "abandoned").length;
  if (abandoned > 1) lines.push(["error", "abandoned-count", `${abandoned} rounds abandoned.`]);
  return lines.map(([cls, key, text]) => el("p", {class: cls, "data-explains": key}, text));
}

/** The round in flight: counts and bars against its target and deadline. */
export function renderLive(target, rnd) {
  if (!rnd) {
    target.replaceChildren();
    return;
  }
  const p = rnd.progress || {phase: "training", reported: rnd.reported, accepted: rnd.accepted,
    target: rnd.selected, minimum: 0, remaining_s: 0, deadline_at: rnd.deadline_at};
  const total = Math.max(rnd.deadline_at - rnd.started_at, 0.001);
  const deadline = el("progress", {max: total.toFixed(3), value: (total - p.remaining_s).toFixed(3),
    "data-deadline": (Date.now() / 1000 + p.remaining_s).toFixed(3), "data-total": total});
  const left = el("span", {"data-left": ""}, `${Math.ceil(p.remaining_s)} s left`);
  const accepted = el("progress", {max: p.target, value: Math.min(p.accepted, p.target)});
  target.replaceChildren(
    el("h3", {}, `Round ${rnd.round} in flight: `, el("span", {"data-phase": p.phase}, p.phase)),
    el("div", {class: "counts"},
      el("span", {}, "selected ", el("b", {"data-count": "selected"}, rnd.selected)),
      el("span", {}, "reported ", el("b", {"data-count": "reported"}, p.reported)),
      el("span", {}, "accepted ", el("b", {"data-count": "accepted"}, p.accepted)),
      el("span", {}, "not accepted ", el("b", {}, Math.max(p.reported - p.accepted, 0))),
      el("span", {}, "silent ", el("b", {}, Math.max(rnd.selected - p.reported, 0)))),
    el("div", {class: "bar"}, el("span", {}, "accepted"), accepted,
      el("span", {}, `${p.accepted} of ${p.target} (minimum ${p.minimum})`)),
    el("div", {class: "bar"}, el("span", {}, "deadline"), deadline, left),
    el("p", {class: "meta"}, "Rejections by reason and dropped devices are known once the "
      + "round ends."));
}

/** Count down the deadline bar between two polls. */
export function tickDeadline(target) {
  const bar = target.querySelector("progress[data-deadline]");
  if (!bar) return;
  const remaining = Math.max(Number(bar.dataset.deadline) - Date.now() / 1000, 0);
  bar.value = Number(bar.dataset.total) - remaining;
  target.querySelector("[data-left]").textContent = `${Math.ceil(remaining)} s left`;
}

/** Accuracy and loss per committed round, and epsilon where the rounds report it. */
export function renderCharts(target, rounds) {
  const committed = rounds.filter(r => r.state === "committed");
  const series = key => committed
    .filter(r => typeof r.metrics[key] === "number" && Number.isFinite(r.metrics[key]))
    .map(r => [r.round, r.metrics[key]]);
  const charts = [lineChart("accuracy", "accuracy", series("accuracy"), {fromZero: true}),
    lineChart("loss", "loss", series("loss"), {fromZero: true})];
  const epsilon = series("epsilon");
  if (epsilon.length) charts.push(lineChart("epsilon", "privacy spent (\u03b5)", epsilon));
  target.replaceChildren(...charts);
}

/** Every round: counts, rejections by reason, metrics, and why it was abandoned. */
export function renderRounds(target, rounds) {
  const dp = rounds.some(r => typeof r.metrics.epsilon === "number");
  const head = [["round"], ["state", "text"], ["selected"], ["reported"], ["accepted"],
    ["rejected", "text"], ["dropped"], ["loss"], ["accuracy"]];
  if (dp) head.push(["\u03b5"]);
  head.push(["seconds"], ["reason", "text"]);
  const rows = rounds.slice().reverse().map(r => {
    const live = r.state === "training";
    // An abandoned round's updates went into no version: its reason says how many arrived.
    const cells = [r.round, state(r.state), r.selected, live ? DASH : r.reported,
      r.state === "committed" ? r.accepted : DASH, live ? DASH : reasons(r.rejected),
      live ? DASH : r.dropped, num(r.metrics.loss, 4), num(r.metrics.accuracy, 4)];
    if (dp) cells.push(num(r.metrics.epsilon, 3));
    cells.push(num(r.duration_s, 1), r.reason || "");
    const text = new Set([1, 5, cells.length - 1]);
    return el("tr", {"data-round": r.round, "data-state": r.state},
      ...cells.map((c, i) => el("td", {class: text.has(i) ? "text" : null}, c)));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", {class: "text", colspan: head.length},
    "No rounds yet: start some.")));
  table(target, head, rows);
}

/** The model versions, newest first, each with a download link. */
export function renderVersions(target, exp, rounds) {
  const made = new Map(rounds.filter(r => r.version !== null).map(r => [r.version, r]));
  const versions = [];
  for (let v = exp.model_version; v >= 0 && versions.length < MAX_VERSIONS; v--) versions.push(v);
  if (versions[versions.length - 1] !== 0) versions.push(0);
  target.replaceChildren(...versions.map(v => {
    const rnd = made.get(v);
    const about = v === 0 ? "initial" : rnd ? `round ${rnd.round}, accuracy `
      + num(rnd.metrics.accuracy, 3) : "";
    const href = `api/v1/experiments/${encodeURIComponent(exp.id)}/model?version=${v}`;
    const link = el("a", {href, class: "download", "data-version": v,
      download: `${exp.id}-v${v}.safetensors`}, "download");
    return el("li", {}, `v${v} `, el("span", {class: "meta"}, about ? `(${about}) ` : ""), link);
  }));
}

/** The devices (one page of them): platform, state, last check-in, rounds served. */
export function renderDevices(target, summary, devices, counts) {
  const total = counts.online + counts.offline + counts.revoked;
  summary.textContent = total
    ? `${total} devices: ${counts.online} online, ${counts.offline} offline`
      + (counts.revoked ? `, ${counts.revoked} revoked` : "")
    : "No devices registered yet.";
  const rows = devices.map(d => el("tr", {"data-device": d.id},
    el("td", {}, d.id), el("td", {}, d.platform), el("td", {}, state(d.state)),
    el("td", {}, ago(d.last_seen)), el("td", {}, d.rounds_served)));
  if (total > devices.length) {
    rows.push(el("tr", {}, el("td", {colspan: 5}, `and ${total - devices.length} more`)));
  }
  table(target, [["device"], ["platform"], ["state"], ["last seen"], ["rounds"]], rows);
}
