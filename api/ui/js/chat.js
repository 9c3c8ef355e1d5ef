// The chat playground: pick a fine-tuned adapter (or a base model), give tools as JSON, see the calls it makes.

import { api, el, errorBox, modelName, setChildren } from './api.js';

const EXAMPLE_TOOLS = [{
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'Current weather in a city.',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
}];

export async function renderChat(main, { query }) {
  document.title = 'Chat · citi';
  let models;
  try {
    models = await api('/v1/models');
  } catch (error) {
    setChildren(main, el('h1', {}, 'Chat'), errorBox(error));
    return null;
  }
  const adapters = models.data.filter((m) => m.job_id);
  const bases = models.data.filter((m) => !m.job_id);
  const modelSelect = el('select', { id: 'chat-model', name: 'model' },
    adapters.length ? el('optgroup', { label: 'Your fine-tuned adapters' },
      adapters.map((m) => el('option', { value: m.id }, `${m.id} (job ${m.job_id})`))) : null,
    el('optgroup', { label: 'Base models' }, bases.map((m) => el('option', { value: m.id }, modelName(m.id)))));
  if (query.get('model')) modelSelect.value = query.get('model');

  const system = el('textarea', { id: 'chat-system', rows: 2, placeholder: 'optional' });
  const tools = el('textarea', { id: 'chat-tools', rows: 10, spellcheck: 'false', 'aria-describedby': 'chat-tools-help' });
  tools.value = JSON.stringify(EXAMPLE_TOOLS, null, 2);
  const toolChoice = el('select', { id: 'chat-tool-choice' },
    el('option', { value: 'auto' }, 'auto: the model decides'),
    el('option', { value: 'required' }, 'required: it must call a tool'),
    el('option', { value: 'none' }, 'none: no tools'));
  const maxTokens = el('input', { id: 'chat-max-tokens', type: 'number', min: 1, max: 4096, value: 128 });
  const message = el('textarea', { id: 'chat-message', rows: 3, required: true, 'aria-describedby': 'chat-message-help' });
  message.value = "What's the weather in Paris?";
  const send = el('button', { type: 'submit', id: 'chat-send' }, 'Send');
  const reset = el('button', { type: 'button', class: 'secondary', id: 'chat-reset' }, 'New conversation');
  const transcript = el('ol', { id: 'chat-transcript', class: 'transcript', 'aria-live': 'polite', 'aria-label': 'Conversation' });
  const status = el('div', { id: 'chat-status' });
  let history = [];

  const form = el('form', { class: 'card chat-form', 'aria-labelledby': 'h-chat' },
    el('div', { class: 'field' }, el('label', { for: 'chat-model' }, 'Model'), modelSelect),
    el('div', { class: 'field' }, el('label', { for: 'chat-system' }, 'System prompt'), system),
    el('div', { class: 'field' }, el('label', { for: 'chat-tools' }, 'Tools (JSON)'), tools,
      el('p', { class: 'help', id: 'chat-tools-help' }, 'A list in OpenAI\'s format: [{"type": "function", "function": {"name", "description", "parameters"}}]. Empty for none.')),
    el('div', { class: 'field grid' },
      el('div', {}, el('label', { for: 'chat-tool-choice' }, 'Tool choice'), toolChoice),
      el('div', {}, el('label', { for: 'chat-max-tokens' }, 'Max tokens'), maxTokens)),
    el('div', { class: 'field' }, el('label', { for: 'chat-message' }, 'Your message'), message,
      el('p', { class: 'help', id: 'chat-message-help' }, 'Ctrl+Enter sends.')),
    status,
    el('div', { class: 'actions' }, send, reset));

  function parseTools() {
    const text = tools.value.trim();
    if (!text) return [];
    let parsed;
    try { parsed = JSON.parse(text); } catch (err) {
      throw { message: `the tools are not valid JSON: ${err.message}`, param: 'tools' };
    }
    if (!Array.isArray(parsed)) throw { message: 'the tools must be a JSON list of {"type": "function", "function": {...}} objects', param: 'tools' };
    return parsed;
  }

  function showTurn(role, content, calls, meta) {
    const body = [];
    if (content) body.push(el('p', { class: 'content' }, content));
    if (calls && calls.length) {
      body.push(el('ul', { class: 'tool-calls', 'aria-label': 'Tool calls' }, calls.map((c) => {
        let args = c.function.arguments;
        try { args = JSON.stringify(JSON.parse(args), null, 2); } catch { /* shown as sent */ }
        return el('li', { class: 'tool-call' }, el('span', { class: 'label' }, 'calls '), el('code', { class: 'tool-name' }, c.function.name),
          el('pre', { class: 'tool-args' }, args));
      })));
    }
    if (!body.length) body.push(el('p', { class: 'muted' }, '(empty reply)'));
    transcript.append(el('li', { class: `turn turn-${role}` }, el('span', { class: 'role' }, role), body,
      meta ? el('p', { class: 'muted meta' }, meta) : null));
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    setChildren(status);
    tools.removeAttribute('aria-invalid');
    let toolList;
    try { toolList = parseTools(); } catch (error) {
      tools.setAttribute('aria-invalid', 'true');
      setChildren(status, errorBox(error));
      tools.focus();
      return;
    }
    if (!message.value.trim()) { message.focus(); return; }
    const user = { role: 'user', content: message.value };
    const messages = [...(system.value.trim() && !history.length ? [{ role: 'system', content: system.value }] : []), ...history, user];
    const request = { model: modelSelect.value, messages, max_tokens: Number(maxTokens.value) || 128, temperature: 0 };
    if (toolList.length) { request.tools = toolList; request.tool_choice = toolChoice.value; }
    send.disabled = true;
    setChildren(status, el('p', { class: 'muted' }, 'Generating… (on a CPU host this can take a while)'));
    try {
      const reply = await api('/v1/chat/completions', { method: 'POST', json: request });
      const choice = reply.choices[0];
      const said = (choice.message.content || '').trim() || (choice.message.tool_calls || []).length;
      // An empty assistant turn would be refused in the next request, so it is not kept.
      history = said ? [...messages, choice.message] : messages;
      showTurn('user', user.content);
      const usage = reply.usage ? `, ${reply.usage.prompt_tokens} prompt + ${reply.usage.completion_tokens} completion tokens` : '';
      showTurn('assistant', choice.message.content, choice.message.tool_calls, `finish: ${choice.finish_reason}${usage}`);
      setChildren(status);
      message.value = '';
      message.focus();
    } catch (error) {
      setChildren(status, errorBox(error));
    } finally {
      send.disabled = false;
    }
  });
  message.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  reset.addEventListener('click', () => { history = []; transcript.replaceChildren(); setChildren(status); message.focus(); });

  setChildren(main,
    el('h1', { id: 'h-chat' }, 'Chat playground'),
    el('p', {}, 'Talk to a fine-tuned adapter through POST /v1/chat/completions, with tools, and see the calls it makes.'),
    el('div', { class: 'chat-layout' }, form, el('section', { 'aria-label': 'Conversation' }, transcript)));
  return null;
}
