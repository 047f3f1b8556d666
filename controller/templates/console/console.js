// Continuity console: the only script. It does two things and never writes markup:
// 1. asks for confirmation on buttons that carry data-confirm;
// 2. follows an incident's timeline over server-sent events, adding entries with textContent.
(function () {
  "use strict";
  document.addEventListener("submit", function (ev) {
    var button = ev.submitter || ev.target.querySelector("button[data-confirm]");
    var text = button && button.getAttribute("data-confirm");
    if (text && !window.confirm(text)) { ev.preventDefault(); }
  });
  var list = document.getElementById("timeline");
  if (!list || !window.EventSource || list.getAttribute("data-open") !== "1") { return; }
  var after = list.getAttribute("data-count") || "0";
  var source = new EventSource(list.getAttribute("data-stream") + "?after=" + encodeURIComponent(after));
  var live = document.getElementById("live");
  source.onopen = function () { if (live) { live.hidden = false; } };
  source.onerror = function () { if (live) { live.hidden = true; } };
  function cell(tag, cls, text) {
    var el = document.createElement(tag);
    if (cls) { el.className = cls; }
    el.textContent = text;
    return el;
  }
  source.addEventListener("entry", function (ev) {
    var e = JSON.parse(ev.data);
    var li = document.createElement("li");
    li.className = "entry fresh kind-" + String(e.kind).replace(/[^a-z0-9_-]/gi, "");
    var t = cell("time", "", e.at);
    t.title = e.when;
    li.appendChild(t);
    li.appendChild(cell("span", "kind", e.kind));
    li.appendChild(cell("span", "msg", e.message));
    list.appendChild(li);
    list.setAttribute("data-count", String(e.n));
  });
  source.addEventListener("status", function () {
    var note = document.getElementById("status-note");
    if (note) { note.hidden = false; }
  });
})();
