// The dashboard shell: who is signed in, which page the address names, and moving between pages
// without reloading (links stay real links, so they work from the keyboard and open in new tabs).

import { api, el, setChildren, setSession, whenSignedOut } from './api.js';
import { renderChat } from './chat.js';
import { renderJob } from './job.js';
import { renderJobs } from './jobs.js';
import { renderNewJob } from './newjob.js';
import { renderSignIn } from './signin.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const who = document.getElementById('who');

const ROUTES = [
  [/^\/ui\/?$/, 'jobs', renderJobs],
  [/^\/ui\/jobs\/?$/, 'jobs', renderJobs],
  [/^\/ui\/jobs\/([A-Za-z0-9_.-]+)$/, 'jobs', renderJob],
  [/^\/ui\/new$/, 'new', renderNewJob],
  [/^\/ui\/chat$/, 'chat', renderChat],
];

let session = null;
let cleanup = null;
let signInNotice = null;

function showSignedIn(info) {
  session = info;
  setSession(info);
  nav.hidden = !info;
  who.hidden = !info;
  document.getElementById('tenant').textContent = info ? info.tenant : '';
}

/** Render the page the address names (or the sign-in form when nobody is signed in). */
async function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  const path = location.pathname;
  if (!session) {
    const notice = signInNotice;
    signInNotice = null;
    cleanup = renderSignIn(main, {
      notice,
      onSignedIn: (info) => { showSignedIn(info); navigate(location.pathname + location.search, { replace: true }); },
    });
    return;
  }
  const match = ROUTES.map(([re, section, render]) => [path.match(re), section, render]).find(([m]) => m);
  for (const link of nav.querySelectorAll('a')) {
    if (match && link.dataset.nav === match[1]) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  if (!match) {
    document.title = 'Not found · citi';
    setChildren(main, el('h1', {}, 'Page not found'), el('p', {}, el('a', { href: '/ui/jobs' }, 'Back to the jobs')));
    return;
  }
  const [m, , render] = match;
  cleanup = (await render(main, { params: m.slice(1), query: new URLSearchParams(location.search), navigate })) || null;
}

/** Go to a dashboard address, as a link click would. */
export function navigate(href, { replace = false } = {}) {
  if (replace) history.replaceState(null, '', href);
  else history.pushState(null, '', href);
  route().then(() => {
    // Move focus to the new page's heading, so keyboard and screen-reader users start at the top.
    const heading = main.querySelector('h1');
    if (heading) { heading.setAttribute('tabindex', '-1'); heading.focus(); }
  });
}

document.addEventListener('click', (event) => {
  const link = event.target.closest('a[href]');
  if (!link || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  const url = new URL(link.href, location.href);
  if (url.origin !== location.origin || !url.pathname.startsWith('/ui') || link.hasAttribute('download')) return;
  event.preventDefault();
  navigate(url.pathname + url.search);
});

window.addEventListener('popstate', () => route());

document.getElementById('sign-out').addEventListener('click', async () => {
  try {
    await api('/ui/session', { method: 'DELETE' });
  } finally {
    showSignedIn(null);
    navigate('/ui/jobs', { replace: true });
  }
});

whenSignedOut(() => {
  if (!session) return;
  showSignedIn(null);
  signInNotice = 'Your session has ended (it expired, or you signed out elsewhere). Sign in again to go on.';
  route();
});

async function start() {
  try {
    showSignedIn(await api('/ui/session'));
  } catch {
    showSignedIn(null);
  }
  await route();
}

start();
