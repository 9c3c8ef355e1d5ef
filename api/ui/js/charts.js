// Charts, drawn with the vendored Chart.js (window.Chart) and its matrix controller for heat maps.
// Every chart sits on a <canvas role="img"> whose label says what it shows; pages add the numbers as tables.

const MODULE_ORDER = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
// Viridis, sampled: dark (low importance) to yellow (high).
const VIRIDIS = ['#440154', '#482878', '#3e4989', '#31688e', '#26828e', '#1f9e89', '#35b779', '#6ece58', '#b5de2b', '#fde725'];
const STAGE_NAMES = { router_pretraining: 'router pre-training', molora: 'MOLoRA', uco: 'UCO', train: 'training' };

function chartLib() {
  if (!window.Chart) throw new Error('the chart library did not load (/ui/assets/vendor/chart.umd.min.js)');
  return window.Chart;
}

function viridis(t) {
  const x = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const mix = (a, b) => Math.round(a + (b - a) * (x - i));
  const rgb = (hex) => [1, 3, 5].map((k) => parseInt(hex.slice(k, k + 2), 16));
  const [r1, g1, b1] = rgb(VIRIDIS[i]);
  const [r2, g2, b2] = rgb(VIRIDIS[i + 1]);
  return `rgb(${mix(r1, r2)}, ${mix(g1, g2)}, ${mix(b1, b2)})`;
}

// Dashed vertical line and name where each training stage starts (the loss chart's x axis is the global step).
const stageLines = {
  id: 'citiStageLines',
  afterDatasetsDraw(chart) {
    const starts = chart.$stageStarts || [];
    const { ctx, chartArea, scales } = chart;
    ctx.save();
    ctx.strokeStyle = '#888';
    ctx.fillStyle = '#555';
    ctx.setLineDash([4, 4]);
    ctx.font = '11px system-ui, sans-serif';
    for (const { step, stage } of starts) {
      const x = scales.x.getPixelForValue(step);
      if (x < chartArea.left - 1 || x > chartArea.right + 1) continue;
      ctx.beginPath();
      ctx.moveTo(x, chartArea.top);
      ctx.lineTo(x, chartArea.bottom);
      ctx.stroke();
      ctx.fillText(STAGE_NAMES[stage] || stage, x + 3, chartArea.top + 11);
    }
    ctx.restore();
  },
};

/**
 * The live loss chart: loss (left axis) and routing loss (right axis) against the global step.
 * Returns {chart, add(event)}; add() takes a progress event's data and redraws at most once a frame.
 */
export function lossChart(canvas) {
  const Chart = chartLib();
  const chart = new Chart(canvas, {
    type: 'line',
    data: {
      datasets: [
        { label: 'loss', data: [], yAxisID: 'y', borderColor: '#1f77b4', backgroundColor: '#1f77b4', pointRadius: 2, borderWidth: 2 },
        { label: 'routing loss', data: [], yAxisID: 'y1', borderColor: '#d62728', backgroundColor: '#d62728', pointRadius: 2, borderWidth: 2, borderDash: [6, 3] },
      ],
    },
    options: {
      animation: false,
      maintainAspectRatio: false,
      interaction: { mode: 'nearest', intersect: false },
      scales: {
        x: { type: 'linear', title: { display: true, text: 'step (all stages)' }, ticks: { precision: 0 } },
        y: { type: 'linear', position: 'left', title: { display: true, text: 'loss' } },
        y1: { type: 'linear', position: 'right', title: { display: true, text: 'routing loss' }, grid: { drawOnChartArea: false } },
      },
      plugins: {
        legend: { position: 'bottom' },
        tooltip: { callbacks: { afterLabel: (item) => STAGE_NAMES[item.raw.stage] || item.raw.stage } },
      },
    },
    plugins: [stageLines],
  });
  chart.$stageStarts = [];
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; chart.update('none'); });
  };
  return {
    chart,
    /** Add one progress event; returns whether it carried a training loss. */
    add(data) {
      if (data.loss === null || data.loss === undefined || !(data.stage in STAGE_NAMES)) return false;
      const [loss, routing] = chart.data.datasets;
      const starts = chart.$stageStarts;
      if (!starts.length || starts[starts.length - 1].stage !== data.stage) starts.push({ step: data.step, stage: data.stage });
      loss.data.push({ x: data.step, y: data.loss, stage: data.stage });
      if (data.routing_loss !== null && data.routing_loss !== undefined) {
        routing.data.push({ x: data.step, y: data.routing_loss, stage: data.stage });
      }
      redraw();
      return true;
    },
    points() { return chart.data.datasets[0].data.length; },
  };
}

/** Layers and module types of an importance.json, in model order. */
export function grid(importance) {
  const rows = importance.components;
  const layers = [...new Set(rows.map((r) => r.layer))].sort((a, b) => a - b);
  const present = new Set(rows.map((r) => r.module));
  const modules = [...MODULE_ORDER.filter((m) => present.has(m)), ...[...present].filter((m) => !MODULE_ORDER.includes(m)).sort()];
  return { layers, modules };
}

// Letters in the marked cells, so the choice does not rest on colour alone.
const cellMarks = {
  id: 'citiCellMarks',
  afterDatasetsDraw(chart) {
    const { ctx } = chart;
    const meta = chart.getDatasetMeta(0);
    ctx.save();
    ctx.font = 'bold 12px system-ui, sans-serif';
    ctx.textAlign = 'center';
    ctx.textBaseline = 'middle';
    meta.data.forEach((element, i) => {
      const cell = chart.data.datasets[0].data[i];
      if (!cell.mark) return;
      const { x, y } = element.getCenterPoint();
      ctx.fillStyle = cell.t > 0.6 ? '#000' : '#fff';
      ctx.fillText(cell.mark, x, y);
    });
    ctx.restore();
  },
};

/**
 * Heat map of one importance (`tool` = M or `general` = C) over layers x module types; MOLoRA cells are framed
 * in white and lettered M, UCO cells framed in red and lettered U.
 */
export function importanceHeatmap(canvas, importance, which, title) {
  const Chart = chartLib();
  const { layers, modules } = grid(importance);
  const molora = new Set(importance.molora);
  const uco = new Set(importance.uco);
  const values = importance.components.map((r) => r[which]);
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const data = importance.components.map((r) => {
    const t = hi > lo ? (r[which] - lo) / (hi - lo) : 0.5;
    const mark = [molora.has(r.name) ? 'M' : '', uco.has(r.name) ? 'U' : ''].join('');
    return { x: r.module, y: String(r.layer), v: r[which], t, name: r.name, mark };
  });
  return new Chart(canvas, {
    type: 'matrix',
    data: {
      datasets: [{
        label: title,
        data,
        backgroundColor: (ctx) => viridis(ctx.raw ? ctx.raw.t : 0),
        borderColor: (ctx) => (ctx.raw && ctx.raw.mark.includes('U') ? '#ff1f3d' : '#ffffff'),
        borderWidth: (ctx) => (ctx.raw && ctx.raw.mark ? 3 : 0),
        width: ({ chart }) => Math.max(1, (chart.chartArea || { width: 0 }).width / modules.length - 2),
        height: ({ chart }) => Math.max(1, (chart.chartArea || { height: 0 }).height / layers.length - 2),
      }],
    },
    options: {
      animation: false,
      maintainAspectRatio: false,
      scales: {
        x: { type: 'category', labels: modules, offset: true, grid: { display: false }, title: { display: true, text: 'module' } },
        y: { type: 'category', labels: layers.map(String), offset: true, grid: { display: false }, title: { display: true, text: 'layer' } },
      },
      plugins: {
        legend: { display: false },
        title: { display: true, text: title },
        tooltip: {
          callbacks: {
            title: (items) => items[0].raw.name,
            label: (item) => {
              const chosen = [item.raw.mark.includes('M') && 'MOLoRA', item.raw.mark.includes('U') && 'UCO'].filter(Boolean);
              return `${which === 'tool' ? 'tool importance M' : 'general importance C'}: ${item.raw.v.toPrecision(4)}${chosen.length ? ` (${chosen.join(', ')})` : ''}`;
            },
          },
        },
      },
    },
    plugins: [cellMarks],
  });
}

/** Horizontal bars of tool-call accuracy per category, and overall. */
export function accuracyChart(canvas, tool) {
  const Chart = chartLib();
  const categories = Object.keys(tool.per_category);
  return new Chart(canvas, {
    type: 'bar',
    data: {
      labels: [...categories, 'overall'],
      datasets: [{
        label: 'tool-call accuracy',
        data: [...categories.map((c) => tool.per_category[c].accuracy), tool.accuracy],
        backgroundColor: [...categories.map(() => '#4c72b0'), '#dd8452'],
      }],
    },
    options: {
      indexAxis: 'y',
      animation: false,
      maintainAspectRatio: false,
      scales: { x: { min: 0, max: 1, title: { display: true, text: 'accuracy' } } },
      plugins: { legend: { display: false } },
    },
  });
}
