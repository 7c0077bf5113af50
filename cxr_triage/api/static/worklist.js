"use strict";
(function () {
  var body = document.getElementById("worklist-body");
  var live = document.getElementById("live");
  var pending = false;

  function refresh() {
    if (pending) { return; }
    pending = true;
    fetch("/worklist/rows", {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (r) {
        if (r.status === 401 || r.redirected) { window.location = "/login?next=/"; return null; }
        return r.text();
      })
      .then(function (html) { if (html !== null) { body.innerHTML = html; } })
      .catch(function () { live.textContent = "offline"; live.className = "live off"; })
      .then(function () { pending = false; });
  }

  body.addEventListener("click", function (ev) {
    var row = ev.target.closest("tr[data-study-id]");
    if (row && !ev.target.closest("a")) { window.location = "/studies/" + row.getAttribute("data-study-id"); }
  });

  if (window.EventSource) {
    var es = new EventSource("/api/worklist/events");
    es.addEventListener("hello", function () { live.textContent = "live"; live.className = "live on"; });
    es.addEventListener("changed", refresh);
    es.onerror = function () { live.textContent = "reconnecting…"; live.className = "live off"; };
    es.onopen = function () { live.textContent = "live"; live.className = "live on"; refresh(); };
  }
  // Waiting times (and overdue promotion) change with the clock even when nothing arrives.
  setInterval(refresh, 30000);
})();
