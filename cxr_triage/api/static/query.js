"use strict";
document.getElementById("query-form").addEventListener("submit", function () {
  // Drop empty fields so they are not sent as invalid empty values.
  Array.prototype.forEach.call(this.elements, function (el) {
    if (el.name && el.value === "") { el.disabled = true; }
  });
  var form = this;
  setTimeout(function () {
    Array.prototype.forEach.call(form.elements, function (el) { el.disabled = false; });
  }, 0);
});
