// Line charts drawn as inline SVG: no chart library, nothing fetched from elsewhere.
// Colours come from the stylesheet's classes (the CSP allows no inline style).

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 320;
const HEIGHT = 180;
const PAD = {left: 44, right: 12, top: 24, bottom: 28};

function svg(tag, attributes = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) el.setAttribute(name, String(value));
  if (text !== undefined) el.textContent = String(text);
  return el;
}

/** Round a number for an axis label. */
function tick(value) {
  if (value === 0) return "0";
  const digits = Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 1 ? 2 : 3;
  return value.toFixed(digits);
}

function extent(values, fromZero) {
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (fromZero) low = Math.min(low, 0);
  if (high === low) {
    high += Math.abs(high) * 0.1 || 1;
    low -= fromZero ? 0 : Math.abs(low) * 0.1 || 1;
  }
  return [low, high];
}

/**
 * A line chart of points [[x, y], ...] (x: round numbers).
 * kind names the chart (a CSS class, e.g. "accuracy"), title is its heading.
 */
export function lineChart(kind, title, points, {fromZero = false} = {}) {
  const chart = svg("svg", {
    class: "chart " + kind, width: WIDTH, height: HEIGHT, viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img", "aria-label": title, "data-chart": kind, "data-points": points.length,
  });
  chart.append(svg("text", {class: "title", x: PAD.left, y: 15}, title));
  const innerW = WIDTH - PAD.left - PAD.right;
  const innerH = HEIGHT - PAD.top - PAD.bottom;
  if (!points.length) {
    chart.append(svg("text", {class: "label", x: PAD.left, y: PAD.top + innerH / 2},
      "no committed round yet"));
    return chart;
  }
  const [x0, x1] = extent(points.map(p => p[0]), false);
  const [y0, y1] = extent(points.map(p => p[1]), fromZero);
  const x = v => PAD.left + ((v - x0) / (x1 - x0)) * innerW;
  const y = v => PAD.top + innerH - ((v - y0) / (y1 - y0)) * innerH;
  for (let i = 0; i <= 4; i++) {
    const value = y0 + ((y1 - y0) * i) / 4;
    chart.append(svg("line", {class: "grid", x1: PAD.left, x2: WIDTH - PAD.right,
      y1: y(value), y2: y(value)}));
    chart.append(svg("text", {class: "label", x: 4, y: y(value) + 3}, tick(value)));
  }
  chart.append(svg("line", {class: "axis", x1: PAD.left, x2: PAD.left, y1: PAD.top,
    y2: PAD.top + innerH}));
  chart.append(svg("line", {class: "axis", x1: PAD.left, x2: WIDTH - PAD.right,
    y1: PAD.top + innerH, y2: PAD.top + innerH}));
  const first = points[0][0];
  const last = points[points.length - 1][0];
  chart.append(svg("text", {class: "label", x: PAD.left, y: HEIGHT - 8}, "round " + first));
  chart.append(svg("text", {class: "label", x: WIDTH - PAD.right - 50, y: HEIGHT - 8},
    "round " + last));
  const path = points.map(([px, py]) => `${x(px).toFixed(1)},${y(py).toFixed(1)}`).join(" ");
  chart.append(svg("polyline", {class: "line", points: path}));
  for (const [px, py] of points) {
    const dot = svg("circle", {class: "dot", cx: x(px), cy: y(py), r: 2.5});
    dot.append(svg("title", {}, `round ${px}: ${tick(py)}`));
    chart.append(dot);
  }
  return chart;
}
