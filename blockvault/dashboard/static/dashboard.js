// blockvault dashboard: draws the two charts (uPlot) and keeps the "Running" table live by
// polling the dashboard's JSON for running jobs. Plain DOM, no build step; every text from
// the server goes in through textContent, never as HTML.
(function () {
  "use strict";

  var data = JSON.parse(document.getElementById("bv-data").textContent);

  function humanBytes(n) {
    if (n === null || n === undefined) return "—";
    var units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    var i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? n + " B" : n.toFixed(1) + " " + units[i];
  }

  function humanSeconds(s) {
    if (s < 90) return s.toFixed(s < 1 ? 2 : s < 10 ? 1 : 0) + " s";
    if (s < 5400) return (s / 60).toFixed(1) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  // -- charts --------------------------------------------------------------------------------

  // a single instant sits in the middle of an hour (uPlot would give it 1000 days, at the
  // left edge: it pads one point by 86400 / ms, and ms is 1e-3 for unix seconds)
  function xRange(u, min, max) {
    var xs = u.data[0];
    if (xs.length && xs[0] === xs[xs.length - 1]) return [xs[0] - 1800, xs[0] + 1800];
    return [min, max];
  }

  function chart(id, series, label, color, fmt, fill) {
    var el = document.getElementById(id);
    if (!el || !series[0].length) return;
    var width = Math.max(el.clientWidth, 240);
    var opts = {
      width: width,
      height: 220,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true, range: xRange }, y: { range: function (u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; } } },
      axes: [
        {},
        { size: 84, values: function (u, vals) { return vals.map(fmt); } },
      ],
      series: [
        {},
        {
          label: label,
          stroke: color,
          width: 2,
          fill: fill ? color + "22" : undefined,
          points: { show: true, size: 7, fill: color },
        },
      ],
    };
    var plot = new uPlot(opts, series, el);
    el.setAttribute("data-points", String(series[0].length));
    window.addEventListener("resize", function () {
      plot.setSize({ width: Math.max(el.clientWidth, 240), height: 220 });
    });
  }

  if (window.uPlot) {
    chart("chart-stored", data.stored, "stored", "#2563eb", humanBytes, true);
    chart("chart-durations", data.durations, "seconds", "#d97706", humanSeconds, false);
  }

  // -- live progress ------------------------------------------------------------------------

  var table = document.getElementById("jobs");
  var body = table.tBodies[0];
  var allProjects = table.tHead.rows[0].cells[0].textContent === "Project";

  function percent(done, total) {
    return total ? Math.round((100 * done) / total) + " %" : "—";
  }

  function cell(row, cls, text) {
    var td = document.createElement("td");
    if (cls) td.className = cls;
    if (text !== undefined) td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function newRow(job) {
    var row = document.createElement("tr");
    row.setAttribute("data-job-id", job.id);
    if (allProjects) cell(row, "mono", job.project_id);
    cell(row, "kind", job.kind);
    var name = cell(row, "name", job.backup_name || job.backup_id.slice(0, 8));
    name.title = job.backup_id;
    cell(row, "phase");
    cell(row, "wide").appendChild(document.createElement("progress"));
    cell(row, "done");
    body.appendChild(row);
    return row;
  }

  function update(row, job) {
    row.setAttribute("data-state", job.state);
    row.querySelector(".phase").textContent = job.phase || job.state;
    var bar = row.querySelector("progress");
    bar.max = job.bytes_total || 1;
    bar.value = job.bytes_done;
    row.querySelector(".done").textContent =
      percent(job.bytes_done, job.bytes_total) + " · " + humanBytes(job.bytes_done) +
      " of " + humanBytes(job.bytes_total);
  }

  var reloading = false;

  function apply(jobs) {
    var seen = {};
    jobs.forEach(function (job) {
      seen[job.id] = true;
      var row = body.querySelector('tr[data-job-id="' + CSS.escape(job.id) + '"]');
      update(row || newRow(job), job);
    });
    var ended = false;
    Array.prototype.slice.call(body.rows).forEach(function (row) {
      if (!seen[row.getAttribute("data-job-id")]) { row.remove(); ended = true; }
    });
    table.classList.toggle("empty", jobs.length === 0);
    // a job ended: the backups, storage and charts changed; the server renders them again
    if (ended && !reloading) {
      reloading = true;
      window.setTimeout(function () { window.location.reload(); }, 500);
    }
  }

  function poll() {
    fetch(data.jobsUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (r.status === 401) { window.location.assign(data.loginUrl); throw new Error("signed out"); }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (body) { apply(body.jobs); document.body.classList.remove("stale"); })
      .catch(function () { document.body.classList.add("stale"); })
      .then(function () { if (!reloading) window.setTimeout(poll, data.pollMs); });
  }

  window.setTimeout(poll, data.pollMs);
})();
