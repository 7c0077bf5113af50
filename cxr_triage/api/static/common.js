"use strict";
function csrfToken() {
  var m = document.querySelector('meta[name="csrf-token"]');
  return m ? m.getAttribute("content") : "";
}
function postJSON(url, body) {
  return fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrfToken()},
    body: JSON.stringify(body || {})
  }).then(function (r) {
    if (!r.ok) {
      // Show the server's reason (e.g. "nothing to re-queue ...") rather than a bare status code.
      return r.json().catch(function () { return {}; }).then(function (b) {
        throw new Error(typeof b.detail === "string" ? b.detail : "HTTP " + r.status);
      });
    }
    return r.json();
  });
}
