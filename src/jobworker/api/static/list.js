"use strict";
// The jobs list: every job the caller may see arrives once ("snapshot"), then each change;
// a page of them is drawn at a time, so 10,000 jobs cost one page of rows in the DOM.

(() => {
  const PER_PAGE = 100;
  const table = document.getElementById("jobs");
  const body = table.tBodies[0];
  const summary = document.getElementById("summary");
  const stateFilter = document.getElementById("state-filter");
  const search = document.getElementById("search");
  const prev = document.getElementById("prev");
  const next = document.getElementById("next");
  const pageLabel = document.getElementById("page");
  let jobs = new Map();
  let usage = {};
  let page = 0;
  let drawing = false;
  let loaded = false;

  function shown() {
    const state = stateFilter.value;
    const text = search.value.trim().toLowerCase();
    const list = [];
    for (const job of jobs.values()) {
      if (state && job.state !== state) continue;
      if (text && !(job.id.startsWith(text) || job.name.toLowerCase().includes(text)
          || job.command.toLowerCase().includes(text))) continue;
      list.push(job);
    }
    list.sort((a, b) => (b.created || 0) - (a.created || 0) || (a.id < b.id ? -1 : 1));
    return list;
  }

  // A running job's latest samples ([ms, CPU seconds, memory bytes, pids], oldest first).
  function usageCells(job, cpu, mem) {
    const rows = job.state === "running" ? usage[job.id] : undefined;
    if (!rows || !rows.length) { cpu.textContent = ""; mem.textContent = ""; return; }
    const newer = rows[rows.length - 1];
    const older = rows.length > 1 ? rows[0] : null;
    const percent = older && jw.cpuPercent([older[0] / 1000, older[1]], [newer[0] / 1000, newer[1]]);
    cpu.textContent = percent === null ? "" : percent.toFixed(1) + "%";
    mem.textContent = jw.bytes(newer[2]) + (job.memoryLimit ? " / " + jw.bytes(job.memoryLimit) : "");
  }

  function row(job) {
    const tr = document.createElement("tr");
    tr.dataset.id = job.id;
    const idCell = document.createElement("td");
    const link = jw.el("a", job.id.slice(0, 8));
    link.href = "/jobs/" + job.id;
    link.setAttribute("aria-label", "job " + (job.name || job.id));
    idCell.appendChild(link);
    tr.appendChild(idCell);
    tr.appendChild(jw.el("td", job.name));
    tr.appendChild(jw.el("td", job.owner));
    tr.appendChild(jw.el("td", job.command, "cmd"));
    const stateCell = document.createElement("td");
    const badge = jw.el("span", job.state, "state");
    badge.dataset.state = job.state;
    stateCell.appendChild(badge);
    tr.appendChild(stateCell);
    tr.appendChild(jw.el("td", jw.exit(job), "num"));
    tr.appendChild(jw.el("td", jw.age(job.created), "num"));
    const cpu = jw.el("td", "", "num cpu");
    const mem = jw.el("td", "", "num mem");
    usageCells(job, cpu, mem);
    tr.appendChild(cpu);
    tr.appendChild(mem);
    return tr;
  }

  function draw() {
    drawing = false;
    const list = shown();
    const pages = Math.max(1, Math.ceil(list.length / PER_PAGE));
    page = Math.min(page, pages - 1);
    const first = page * PER_PAGE;
    const slice = list.slice(first, first + PER_PAGE);
    const rows = document.createDocumentFragment();
    for (const job of slice) rows.appendChild(row(job));
    body.replaceChildren(rows);
    let running = 0;
    for (const job of jobs.values()) if (job.state === "running") running += 1;
    summary.textContent = jobs.size + " jobs, " + running + " running"
      + (list.length ? "; showing " + (first + 1) + "–" + (first + slice.length)
        + " of " + list.length : "; none match");
    pageLabel.textContent = "Page " + (page + 1) + " of " + pages;
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
    // For bench/web.py: when the list was drawn (the first time, and the last 100 times).
    if (performance.getEntriesByName("jobs-drawn").length >= 100) performance.clearMarks("jobs-drawn");
    performance.mark("jobs-drawn");
  }

  function redraw() {
    if (!loaded || drawing) return;
    drawing = true;
    requestAnimationFrame(draw);
  }

  const owner = table.dataset.owner;
  const events = new EventSource("/events/jobs" + (owner ? "?owner=" + encodeURIComponent(owner) : ""));
  events.addEventListener("snapshot", (e) => {
    jobs = new Map(JSON.parse(e.data).map((j) => [j.id, j]));
    loaded = true;
    draw();
  });
  events.addEventListener("job", (e) => {
    const job = JSON.parse(e.data);
    jobs.set(job.id, job);
    redraw();
  });
  events.addEventListener("deleted", (e) => {
    jobs.delete(JSON.parse(e.data).id);
    redraw();
  });
  events.addEventListener("usage", (e) => {
    usage = JSON.parse(e.data);
    for (const tr of body.rows) {
      const job = jobs.get(tr.dataset.id);
      if (job) usageCells(job, tr.querySelector(".cpu"), tr.querySelector(".mem"));
    }
  });
  events.addEventListener("problem", (e) => {
    summary.textContent = JSON.parse(e.data).error;
    summary.classList.add("problem");
    events.close();
  });
  events.addEventListener("error", () => {
    summary.textContent = events.readyState === EventSource.CONNECTING
      ? "Reconnecting…" : "The list could not be loaded; reload the page to try again.";
  });

  stateFilter.addEventListener("change", () => { page = 0; redraw(); });
  search.addEventListener("input", () => { page = 0; redraw(); });
  prev.addEventListener("click", () => { page = Math.max(0, page - 1); redraw(); });
  next.addEventListener("click", () => { page += 1; redraw(); });
  setInterval(redraw, 10000);  // ages move on
})();
