// mriq dashboard: live progress and review shortcuts. The pages work without this file; it
// only keeps the progress bars of running jobs current by polling the dashboard's small JSON
// endpoints, and turns keys into clicks on the review buttons that carry data-key.
"use strict";
(function () {
  var INTERVAL_MS = 1000;

  function setBar(bar, p) {
    var fill = bar.querySelector(".bar");
    fill.style.width = p.percent + "%";
    fill.className = "bar status-" + p.status;
    bar.setAttribute("aria-valuenow", String(p.percent));
    var label = bar.querySelector("[data-field=percent]");
    if (label) { label.textContent = p.percent + " %"; }
  }

  function setText(root, field, text) {
    var el = root.querySelector("[data-field=" + field + "]");
    if (el) { el.textContent = text; }
  }

  function setStatus(el, status) {
    if (!el) { return; }
    el.textContent = status;
    el.className = "badge status-" + status;
  }

  function get(url, onData) {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) { if (data) { onData(data); } })
      .catch(function () { /* the next poll tries again */ });
  }

  // One job's page.
  function followJob(bar) {
    var url = bar.getAttribute("data-progress-url");
    var section = document.getElementById("job-progress");
    function poll() {
      get(url, function (p) {
        setBar(bar, p);
        setText(section, "done", p.done + " / " + p.total);
        setText(section, "rate", p.rate ? p.rate.toFixed(1) + " / s" : "–");
        setText(section, "eta", p.eta_s === null ? "–" : Math.round(p.eta_s) + " s");
        if (p.errors !== undefined) { setText(section, "errors", String(p.errors)); }
        setStatus(document.getElementById("job-status"), p.status);
        if (p.terminal) {
          bar.classList.add("done");
          var hint = document.querySelector("[data-when-done]");
          if (hint) { hint.hidden = false; }
          var cancel = section.querySelector("form");
          if (cancel) { cancel.hidden = true; }
          return;
        }
        window.setTimeout(poll, INTERVAL_MS);
      });
    }
    window.setTimeout(poll, INTERVAL_MS);
  }

  // The jobs list: every running row, one request per poll.
  function followJobs(table) {
    var url = table.getAttribute("data-live-jobs");
    function poll() {
      var rows = table.querySelectorAll("tr[data-running]");
      if (!rows.length) { return; }
      var ids = Array.prototype.map.call(rows, function (r) { return r.getAttribute("data-job-id"); });
      get(url + "?ids=" + ids.join(","), function (all) {
        Array.prototype.forEach.call(rows, function (row) {
          var p = all[row.getAttribute("data-job-id")];
          if (!p) { return; }
          setBar(row.querySelector(".progress"), p);
          setText(row, "done", p.done + " / " + p.total);
          setStatus(row.querySelector("[data-field=status]"), p.status);
          if (p.terminal) { row.removeAttribute("data-running"); }
        });
        window.setTimeout(poll, INTERVAL_MS);
      });
    }
    window.setTimeout(poll, INTERVAL_MS);
  }

  // Review pages: a = accept, 1-9 = that top-k label, n = next, f = flag. Each key clicks
  // the button (or link) marked data-key, so a shortcut sends exactly the form a click does.
  function reviewKeys(event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) { return; }
    var target = event.target;
    if (target && target.closest && target.closest("input, select, textarea, [contenteditable]")) {
      return;
    }
    var key = event.key && event.key.length === 1 ? event.key.toLowerCase() : "";
    if (!/^[a-z0-9]$/.test(key)) { return; }
    var el = document.querySelector("[data-key='" + key + "']");
    if (!el || el.disabled) { return; }
    event.preventDefault();
    el.click();
    if (el.tagName === "BUTTON") {
      // One decision per page: the next key press waits for the next page.
      document.removeEventListener("keydown", reviewKeys);
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (document.querySelector("[data-key]")) {
      document.addEventListener("keydown", reviewKeys);
    }
    var bar = document.querySelector("#job-progress [data-progress-url]");
    if (bar) { followJob(bar); }
    var table = document.querySelector("table[data-live-jobs]");
    if (table) { followJobs(table); }
  });
})();
