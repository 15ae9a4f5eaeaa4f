// DOM building for the dashboard's page scripts. Text always goes in as textContent, so names and
// messages from gateways and users are data, never markup.

export const SVG_NS = "http://www.w3.org/2000/svg";

// An HTML element: attributes ("text" sets its text), then child nodes or strings.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// An SVG element with attributes and optional text.
export function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}
