// The dashboard's one way to the service: the JSON API under api/v1, with the
// token the user typed (kept in this tab's sessionStorage, never in a URL or cookie).

const KEY = "fedmq-token";
const ROOT = "api/v1";

/** An API error: its HTTP status, the API's code, message and problems. */
export class ApiError extends Error {
  constructor(status, code, message, problems) {
    super(message);
    this.status = status;
    this.code = code;
    this.problems = problems || [];
  }
}

export function token() {
  return sessionStorage.getItem(KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

function headers(json) {
  const h = {Authorization: "Bearer " + token()};
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function failure(response) {
  let error = {code: "http_" + response.status, message: response.statusText};
  try {
    error = (await response.json()).error || error;
  } catch (_) { /* not JSON: keep the status line */ }
  if (response.status === 401) {
    error.message = "this needs " + (error.message.includes("admin") ? "the admin" : "a viewer")
      + " token";
  }
  return new ApiError(response.status, error.code, error.message, error.problems);
}

/** Call the API; return its JSON answer (null for 204). */
export async function call(method, path, body) {
  const json = body !== undefined;
  const response = await fetch(ROOT + path, {
    method,
    headers: headers(json),
    body: json ? JSON.stringify(body) : undefined,
    cache: "no-store",
  });
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

/** Path of an experiment (or of something under it). */
export function experimentPath(id, rest = "") {
  return "/experiments/" + encodeURIComponent(id) + rest;
}

/** Fetch a file with the token and hand it to the browser as a download. */
export async function download(path, filename) {
  const response = await fetch(ROOT + path, {headers: headers(false), cache: "no-store"});
  if (!response.ok) throw await failure(response);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
