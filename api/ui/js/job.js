// One job: status and stage, live loss curves fed by the SSE events, the importance heat map, the
// evaluation report, the adapter download and cancel.

import {
  api, el, errorBox, isoTime, localTime, num, pct, progressBar, progressText, setChildren, TERMINAL,
} from './api.js';
import { accuracyChart, importanceHeatmap, lossChart } from './charts.js';

const EVENT_TYPES = ['status', 'stage', 'progress', 'message', 'importance', 'eval', 'done', 'checkpoint', 'warning', 'error'];
const MAX_LOG = 400;
const POLL_MS = 4000;
const MAX_FAILURES_SHOWN = 20;

export async function renderJob(main, { params }) {
  const [jobId] = params;
  document.title = `${jobId} · citi`;
  let job;
  try {
    job = await api(`/jobs/${encodeURIComponent(jobId)}`);
  } catch (error) {
    setChildren(main, el('h1', {}, `Job ${jobId}`), errorBox(error), el('p', {}, el('a', { href: '/ui/jobs' }, 'Back to the jobs')));
    return null;
  }

  // -- layout --------------------------------------------------------------------------------------
  const summary = el('dl', { class: 'facts', id: 'job-summary' });
  const actions = el('div', { class: 'actions', id: 'job-actions' });
  const actionStatus = el('div', { 'aria-live': 'polite' });
  const lossCanvas = el('canvas', { id: 'loss-chart', role: 'img', 'aria-label': 'Training loss and routing loss by step' });
  const lossNote = el('p', { id: 'loss-summary', class: 'muted', 'aria-live': 'polite' }, 'Waiting for the first training step…');
  const importanceBox = el('div', { id: 'importance' }, el('p', { class: 'muted' }, 'Loading…'));
  const reportBox = el('div', { id: 'report' }, el('p', { class: 'muted' }, 'The report appears when the job has succeeded.'));
  const log = el('ol', { id: 'event-log', class: 'log', role: 'log', 'aria-label': 'Job events' });
  const streamNote = el('p', { class: 'muted', id: 'stream-state' });

  setChildren(main,
    el('div', { class: 'page-head' },
      el('h1', {}, 'Job ', el('code', {}, jobId)),
      el('a', { href: '/ui/jobs' }, '← All jobs')),
    el('section', { 'aria-labelledby': 'h-summary' }, el('h2', { id: 'h-summary', class: 'visually-hidden' }, 'Summary'), summary, actions, actionStatus),
    el('section', { 'aria-labelledby': 'h-loss' },
      el('h2', { id: 'h-loss' }, 'Training curves'),
      el('div', { class: 'chart-box' }, lossCanvas), lossNote),
    el('section', { 'aria-labelledby': 'h-importance' },
      el('h2', { id: 'h-importance' }, 'Component importance'),
      importanceBox),
    el('section', { 'aria-labelledby': 'h-report' },
      el('h2', { id: 'h-report' }, 'Evaluation report'),
      reportBox),
    el('section', { 'aria-labelledby': 'h-events' },
      el('h2', { id: 'h-events' }, 'Events'), streamNote, log));

  const loss = lossChart(lossCanvas);
  let importanceLoaded = false;
  let importanceRequest = null;
  let reportLoaded = false;
  let stream = null;
  let timer = null;
  let closed = false;

  // -- summary and actions -------------------------------------------------------------------------
  function renderSummary() {
    const fact = (term, ...value) => [el('dt', {}, term), el('dd', {}, ...value)];
    setChildren(summary,
      fact('Status', el('span', { id: 'job-status', class: `status status-${job.status}` }, job.status.replace('_', ' '))),
      fact('Stage', el('span', { id: 'job-stage' }, job.stage || '—')),
      fact('Progress', progressBar(job, 'job progress'), ' ', el('span', { id: 'job-progress' }, progressText(job))),
      job.queue_position ? fact('Place in queue', String(job.queue_position)) : null,
      fact('Model', el('code', {}, job.model)),
      fact('Method', (job.method && job.method.type) || '—'),
      fact('Budget', budgetText(job.budget)),
      fact('Created', el('time', { datetime: isoTime(job.created_at) }, localTime(job.created_at))),
      job.finished_at ? fact('Finished', el('time', { datetime: isoTime(job.finished_at) }, localTime(job.finished_at))) : null,
      job.estimated_finish && !TERMINAL.includes(job.status) ? fact('Estimated finish', localTime(job.estimated_finish)) : null,
      job.trained_tokens ? fact('Trained tokens', job.trained_tokens.toLocaleString()) : null,
      job.fine_tuned_model ? fact('Fine-tuned model', el('code', { id: 'fine-tuned-model' }, job.fine_tuned_model)) : null,
      job.selected_components ? fact('Chosen components', componentsText(job.selected_components)) : null,
      job.error ? fact('Error', el('span', { class: 'error', id: 'job-error' }, `${job.error.message} (${job.error.code})`)) : null);

    const children = [];
    if (!TERMINAL.includes(job.status)) {
      children.push(el('button', { type: 'button', id: 'cancel-job', class: 'danger', disabled: job.status === 'cancelling', onclick: cancel },
        job.status === 'cancelling' ? 'Cancelling…' : 'Cancel job'));
    }
    if (job.adapter_url) {
      children.push(el('a', { class: 'button', id: 'download-adapter', href: job.adapter_url, download: '' }, 'Download adapter (.tar.gz)'));
      if (job.fine_tuned_model) {
        children.push(el('a', { class: 'button secondary', href: `/ui/chat?model=${encodeURIComponent(job.fine_tuned_model)}` }, 'Try it in the chat'));
      }
    }
    if (job.report_url) children.push(el('a', { class: 'button secondary', href: `${job.report_url}?format=md` }, 'Report (Markdown)'));
    setChildren(actions, children);
  }

  async function cancel() {
    if (!window.confirm(`Cancel job ${jobId}? A running job stops within one training step and keeps no adapter.`)) return;
    try {
      job = await api(`/jobs/${encodeURIComponent(jobId)}/cancel`, { method: 'POST' });
      setChildren(actionStatus, el('p', {}, `Cancel requested: the job is ${job.status}.`));
      renderSummary();
    } catch (error) {
      setChildren(actionStatus, errorBox(error));
    }
  }

  async function refreshJob() {
    try {
      job = await api(`/jobs/${encodeURIComponent(jobId)}`);
    } catch (error) {
      if (error.status) setChildren(actionStatus, errorBox(error));
      return;
    }
    renderSummary();
    if (!importanceLoaded && (job.selected_components || job.status === 'succeeded')) loadImportance();
    if (TERMINAL.includes(job.status)) finish();
  }

  // -- importance ----------------------------------------------------------------------------------
  function loadImportance() {
    if (importanceLoaded) return Promise.resolve();
    // One request at a time: status, checkpoint and poll updates may all ask at once.
    importanceRequest = importanceRequest || (async () => {
      try {
        const importance = await api(`/ui/api/jobs/${encodeURIComponent(jobId)}/importance`);
        importanceLoaded = true;
        renderImportance(importance);
      } catch (error) {
        setChildren(importanceBox, error.status === 409 ? el('p', { class: 'muted' }, error.message) : errorBox(error));
      } finally {
        importanceRequest = null;
      }
    })();
    return importanceRequest;
  }

  function renderImportance(importance) {
    const layers = new Set(importance.components.map((r) => r.layer)).size;
    const describe = (which) => `Heat map of ${which} over ${layers} layers and the module types; ` +
      `${importance.molora.length} MOLoRA components framed in white and marked M, ${importance.uco.length} UCO components framed in red and marked U. The table below lists the numbers.`;
    const tool = el('canvas', { id: 'heat-tool', role: 'img', 'aria-label': describe('tool importance M') });
    const general = el('canvas', { id: 'heat-general', role: 'img', 'aria-label': describe('general importance C') });
    const height = `${Math.max(220, 26 * layers + 90)}px`;
    const boxes = [el('div', { class: 'chart-box heat' }, tool), el('div', { class: 'chart-box heat' }, general)];
    for (const box of boxes) box.style.height = height;
    const molora = new Set(importance.molora);
    const uco = new Set(importance.uco);
    const rows = importance.components.map((r) => el('tr', {},
      el('th', { scope: 'row' }, el('code', {}, r.name)), el('td', {}, String(r.layer)), el('td', {}, r.module),
      el('td', { class: 'num' }, num(r.tool)), el('td', { class: 'num' }, num(r.general)),
      el('td', {}, [molora.has(r.name) && 'MOLoRA', uco.has(r.name) && 'UCO'].filter(Boolean).join(', ') || '—')));
    const n = importance.n_examples || {};
    setChildren(importanceBox,
      el('p', {}, `Scored on ${n.tool ?? '?'} tool and ${n.general ?? '?'} general examples. `,
        `${importance.molora.length} components get MOLoRA (highest tool importance), ${importance.uco.length} are fully fine-tuned as UCO (lowest general importance).`),
      el('div', { class: 'heat-pair' }, boxes),
      el('p', { class: 'legend' },
        el('span', { class: 'swatch swatch-molora', 'aria-hidden': 'true' }), ' M: MOLoRA ',
        el('span', { class: 'swatch swatch-uco', 'aria-hidden': 'true' }), ' U: UCO · colour: low (dark) to high (yellow) importance, scaled per panel'),
      el('details', {}, el('summary', {}, 'Importance as a table'),
        el('table', { id: 'importance-table' },
          el('thead', {}, el('tr', {}, ['Component', 'Layer', 'Module', 'Tool M', 'General C', 'Chosen'].map((h) => el('th', { scope: 'col' }, h)))),
          el('tbody', {}, rows))));
    importanceHeatmap(tool, importance, 'tool', 'tool importance M');
    importanceHeatmap(general, importance, 'general', 'general importance C');
  }

  // -- report --------------------------------------------------------------------------------------
  async function loadReport() {
    if (reportLoaded || !job.report_url) {
      if (TERMINAL.includes(job.status) && !job.report_url) {
        setChildren(reportBox, el('p', { class: 'muted' }, job.status === 'succeeded'
          ? 'This job has no evaluation report (evaluation was off, or there were no test examples).'
          : `No report: the job ${job.status}.`));
      }
      return;
    }
    reportLoaded = true;
    try {
      renderReport(await api(job.report_url));
    } catch (error) {
      reportLoaded = false;
      setChildren(reportBox, errorBox(error));
    }
  }

  function renderReport(report) {
    const s = report.summary || {};
    const tool = report.tool;
    const retention = report.retention;
    const fact = (term, value, id) => [el('dt', {}, term), el('dd', { id }, value)];
    const parts = [
      el('dl', { class: 'facts', id: 'report-summary' },
        fact('Tool-call accuracy', `${pct(s.tool_accuracy)} of ${s.n_test} cases`, 'report-tool-accuracy'),
        fact('Irrelevance accuracy (no call when none fits)', pct(s.irrelevance_accuracy)),
        fact('Replies that parse as calls', pct(s.parse_rate)),
        fact('General retention exp(−KL)', s.general_retention === null || s.general_retention === undefined
          ? 'not measured' : `${num(s.general_retention)} (${s.n_probes} probes)`, 'report-retention'),
        s.retention_with_tools !== null && s.retention_with_tools !== undefined
          ? fact('General retention with unrelated tools offered', num(s.retention_with_tools), 'report-retention-tools') : null,
        s.headline_retention !== null && s.headline_retention !== undefined
          ? fact('Headline retention (the lower of the two)', num(s.headline_retention), 'report-retention-headline') : null,
        fact('Mean KL(base ‖ tuned) per token', num(s.kl)),
        fact('Agreement with the base model', pct(s.agreement)),
        s.humaneval_nll_delta !== null && s.humaneval_nll_delta !== undefined
          ? fact('HumanEval NLL change', num(s.humaneval_nll_delta)) : null,
        report.calibration
          ? fact('Call threshold (served: a reply is a call only when this sure)',
            `${num(report.calibration.threshold)} logits, chosen on ${report.calibration.n_call_cases} held-out calls `
            + `and ${report.calibration.n_no_call_cases} requests no offered tool fits`, 'report-call-threshold') : null),
    ];
    if (tool && tool.per_category && Object.keys(tool.per_category).length) {
      const canvas = el('canvas', { id: 'accuracy-chart', role: 'img', 'aria-label': 'Tool-call accuracy by category (numbers in the table)' });
      const box = el('div', { class: 'chart-box small' }, canvas);
      box.style.height = `${Math.max(120, 34 * (Object.keys(tool.per_category).length + 1) + 50)}px`;
      parts.push(el('h3', {}, 'Tool-call accuracy by category'), box,
        el('table', { id: 'category-table' },
          el('thead', {}, el('tr', {}, ['Category', 'Cases', 'Correct', 'Accuracy'].map((h) => el('th', { scope: 'col' }, h)))),
          el('tbody', {}, Object.entries(tool.per_category).map(([cat, c]) => el('tr', {},
            el('th', { scope: 'row' }, cat), el('td', { class: 'num' }, String(c.n)), el('td', { class: 'num' }, String(c.correct)),
            el('td', { class: 'num' }, pct(c.accuracy)))))));
      requestAnimationFrame(() => accuracyChart(canvas, tool));
    }
    if (report.router) parts.push(...routerSeparation(report.router));
    if (tool && tool.failures && tool.failures.length) {
      parts.push(el('h3', {}, `Failures (${tool.failures.length})`),
        el('table', { id: 'failure-reasons' },
          el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'Reason'), el('th', { scope: 'col' }, 'Cases'))),
          el('tbody', {}, Object.entries(tool.failure_counts || {}).map(([reason, n]) => el('tr', {},
            el('th', { scope: 'row' }, reason), el('td', { class: 'num' }, String(n)))))),
        el('details', {}, el('summary', {}, `Failed cases (first ${Math.min(MAX_FAILURES_SHOWN, tool.failures.length)})`),
          el('ul', { class: 'failures' }, tool.failures.slice(0, MAX_FAILURES_SHOWN).map((f) => el('li', {},
            el('code', {}, f.id), ` (${f.category}): `, el('strong', {}, f.reason), `: ${f.detail}`,
            el('pre', {}, f.reply))))));
    }
    if (retention && retention.disagreements && retention.disagreements.length) {
      parts.push(el('details', {}, el('summary', {}, 'Where the tuned model answers differently from the base model'),
        el('ul', {}, retention.disagreements.slice(0, 10).map((d) => el('li', {},
          el('p', {}, el('strong', {}, 'Prompt: '), d.prompt),
          el('p', {}, el('strong', {}, 'Base: '), d.base),
          el('p', {}, el('strong', {}, 'Tuned: '), d.tuned))))));
    }
    setChildren(reportBox, parts);
  }

  // The router's diagnostic: mean backbone gate G(x)[0] (1: experts off) on general tokens and on tool-call tokens.
  function routerSeparation(router) {
    const kinds = [['general', 'General prompts'], ['general_with_tools', 'General prompts, unrelated tools offered'],
      ['tool_call', 'Tokens that write a tool call']];
    const mean = (k) => (router[k] && router[k].mean !== null && router[k].mean !== undefined ? num(router[k].mean) : 'n/a');
    const layers = Object.keys((router.general && router.general.per_layer) || (router.tool_call && router.tool_call.per_layer) || {});
    const perLayer = (k, name) => {
      const v = router[k] && router[k].per_layer ? router[k].per_layer[name] : undefined;
      return v === undefined || v === null ? 'n/a' : num(v);
    };
    return [
      el('h3', {}, 'Router separation'),
      el('p', { class: 'muted' }, 'Mean backbone gate of the MOLoRA routers: near 1 the experts are off (base behaviour), ' +
        'near 0 they are on. A router that does its job is high on general tokens and low on tool calls.'),
      el('table', { id: 'router-separation' },
        el('thead', {}, el('tr', {}, ['Tokens', 'Backbone gate', 'Tokens counted'].map((h) => el('th', { scope: 'col' }, h)))),
        el('tbody', {}, kinds.map(([k, label]) => el('tr', {},
          el('th', { scope: 'row' }, label), el('td', { class: 'num' }, mean(k)),
          el('td', { class: 'num' }, String((router[k] && router[k].tokens) || 0)))))),
      layers.length ? el('details', {}, el('summary', {}, `Per component (${layers.length})`),
        el('table', { id: 'router-per-layer' },
          el('thead', {}, el('tr', {}, ['Component', 'General', 'With tools', 'Tool call'].map((h) => el('th', { scope: 'col' }, h)))),
          el('tbody', {}, layers.map((name) => el('tr', {}, el('th', { scope: 'row' }, name),
            ...kinds.map(([k]) => el('td', { class: 'num' }, perLayer(k, name)))))))) : null,
    ];
  }

  // -- the live event stream -----------------------------------------------------------------------
  function addLog(event) {
    if (event.type === 'progress') return; // the curve and the progress bar show these
    const item = el('li', { class: `level-${event.level}` },
      el('time', { datetime: isoTime(event.created_at) }, new Date(event.created_at * 1000).toLocaleTimeString()), ' ',
      event.message);
    // Follow the newest event unless the reader has scrolled up to read older ones.
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
    log.append(item);
    while (log.children.length > MAX_LOG) log.firstElementChild.remove();
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function onEvent(message) {
    let event;
    try { event = JSON.parse(message.data); } catch { return; }
    addLog(event);
    const data = event.data || {};
    if (event.type === 'progress') {
      if (loss.add(data)) {
        const n = loss.points();
        lossNote.textContent = `${n} training step${n === 1 ? '' : 's'}; last: step ${data.step} of ${data.total_steps} (${data.stage}), ` +
          `loss ${num(data.loss)}${data.routing_loss !== null && data.routing_loss !== undefined ? `, routing loss ${num(data.routing_loss)}` : ''}.`;
      }
      job.progress = { ...data };
      job.stage = data.stage;
      const bar = summary.querySelector('progress');
      if (bar && data.total_steps) bar.value = Math.min(1, data.step / data.total_steps);
      const text = document.getElementById('job-progress');
      if (text) text.textContent = progressText(job);
      const stage = document.getElementById('job-stage');
      if (stage) stage.textContent = data.stage || '—';
    } else if (event.type === 'status' || event.type === 'stage') {
      refreshJob();
    } else if (event.type === 'importance' || event.type === 'checkpoint') {
      if (!importanceLoaded) loadImportance();
    }
    if (event.type === 'status' && TERMINAL.includes(data.status)) {
      job.status = data.status;
      finish();
    }
  }

  function openStream() {
    stream = new EventSource(`/jobs/${encodeURIComponent(jobId)}/events?stream=true`);
    streamNote.textContent = 'Live: following the job as it runs.';
    // Named SSE events reach only their own listeners ("message" also gets unnamed ones).
    for (const type of EVENT_TYPES) stream.addEventListener(type, onEvent);
    stream.onerror = () => {
      if (closed) return;
      // The browser reconnects by itself (resuming after the last event id) unless the stream was refused.
      streamNote.textContent = stream.readyState === EventSource.CLOSED
        ? 'Live updates stopped (the session may have ended); reload the page to resume.'
        : 'Connection lost; reconnecting…';
    };
    stream.onopen = () => { streamNote.textContent = 'Live: following the job as it runs.'; };
  }

  function finish() {
    if (closed) return;
    closed = true;
    if (stream) stream.close();
    if (timer) clearInterval(timer);
    streamNote.textContent = `The job ${job.status}; its events are complete.`;
    if (loss.points() === 0) lossNote.textContent = 'No training steps were recorded.';
    refreshJob().then(() => { loadImportance(); loadReport(); });
  }

  renderSummary();
  if (job.selected_components || job.status === 'succeeded') loadImportance();
  else setChildren(importanceBox, el('p', { class: 'muted' }, 'The heat map appears once the components have been scored.'));
  openStream();
  timer = setInterval(() => { if (!document.hidden && !closed) refreshJob(); }, POLL_MS);
  return () => {
    closed = true;
    if (stream) stream.close();
    if (timer) clearInterval(timer);
  };
}

function budgetText(budget) {
  if (!budget) return '—';
  const parts = [];
  if (budget.max_steps) parts.push(`${budget.max_steps} steps`);
  if (budget.max_tokens) parts.push(`${budget.max_tokens.toLocaleString()} tokens`);
  if (budget.max_seconds) parts.push(`${budget.max_seconds} s`);
  return parts.length ? parts.join(', ') : 'no cap';
}

function componentsText(selected) {
  const molora = (selected.molora || []).length;
  const uco = (selected.uco || []).length;
  return `${molora} MOLoRA, ${uco} UCO`;
}
