"use strict";
document.addEventListener("click", function (ev) {
  var btn = ev.target.closest("button.action");
  if (!btn) { return; }
  btn.disabled = true;
  postJSON(btn.getAttribute("data-url"), {})
    .then(function (body) {
      // Say what actually happened: how many images were re-queued / deliveries reset.
      if (body.instance_ids) { btn.textContent = "Re-queued " + body.instance_ids.length + " image(s)"; }
      else if (body.outbox_ids) { btn.textContent = "Re-sending to " + body.outbox_ids.length + " destination(s)"; }
      else { btn.textContent = "Done"; }
    })
    .catch(function (e) { btn.textContent = "Failed (" + e.message + ")"; btn.disabled = false; });
});
