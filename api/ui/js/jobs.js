// The jobs list: status, model, method, progress and age of each job, kept current by polling GET /jobs.

import { age, api, el, errorBox, isoTime, modelName, progressBar, progressText, setChildren } from './api.js';

const POLL_MS = 2000;
const STATUSES = ['validating_files', 'queued', 'running', 'cancelling', 'succeeded', 'failed', 'cancelled'];

export async function renderJobs(main, { query }) {
  document.title = 'Jobs · citi';
  const filter = el('select', { id: 'status-filter', name: 'status' },
    el('option', { value: '' }, 'all'),
    STATUSES.map((s) => el('option', { value: s }, s.replace('_', ' '))));
  filter.value = query.get('status') || '';
  const summary = el('p', { id: 'jobs-summary', 'aria-live': 'polite' }, 'Loading…');
  const body = el('tbody');
  const table = el('table', { class: 'jobs', id: 'jobs-table' },
    el('caption', { class: 'visually-hidden' }, 'Your fine-tuning jobs, newest first'),
    el('thead', {}, el('tr', {},
      ['Job', 'Status', 'Model', 'Method', 'Progress', 'Created'].map((h) => el('th', { scope: 'col' }, h)))),
    body);
  const more = el('button', { type: 'button', class: 'secondary', hidden: true }, 'Show more');
  const problem = el('div');
  let limit = 50;

  setChildren(main,
    el('div', { class: 'page-head' },
      el('h1', {}, 'Jobs'),
      el('a', { class: 'button', href: '/ui/new' }, 'New job')),
    el('div', { class: 'toolbar' },
      el('label', { for: 'status-filter' }, 'Status'), filter),
    summary, problem, table, more);

  async function refresh() {
    const params = new URLSearchParams({ limit: String(limit) });
    if (filter.value) params.set('status', filter.value);
    try {
      const page = await api(`/jobs?${params}`);
      update(page.data);
      more.hidden = !page.has_more;
      setChildren(problem);
    } catch (error) {
      if (error.name !== 'AbortError') setChildren(problem, errorBox(error));
    }
  }

  function update(jobs) {
    const ids = new Set(jobs.map((j) => j.id));
    for (const row of [...body.rows]) if (!ids.has(row.dataset.id)) row.remove();
    jobs.forEach((job, index) => {
      let row = body.querySelector(`tr[data-id="${CSS.escape(job.id)}"]`);
      if (!row) row = el('tr', { dataset: { id: job.id } });
      // Rows are rebuilt cell by cell, never the link cell, so keyboard focus on a link survives a refresh.
      if (!row.cells.length) row.append(el('td', {}, el('a', { href: `/ui/jobs/${job.id}` }, job.id)), el('td'), el('td'), el('td'), el('td'), el('td'));
      const [, status, model, method, progress, created] = row.cells;
      row.dataset.status = job.status;
      setChildren(status, el('span', { class: `status status-${job.status}` }, job.status.replace('_', ' ')));
      model.textContent = modelName(job.model);
      model.title = job.model;
      method.textContent = (job.method && job.method.type) || '—';
      setChildren(progress, progressBar(job, `progress of ${job.id}`), ' ', el('span', { class: 'muted' }, progressText(job)));
      setChildren(created, el('time', { datetime: isoTime(job.created_at), title: isoTime(job.created_at) }, age(job.created_at)));
      if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
    });
    const running = jobs.filter((j) => ['validating_files', 'queued', 'running', 'cancelling'].includes(j.status)).length;
    summary.textContent = jobs.length
      ? `${jobs.length} job${jobs.length === 1 ? '' : 's'}, ${running} not finished. This list updates by itself.`
      : 'No jobs yet. Start one with "New job".';
    table.hidden = !jobs.length;
  }

  filter.addEventListener('change', () => {
    const url = filter.value ? `/ui/jobs?status=${filter.value}` : '/ui/jobs';
    history.replaceState(null, '', url);
    refresh();
  });
  more.addEventListener('click', () => { limit = Math.min(100, limit + 50); refresh(); });

  await refresh();
  const timer = setInterval(() => { if (!document.hidden) refresh(); }, POLL_MS);
  return () => clearInterval(timer);
}
