// Talking to the API with the session cookie, and building DOM safely (text is never parsed as HTML).

let csrfToken = null;
let onSignedOut = () => {};

/** Remember the session's CSRF token; state-changing requests send it in X-CSRF-Token. */
export function setSession(info) {
  csrfToken = info ? info.csrf_token : null;
}

/** Called when the API answers 401: the session ended (expired, signed out elsewhere, keys rotated). */
export function whenSignedOut(callback) {
  onSignedOut = callback;
}

/** An error answer of the API, in its OpenAI shape: code, param, message and (for uploads) details. */
export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `the server answered ${status}`);
    this.status = status;
    this.code = error.code || 'http_error';
    this.param = error.param || null;
    this.details = error.details || null;
  }
}

/**
 * Call the API: `json` is sent as a JSON body, `form` as multipart. Resolves to the parsed answer;
 * rejects with ApiError (a 401 also returns the page to the sign-in form).
 */
export async function api(path, { method = 'GET', json, form, headers = {}, signal } = {}) {
  const sent = { Accept: 'application/json', ...headers };
  if (!['GET', 'HEAD'].includes(method) && csrfToken) sent['X-CSRF-Token'] = csrfToken;
  let body;
  if (json !== undefined) {
    sent['Content-Type'] = 'application/json';
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  let response;
  try {
    response = await fetch(path, { method, headers: sent, body, credentials: 'same-origin', signal });
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, { error: { code: 'network_error', message: 'the server could not be reached; check your connection and try again' } });
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = text; }
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401 && path !== '/ui/session') onSignedOut(error);
    throw error;
  }
  return data;
}

/**
 * Build an element: el('a', {href: '/x', class: 'link'}, 'text', child). Attributes starting with "on"
 * become listeners; `null`/`false` attributes and children are skipped; strings become text nodes.
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') node.addEventListener(name.slice(2), value);
    else if (name === 'dataset') Object.assign(node.dataset, value);
    else if (value === true) node.setAttribute(name, '');
    else node.setAttribute(name, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function setChildren(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

/** A paragraph announcing an error to screen readers, with the field it concerns. */
export function errorBox(error) {
  const where = error.param ? ` (${error.param})` : '';
  return el('p', { class: 'error', role: 'alert' }, `${error.message}${where}`);
}

// -- formatting ------------------------------------------------------------------------------------

export function pct(x) {
  return x === null || x === undefined ? 'n/a' : `${(100 * x).toFixed(1)}%`;
}

export function num(x, digits = 4) {
  return x === null || x === undefined ? 'n/a' : Number(x).toFixed(digits);
}

/** "12 s ago", "5 min ago", "3 h ago", "2 d ago". */
export function age(unixSeconds, now = Date.now() / 1000) {
  const s = Math.max(0, Math.round(now - unixSeconds));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

export function isoTime(unixSeconds) {
  return unixSeconds ? new Date(unixSeconds * 1000).toISOString() : '';
}

export function localTime(unixSeconds) {
  return unixSeconds ? new Date(unixSeconds * 1000).toLocaleString() : '—';
}

export const TERMINAL = ['succeeded', 'failed', 'cancelled'];
export const TRAINING_STAGES = ['router_pretraining', 'molora', 'uco', 'train'];

/** "step 3 of 9 (molora)" from a job's progress. */
export function progressText(job) {
  const p = job.progress;
  if (job.status === 'queued') return job.queue_position ? `waiting: place ${job.queue_position} in the queue` : 'waiting';
  if (!p || !p.total_steps) return job.stage || '—';
  return `step ${p.step} of ${p.total_steps}${p.stage ? ` (${p.stage})` : ''}`;
}

/** A <progress> for a job (full once it succeeded, indeterminate while nothing is known). */
export function progressBar(job, label) {
  const p = job.progress;
  const bar = el('progress', { 'aria-label': label, max: 1 });
  if (job.status === 'succeeded') bar.value = 1;
  else if (p && p.total_steps) bar.value = Math.min(1, p.step / p.total_steps);
  else if (TERMINAL.includes(job.status)) bar.value = 0;
  else bar.removeAttribute('value');
  return bar;
}

/** Short name of a model spec: the last path part of a local directory. */
export function modelName(spec) {
  if (!spec) return '—';
  return spec.includes('/') && spec.startsWith('/') ? spec.split('/').filter(Boolean).pop() : spec;
}
