"use strict";
document.addEventListener("click", function (ev) {
  var btn = ev.target.closest("button.action");
  if (!btn) { return; }
  btn.disabled = true;
  postJSON(btn.getAttribute("data-url"), {})
    .then(function () { btn.textContent = "Done"; })
    .catch(function (e) { btn.textContent = "Failed (" + e.message + ")"; btn.disabled = false; });
});
