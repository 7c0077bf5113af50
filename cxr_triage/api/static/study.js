"use strict";
(function () {
  var instances = JSON.parse(document.getElementById("study-data").textContent);
  var img = document.getElementById("image");
  var canvas = document.getElementById("overlay");
  var status = document.getElementById("image-status");
  var boxesToggle = document.getElementById("toggle-boxes");
  var heatToggle = document.getElementById("toggle-heatmap");
  var select = document.getElementById("instance-select");
  var current = 0;

  // Prefer the first analysed image.
  for (var k = 0; k < instances.length; k++) { if (instances[k].analysis) { current = k; break; } }
  if (select) { select.value = String(current); }

  function jet(v) {
    v = Math.max(0, Math.min(1, v));
    var r = Math.max(0, Math.min(1, 1.5 - Math.abs(4 * v - 3)));
    var g = Math.max(0, Math.min(1, 1.5 - Math.abs(4 * v - 2)));
    var b = Math.max(0, Math.min(1, 1.5 - Math.abs(4 * v - 1)));
    return [Math.round(r * 255), Math.round(g * 255), Math.round(b * 255)];
  }

  function draw() {
    var inst = instances[current];
    var w = img.clientWidth, h = img.clientHeight;
    canvas.width = w; canvas.height = h;
    canvas.style.width = w + "px"; canvas.style.height = h + "px";
    canvas.style.left = img.offsetLeft + "px"; canvas.style.top = img.offsetTop + "px";
    var ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, w, h);
    if (!inst || !inst.analysis || !w || !h) { return; }
    var a = inst.analysis;
    var srcW = inst.columns || img.naturalWidth, srcH = inst.rows || img.naturalHeight;
    var sx = w / srcW, sy = h / srcH;
    if (heatToggle.checked && a.heatmap && a.heatmap.length) {
      // Paint the small grid into an offscreen canvas, then scale it up smoothly over the image extent.
      var gh = a.heatmap.length, gw = a.heatmap[0].length;
      var off = document.createElement("canvas");
      off.width = gw; off.height = gh;
      var octx = off.getContext("2d");
      var px = octx.createImageData(gw, gh);
      for (var y = 0; y < gh; y++) {
        for (var x = 0; x < gw; x++) {
          var v = Math.max(0, Math.min(1, a.heatmap[y][x]));
          var c = jet(v), o = (y * gw + x) * 4;
          px.data[o] = c[0]; px.data[o + 1] = c[1]; px.data[o + 2] = c[2]; px.data[o + 3] = Math.round(150 * v);
        }
      }
      octx.putImageData(px, 0, 0);
      ctx.imageSmoothingEnabled = true;
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(off, 0, 0, w, h);
    }
    if (boxesToggle.checked) {
      ctx.lineWidth = 2;
      ctx.font = "bold 13px sans-serif";
      a.boxes.forEach(function (b) {
        var x0 = b.x0 * sx, y0 = b.y0 * sy, bw = (b.x1 - b.x0) * sx, bh = (b.y1 - b.y0) * sy;
        ctx.strokeStyle = "#ffcc00";
        ctx.strokeRect(x0, y0, bw, bh);
        var label = "opacity " + b.score.toFixed(2);
        var tw = ctx.measureText(label).width + 6;
        ctx.fillStyle = "rgba(0,0,0,0.65)";
        ctx.fillRect(x0, Math.max(0, y0 - 17), tw, 17);
        ctx.fillStyle = "#ffcc00";
        ctx.fillText(label, x0 + 3, Math.max(12, y0 - 4));
      });
    }
    canvas.setAttribute("data-boxes-drawn", boxesToggle.checked ? String(a.boxes.length) : "0");
    canvas.setAttribute("data-heatmap-drawn", heatToggle.checked && a.heatmap ? "1" : "0");
  }

  function show(i) {
    current = i;
    var inst = instances[i];
    status.textContent = "";
    if (!inst) { status.textContent = "No image."; return; }
    if (!inst.analysis) {
      status.textContent = inst.state === "analysed" ? "" :
        "This image was not analysed (" + (inst.reason || inst.state) + "): no overlay, not a negative result.";
    }
    img.onload = function () { img.setAttribute("data-loaded", "1"); draw(); };
    img.onerror = function () { status.textContent = "The image could not be rendered."; };
    img.src = inst.image_url;
  }

  boxesToggle.addEventListener("change", draw);
  heatToggle.addEventListener("change", draw);
  if (select) { select.addEventListener("change", function () { show(parseInt(select.value, 10)); }); }
  window.addEventListener("resize", draw);
  show(current);

  function mark(read) {
    var btn = document.getElementById(read ? "mark-read" : "mark-unread");
    postJSON("/api/studies/" + btn.getAttribute("data-study-id") + "/read", {read: read})
      .then(function () { window.location = read ? "/" : window.location.pathname; })
      .catch(function (e) { document.getElementById("read-status").textContent = "Failed: " + e.message; });
  }
  var readBtn = document.getElementById("mark-read");
  if (readBtn) { readBtn.addEventListener("click", function () { mark(true); }); }
  var unreadBtn = document.getElementById("mark-unread");
  if (unreadBtn) { unreadBtn.addEventListener("click", function () { mark(false); }); }
})();
