// The dashboard: polls the JSON API and drives it (create, start, pause, stop, delete).
// Every figure shown comes from the API; nothing is kept here but the selection.

import {call, download, experimentPath, setToken, token} from "./api.js";
import {
  MAX_DEVICE_ROWS, el, explanations, renderCharts, renderDevices, renderExperiments, renderLive,
  renderRounds,
  renderVersions, tickDeadline,
} from "./views.js";

const POLL_MS = 1000;
const TICK_MS = 250;
const $ = id => document.getElementById(id);

let selected = decodeURIComponent(location.hash.slice(1)) || null;
let refreshing = false;
let examplesLoaded = false;
const shown = new Map();  // section -> JSON last drawn: unchanged sections are not redrawn

function changed(section, data) {
  const json = JSON.stringify(data);
  if (shown.get(section) === json) return false;
  shown.set(section, json);
  return true;
}

/** Show a message (or an API error with every problem it lists) in a message box. */
function say(target, text, cls = "") {
  target.replaceChildren(el("p", {class: cls}, text));
}

function fail(target, error) {
  const problems = (error.problems || []).filter(p => p !== error.message);
  target.replaceChildren(el("p", {class: "error"}, error.message),
    ...(problems.length ? [el("ul", {class: "error"}, ...problems.map(p => el("li", {}, p)))] : []));
}

function select(id) {
  selected = id;
  history.replaceState(null, "", id ? "#" + encodeURIComponent(id) : location.pathname);
  $("control-status").replaceChildren();
  shown.clear();
  refresh();
}

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    $("token").placeholder = token() ? "signed in" : "viewer or admin token";
    if (!token()) {
      $("status").textContent = "Sign in with a viewer token (to watch) or the admin token "
        + "(to create and control experiments).";
      return;
    }
    // Rounds first: the experiment read after them is as new or newer (its version too).
    const rounds = selected ? await roundsOf(selected) : null;
    // One page of devices and the counts of all: a fleet of 10,000 is not sent every poll.
    const [{experiments}, devicePage] = await Promise.all([
      call("GET", "/experiments"), call("GET", `/devices?limit=${MAX_DEVICE_ROWS}`)]);
    const {devices, counts} = devicePage;
    if (!examplesLoaded) loadExamples();
    if (changed("experiments", [experiments, selected])) {
      renderExperiments($("experiments"), experiments, selected, select);
    }
    if (changed("devices", devicePage)) {
      renderDevices($("devices"), $("device-summary"), devices, counts);
    }
    const exp = rounds && experiments.find(e => e.id === selected);
    if (exp) showExperiment(exp, rounds);
    $("experiment").hidden = !exp;
    $("nothing-selected").hidden = Boolean(exp);
    $("status").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
    $("status").className = "";
  } catch (error) {
    $("status").textContent = error.message;
    $("status").className = "error";
  } finally {
    refreshing = false;
  }
}

/** The selected experiment's rounds, or null once it is gone. */
async function roundsOf(id) {
  try {
    return (await call("GET", experimentPath(id, "/rounds"))).rounds;
  } catch (error) {
    if (error.status === 404) return null;
    throw error;
  }
}

function showExperiment(exp, rounds) {
  if (changed("selected", exp.id)) $("round-count").value = exp.config.rounds.count;
  const inFlight = rounds.find(r => r.state === "training");
  const panel = $("experiment");
  panel.dataset.experiment = exp.id;
  panel.dataset.state = exp.state;
  $("experiment-title").textContent = exp.name;
  $("experiment-meta").textContent = [exp.id, exp.state,
    `round ${exp.current_round} of ${exp.rounds_requested}`, `model v${exp.model_version}`,
    exp.config.strategy.name].join(" \u00b7 ");
  if (changed("explanation", [exp.waiting, rounds.map(r => [r.state, r.reason])])) {
    $("explanation").replaceChildren(...explanations(exp, rounds));
  }
  if (changed("live", inFlight || null)) renderLive($("live"), inFlight);
  const ended = rounds.filter(r => r.state !== "training");
  if (changed("rounds", rounds)) renderRounds($("rounds"), rounds);
  if (changed("charts", ended)) renderCharts($("charts"), rounds);
  if (changed("versions", [exp.id, exp.model_version, ended.length])) {
    renderVersions($("versions"), exp, rounds);
  }
  $("pause").disabled = exp.state === "idle";
  $("stop").disabled = exp.state === "idle";
  $("delete").disabled = Boolean(inFlight);
}

async function loadExamples() {
  examplesLoaded = true;
  try {
    const {configs} = await call("GET", "/configs");
    $("example").replaceChildren(el("option", {value: ""}, "choose..."),
      ...configs.map(c => el("option", {value: c.name}, c.file)));
  } catch (error) {
    examplesLoaded = false;
  }
}

/** Run an admin action, report its outcome next to the controls, and redraw. */
async function act(what, action) {
  const box = $("control-status");
  try {
    await action();
    say(box, what);
  } catch (error) {
    fail(box, error);
  }
  refresh();
}

function wire() {
  $("login").addEventListener("submit", event => {
    event.preventDefault();
    setToken($("token").value.trim());
    $("token").value = "";
    shown.clear();
    refresh();
  });
  $("logout").addEventListener("click", () => {
    setToken("");
    location.reload();
  });
  $("example").addEventListener("change", async () => {
    const name = $("example").value;
    if (!name) return;
    try {
      const {config} = await call("GET", "/configs/" + encodeURIComponent(name));
      $("config").value = JSON.stringify(config, null, 2);
      $("create-status").replaceChildren();
    } catch (error) {
      fail($("create-status"), error);
    }
  });
  $("config-file").addEventListener("change", async () => {
    const file = $("config-file").files[0];
    if (!file) return;
    try {
      $("config").value = JSON.stringify(JSON.parse(await file.text()), null, 2);
      $("create-status").replaceChildren();
    } catch (error) {
      say($("create-status"), `${file.name} is not JSON: ${error.message}`, "error");
    }
  });
  $("create").addEventListener("submit", async event => {
    event.preventDefault();
    let config;
    try {
      config = JSON.parse($("config").value);
    } catch (error) {
      say($("create-status"), "The config is not JSON: " + error.message, "error");
      return;
    }
    try {
      const {id} = await call("POST", "/experiments", config);
      say($("create-status"), "Created " + id + ".");
      select(id);
    } catch (error) {
      fail($("create-status"), error);
    }
  });
  $("controls").addEventListener("submit", event => {
    event.preventDefault();
    const count = Number($("round-count").value);
    act(`Queued ${count} round(s).`,
      () => call("POST", experimentPath(selected, "/rounds"), {count}));
  });
  $("pause").addEventListener("click", () => act("Paused: the round in flight finishes, "
    + "no more start.", () => call("POST", experimentPath(selected, "/pause"))));
  $("stop").addEventListener("click", () => act("Stopped.",
    () => call("POST", experimentPath(selected, "/stop"))));
  $("delete").addEventListener("click", () => {
    const id = selected;
    if (!confirm(`Delete ${id} and its rounds? Its model versions stay in the store.`)) return;
    act(`Deleted ${id}.`, async () => {
      await call("DELETE", experimentPath(id));
      select(null);
    });
  });
  $("versions").addEventListener("click", event => {
    const link = event.target.closest("a.download");
    if (!link) return;
    event.preventDefault();
    const path = link.getAttribute("href").replace(/^api\/v1/, "");
    download(path, link.getAttribute("download")).catch(error => fail($("control-status"), error));
  });
  window.addEventListener("hashchange", () => select(decodeURIComponent(location.hash.slice(1))));
}

wire();
refresh();
setInterval(refresh, POLL_MS);
setInterval(() => tickDeadline($("live")), TICK_MS);
