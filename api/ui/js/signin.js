// The sign-in form: an API key is exchanged for an HttpOnly session cookie (POST /ui/session).

import { api, el, errorBox, setChildren } from './api.js';

export function renderSignIn(main, { onSignedIn, notice = null }) {
  document.title = 'Sign in · citi';
  const key = el('input', {
    id: 'api-key', name: 'key', type: 'password', required: true, autocomplete: 'current-password',
    spellcheck: 'false', 'aria-describedby': 'api-key-help',
  });
  const status = el('div', { id: 'sign-in-status' }, notice ? el('p', { class: 'notice-inline', role: 'status' }, notice) : null);
  const button = el('button', { type: 'submit' }, 'Sign in');
  const form = el('form', { class: 'card narrow', 'aria-labelledby': 'sign-in-title' },
    el('h1', { id: 'sign-in-title' }, 'Sign in'),
    el('p', {}, 'Fine-tune chat models to call tools without forgetting the rest. Sign in with your API key to see your jobs.'),
    el('div', { class: 'field' },
      el('label', { for: 'api-key' }, 'API key'),
      key,
      el('p', { id: 'api-key-help', class: 'help' },
        'The key you use as "Authorization: Bearer <key>". It is sent once and kept by the browser only as a signed session cookie.')),
    status,
    button);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    button.disabled = true;
    setChildren(status);
    try {
      const info = await api('/ui/session', { method: 'POST', json: { key: key.value } });
      key.value = '';
      onSignedIn(info);
    } catch (error) {
      setChildren(status, errorBox(error));
      key.setAttribute('aria-invalid', 'true');
      key.focus();
    } finally {
      button.disabled = false;
    }
  });
  setChildren(main, form);
  key.focus();
  return null;
}
