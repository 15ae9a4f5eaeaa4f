// Calls to the hub's API from dashboard pages. The session cookie goes along by itself; requests
// that change something carry X-Twin-CSRF: 1, without which the hub refuses a cookie-signed-in
// POST/PUT/PATCH/DELETE (docs/dashboard.md, "Sign-in cookie and CSRF"). A 401 means the session
// expired: back to the sign-in form, returning to this page afterwards.

const SAFE = new Set(["GET", "HEAD", "OPTIONS"]);

export async function api(path, { method = "GET", body, headers = {} } = {}) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json", ...headers } };
  if (!SAFE.has(method.toUpperCase())) init.headers["X-Twin-CSRF"] = "1";
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    const here = window.location.pathname + window.location.search;
    window.location.assign(`/login?next=${encodeURIComponent(here)}`);
  }
  return response;
}
