// New job: upload JSONL (the validator's line errors are listed when it is refused), pick the model,
// method, budget and fractions, see the estimate, submit.

import { api, el, errorBox, modelName, setChildren } from './api.js';

const METHOD_HELP = {
  citi: 'CITI: MOLoRA experts with a router on the most tool-important components, full fine-tuning of a few least general-important ones (UCO), three stages.',
  lora: 'LoRA on every linear layer (baseline).',
  full: 'Every weight trained (baseline; needs the most memory).',
};
// Form fields an API error's `param` points at.
const PARAM_FIELDS = {
  model: 'model', training_file: 'training-file', validation_file: 'validation-file', file: 'upload-file',
  'budget.max_steps': 'budget-max_steps', 'budget.max_tokens': 'budget-max_tokens', 'budget.max_seconds': 'budget-max_seconds',
  'components.molora_fraction': 'components-molora_fraction', 'components.uco_fraction': 'components-uco_fraction',
  'components.num_experts': 'components-num_experts', 'components.rank': 'components-rank',
  'method.hyperparameters': 'hyperparameters', hyperparameters: 'hyperparameters', suffix: 'suffix', seed: 'seed',
};
const COMPONENT_FIELDS = ['molora_fraction', 'uco_fraction', 'num_experts', 'rank'];
const BUDGET_FIELDS = [
  ['max_steps', 'Steps', 'Optimizer steps over all stages.', 1],
  ['max_tokens', 'Tokens', 'Trained tokens (padding excluded).', 1],
  ['max_seconds', 'Seconds', 'Wall-clock time for the whole job.', 'any'],
];

function randomKey() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes); // works on plain HTTP too, unlike crypto.randomUUID
  return [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
}

function field(id, label, input, help) {
  input.id = id;
  if (help) input.setAttribute('aria-describedby', `${id}-help`);
  return el('div', { class: 'field' }, el('label', { for: id }, label), input, help ? el('p', { class: 'help', id: `${id}-help` }, help) : null);
}

export async function renderNewJob(main, { query, navigate }) {
  document.title = 'New job · citi';
  let options;
  let models;
  let files;
  try {
    [options, models, files] = await Promise.all([api('/ui/api/options'), api('/v1/models'), api('/v1/files?limit=200')]);
  } catch (error) {
    setChildren(main, el('h1', {}, 'New job'), errorBox(error));
    return null;
  }
  const defaults = (list) => Object.fromEntries(list.map((f) => [f.name, f]));
  const componentDefaults = defaults(options.components);
  let idempotencyKey = randomKey();

  // -- training data -------------------------------------------------------------------------------
  const fileInput = el('input', { type: 'file', accept: '.jsonl,.json,application/jsonl,application/json,text/plain', required: true });
  const uploadButton = el('button', { type: 'submit', id: 'upload-button' }, 'Upload and check');
  const uploadResult = el('div', { id: 'upload-result', 'aria-live': 'polite' });
  const trainingSelect = el('select', { name: 'training_file' });
  const validationSelect = el('select', { name: 'validation_file' });

  function fillFiles(selected) {
    const train = files.data.filter((f) => f.format !== 'test');
    setChildren(trainingSelect, train.length ? null : el('option', { value: '' }, 'upload a file first'),
      train.map((f) => el('option', { value: f.id }, `${f.filename} (${f.n_examples} examples: ${f.n_tool} tool, ${f.n_general} general) · ${f.id}`)));
    setChildren(validationSelect, el('option', { value: '' }, 'none: hold out part of the training file'),
      files.data.map((f) => el('option', { value: f.id }, `${f.filename} (${f.format === 'test' ? 'tool tests' : 'training format'}, ${f.n_examples}) · ${f.id}`)));
    if (selected) trainingSelect.value = selected;
  }
  fillFiles(query.get('file'));

  const uploadForm = el('form', { id: 'upload-form' },
    field('upload-file', 'JSONL file, one chat example a line', fileInput,
      'OpenAI chat fine-tuning format: {"messages": [...], "tools": [...]}. Every line is checked; a refused file lists each bad line.'),
    uploadButton, uploadResult);
  const dataCard = el('section', { class: 'card', 'aria-labelledby': 'h-data' },
    el('h2', { id: 'h-data' }, '1. Training data'),
    uploadForm,
    field('training-file', 'Training file', trainingSelect),
    field('validation-file', 'Tool test file (optional)', validationSelect,
      'Held-out tool tests the report scores the adapter on; without one, part of the training file is held out.'));

  uploadForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    const file = fileInput.files[0];
    if (!file) return;
    uploadButton.disabled = true;
    fileInput.removeAttribute('aria-invalid');
    setChildren(uploadResult, el('p', {}, `Uploading ${file.name}…`));
    const form = new FormData();
    form.append('file', file, file.name);
    form.append('purpose', 'fine-tune');
    try {
      const record = await api('/v1/files', { method: 'POST', form });
      files = await api('/v1/files?limit=200');
      fillFiles(record.format === 'test' ? trainingSelect.value : record.id);
      if (record.format === 'test') validationSelect.value = record.id;
      setChildren(uploadResult, el('p', { class: 'ok', id: 'upload-ok' },
        `${record.filename} accepted: ${record.n_examples} examples (${record.n_tool} tool, ${record.n_general} general)` +
        `${record.format === 'test' ? ', tool tests: chosen as the test file' : ''}. File id ${record.id}.`));
    } catch (error) {
      fileInput.setAttribute('aria-invalid', 'true');
      setChildren(uploadResult, errorBox(error), error.details && error.details.length ? problemsTable(error.details) : null);
    } finally {
      uploadButton.disabled = false;
    }
  });

  // -- the job -------------------------------------------------------------------------------------
  const baseModels = models.data.filter((m) => !m.job_id);
  const modelSelect = el('select', { name: 'model', required: true },
    baseModels.map((m) => el('option', { value: m.id }, `${modelName(m.id)}${m.id.startsWith('/') ? ` (${m.id})` : ''}`)));
  if (query.get('model')) modelSelect.value = query.get('model');

  const methodInputs = options.methods.map((m) => el('input', { type: 'radio', name: 'method', value: m, id: `method-${m}`, checked: m === 'citi' }));
  const methodField = el('fieldset', { class: 'field' }, el('legend', {}, 'Method'),
    options.methods.map((m, i) => el('div', { class: 'choice' }, methodInputs[i],
      el('label', { for: `method-${m}` }, el('strong', {}, m), ` — ${METHOD_HELP[m] || ''}`))));

  const budgetInputs = {};
  const budgetField = el('fieldset', { class: 'field grid' }, el('legend', {}, 'Budget (leave a cap empty for none)'),
    BUDGET_FIELDS.map(([name, label, help, step]) => {
      budgetInputs[name] = el('input', { type: 'number', min: step === 'any' ? '0' : '1', step, inputmode: 'numeric' });
      return field(`budget-${name}`, label, budgetInputs[name], help);
    }));

  const componentInputs = {};
  const componentsField = el('fieldset', { class: 'field grid', id: 'components-fieldset' },
    el('legend', {}, 'Components (CITI only)'),
    COMPONENT_FIELDS.map((name) => {
      const d = componentDefaults[name];
      const fraction = name.endsWith('_fraction');
      componentInputs[name] = el('input', {
        type: 'number', value: d.default, step: fraction ? '0.01' : '1', min: fraction ? '0.01' : '1', max: fraction ? '0.99' : null,
      });
      return field(`components-${name}`, name.replace('_', ' '), componentInputs[name], d.help);
    }));

  const suffix = el('input', { type: 'text', maxlength: 64, pattern: '[A-Za-z0-9_.\\-]+', autocomplete: 'off' });
  const seed = el('input', { type: 'number', min: 0, step: 1 });
  const hyper = el('textarea', { rows: 4, spellcheck: 'false', placeholder: '{"batch_size": 8, "epochs_molora": 2}' });
  const hyperHelp = el('details', {}, el('summary', {}, 'Known hyperparameters and their defaults'),
    el('table', {}, el('thead', {}, el('tr', {}, ['Name', 'Default', 'Meaning'].map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, options.hyperparameters.map((h) => el('tr', {},
        el('th', { scope: 'row' }, el('code', {}, h.name)), el('td', {}, JSON.stringify(h.default)), el('td', {}, h.help))))));

  const estimateBox = el('div', { id: 'estimate', 'aria-live': 'polite' });
  const formError = el('div', { id: 'form-error' });
  const estimateButton = el('button', { type: 'button', id: 'estimate-button', class: 'secondary' }, 'Estimate');
  const submitButton = el('button', { type: 'submit', id: 'submit-job' }, 'Start job');

  const jobForm = el('form', { id: 'job-form', class: 'card', 'aria-labelledby': 'h-job', novalidate: true },
    el('h2', { id: 'h-job' }, '2. The job'),
    field('model', 'Base model', modelSelect, 'Models this server allows (GET /v1/models).'),
    methodField, budgetField, componentsField,
    el('details', {}, el('summary', {}, 'More options'),
      field('suffix', 'Suffix of the fine-tuned model name', suffix, 'Up to 64 letters, digits, _ . -'),
      field('seed', 'Seed', seed, 'Empty: a random seed, recorded with the job.'),
      field('hyperparameters', 'Hyperparameters (JSON object)', hyper, 'Overrides of the defaults below, e.g. learning rates or epochs per stage.'),
      hyperHelp),
    formError,
    el('div', { class: 'actions' }, estimateButton, submitButton),
    estimateBox);

  const syncMethod = () => { componentsField.disabled = methodValue() !== 'citi'; };
  const methodValue = () => (methodInputs.find((i) => i.checked) || {}).value || 'citi';
  methodInputs.forEach((i) => i.addEventListener('change', syncMethod));
  syncMethod();

  function fail(error) {
    for (const node of jobForm.querySelectorAll('[aria-invalid]')) node.removeAttribute('aria-invalid');
    setChildren(formError, errorBox(error));
    const target = error.param && document.getElementById(PARAM_FIELDS[error.param] || '');
    if (target) { target.setAttribute('aria-invalid', 'true'); target.focus(); }
  }

  /** The request body, or null after showing what is wrong with the form. */
  function body() {
    setChildren(formError);
    if (!trainingSelect.value) {
      fail({ message: 'choose a training file: upload one above first', param: 'training_file' });
      return null;
    }
    const out = { model: modelSelect.value, training_file: trainingSelect.value, method: { type: methodValue() } };
    if (validationSelect.value) out.validation_file = validationSelect.value;
    const budget = {};
    for (const [name, input] of Object.entries(budgetInputs)) if (input.value !== '') budget[name] = Number(input.value);
    if (Object.keys(budget).length) out.budget = budget;
    if (out.method.type === 'citi') {
      out.components = {};
      for (const [name, input] of Object.entries(componentInputs)) if (input.value !== '') out.components[name] = Number(input.value);
    }
    if (hyper.value.trim()) {
      let parsed;
      try { parsed = JSON.parse(hyper.value); } catch (err) {
        fail({ message: `the hyperparameters are not valid JSON: ${err.message}`, param: 'hyperparameters' });
        return null;
      }
      if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) {
        fail({ message: 'the hyperparameters must be a JSON object, such as {"batch_size": 8}', param: 'hyperparameters' });
        return null;
      }
      out.method.hyperparameters = parsed;
    }
    if (suffix.value) out.suffix = suffix.value;
    if (seed.value !== '') out.seed = Number(seed.value);
    return out;
  }

  estimateButton.addEventListener('click', async () => {
    const b = body();
    if (!b) return;
    estimateButton.disabled = true;
    setChildren(estimateBox, el('p', {}, 'Estimating…'));
    try {
      setChildren(estimateBox, estimateView(await api('/jobs/estimate', { method: 'POST', json: b })));
    } catch (error) {
      setChildren(estimateBox);
      fail(error);
    } finally {
      estimateButton.disabled = false;
    }
  });

  jobForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    const b = body();
    if (!b) return;
    submitButton.disabled = true;
    try {
      const job = await api('/jobs', { method: 'POST', json: b, headers: { 'Idempotency-Key': idempotencyKey } });
      idempotencyKey = randomKey();
      navigate(`/ui/jobs/${job.id}`);
    } catch (error) {
      // A corrected form is a new request; reusing the key would be refused as a different body.
      idempotencyKey = randomKey();
      fail(error);
    } finally {
      submitButton.disabled = false;
    }
  });

  setChildren(main, el('h1', {}, 'New fine-tuning job'), dataCard, jobForm);
  return null;
}

function problemsTable(details) {
  return el('table', { id: 'upload-errors', class: 'problems' },
    el('caption', {}, `${details.length} problem${details.length === 1 ? '' : 's'} in the file`),
    el('thead', {}, el('tr', {}, ['Line', 'Problem', 'What to fix'].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, details.map((d) => el('tr', {},
      el('td', { class: 'num' }, d.line ? String(d.line) : 'file'), el('td', {}, el('code', {}, d.code)), el('td', {}, d.message)))));
}

function seconds(s) {
  if (s === null || s === undefined) return 'unknown';
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function estimateView(e) {
  const fact = (term, value, id) => [el('dt', {}, term), el('dd', { id }, value)];
  const perStage = Object.entries(e.steps.per_stage || {}).map(([stage, n]) => `${stage} ${n}`).join(', ');
  const memory = e.memory || {};
  const budget = e.budget || {};
  return el('div', { class: 'estimate' },
    el('h3', {}, 'Estimate'),
    el('dl', { class: 'facts' },
      fact('Examples', `${e.examples} (${e.tool_examples} tool, ${e.general_examples} general); ${e.steps.held_out_test_examples ?? 0} held out for testing`),
      fact('Steps', `${e.steps.total}${perStage ? ` (${perStage})` : ''}`, 'estimate-steps'),
      fact('Trained tokens', e.trained_tokens.toLocaleString()),
      fact('Time', seconds(e.estimated_seconds), 'estimate-seconds'),
      fact('GPU memory', memory.estimated_gb === null || memory.estimated_gb === undefined ? 'unknown'
        : `${memory.estimated_gb} GB of ${memory.gpu_memory_gb} GB: ${memory.fits ? 'fits' : 'does not fit'}`),
      fact('Budget', budget.fits ? `fits${budget.limited_by && budget.limited_by.length ? ` (limited by ${budget.limited_by.join(', ')})` : ''}`
        : `does not fit: ${budget.message || ''}`, 'estimate-budget')),
    e.notes && e.notes.length ? el('ul', { class: 'notes' }, e.notes.map((n) => el('li', {}, n))) : null);
}
