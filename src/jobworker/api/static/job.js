"use strict";
// One job's page: its status, CPU and memory charts and output, all kept live over
// server-sent events; the output is paged (the server sends a page, then "more").

(() => {
  const main = document.getElementById("main");
  const id = main.dataset.job;
  const notice = document.getElementById("notice");
  const usageNote = document.getElementById("usage-note");
  let job = null;

  function set(key, text) {
    const dd = document.querySelector('dd[data-field="' + key + '"]');
    if (dd) dd.textContent = text === null || text === undefined ? "" : String(text);
  }

  function limitsText(job) {
    const l = job.limits || {};
    const parts = [];
    if (l.cpus !== null && l.cpus !== undefined) parts.push("CPUs " + l.cpus);
    if (job.memoryLimit) parts.push("memory " + jw.bytes(job.memoryLimit));
    if (l.pids) parts.push("processes " + l.pids);
    if (l.tmp) parts.push("private /tmp " + jw.bytes(l.tmp));
    let text = parts.length ? parts.join(", ") : "none";
    if (l.enforced === false) text += " (not enforced: the server runs without cgroups)";
    return text;
  }

  function sandboxText(job) {
    const s = job.sandbox;
    if (!s) return "none";
    return "uid " + s.uid + ", root " + s.root + ", seccomp " + (s.seccomp ? "on" : "off");
  }

  function show(next) {
    job = next;
    const badge = document.getElementById("state");
    badge.textContent = job.state;
    badge.dataset.state = job.state;
    set("state", job.state);
    set("exit", jw.exit(job));
    set("reason", job.reason);
    set("created", jw.time(job.created));
    set("started", jw.time(job.started));
    set("ended", jw.time(job.ended));
    set("timeout", job.timeout ? job.timeout + " s" : "none");
    set("limits", limitsText(job));
    set("sandbox", sandboxText(job));
    set("labels", job.labels);
    const running = job.state === "running";
    for (const b of document.querySelectorAll('button[data-when="running"]')) b.disabled = !running;
    for (const b of document.querySelectorAll('button[data-when="ended"]')) b.disabled = running;
    if (job.oom) {
      usageNote.textContent = "The kernel's OOM killer ended a process of this job at "
        + jw.time(job.ended) + " (marked on the memory chart).";
    }
    charts.limit(job.memoryLimit);
    if (job.ended && job.usage) {
      // The final figures close the lines at the job's end; after an OOM kill the memory
      // line ends at its peak, which is where the kill came.
      charts.finish(job.ended, job.usage.cpu, job.oom ? job.usage.peak : null);
    }
  }

  // ------------------------------------------------------------------ charts
  const charts = (() => {
    const t = [];
    const cpu = [];
    const mem = [];
    const limit = [];
    let last = null;
    let limitMiB = null;
    const cpuEl = document.getElementById("cpu-chart");
    const memEl = document.getElementById("mem-chart");
    const oomMarker = {
      hooks: {
        draw: [(u) => {
          if (!job || !job.oom || !job.ended) return;
          const x = u.valToPos(job.ended / 1000, "x", true);
          const ctx = u.ctx;
          ctx.save();
          ctx.strokeStyle = "#b3261e";
          ctx.lineWidth = 2 * devicePixelRatio;
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
          ctx.fillStyle = "#b3261e";
          ctx.font = (12 * devicePixelRatio) + "px sans-serif";
          const room = x - u.bbox.left > 70 * devicePixelRatio;
          ctx.textAlign = room ? "right" : "left";
          const gap = (room ? -4 : 4) * devicePixelRatio;
          ctx.fillText("OOM kill", x + gap, u.bbox.top + 14 * devicePixelRatio);
          ctx.restore();
        }],
      },
    };
    // The samples' span (at least 5 s), ending no earlier than the job did. From the
    // samples, not uPlot's min and max: for one point it makes those 1,000 days apart.
    function range() {
      const now = Date.now() / 1000;
      let lo = t.length ? t[0] : now - 5;
      let hi = t.length ? t[t.length - 1] : now;
      if (job && job.ended) hi = Math.max(hi, job.ended / 1000);
      if (hi - lo < 5) lo = hi - 5;
      return [lo, hi];
    }
    function options(series, el, plugins) {
      return {
        width: Math.max(320, el.clientWidth || 600),
        height: 220,
        scales: { x: { time: true, range } },
        series: [{}, ...series],
        plugins,
        legend: { live: false },
      };
    }
    const cpuChart = new uPlot(options([{ label: "CPU %", stroke: "#0b57d0", width: 2 }], cpuEl, []), [t, cpu], cpuEl);
    const memChart = new uPlot(options([
      { label: "Memory MiB", stroke: "#116329", width: 2 },
      { label: "Limit MiB", stroke: "#b3261e", dash: [6, 4], width: 1 },
    ], memEl, [oomMarker]), [t, mem, limit], memEl);

    function redraw() {
      cpuChart.setData([t, cpu]);
      memChart.setData([t, mem, limit]);
      cpuEl.dataset.points = String(t.length);
      memEl.dataset.points = String(t.length);
    }
    addEventListener("resize", () => {
      cpuChart.setSize({ width: Math.max(320, cpuEl.clientWidth), height: 220 });
      memChart.setSize({ width: Math.max(320, memEl.clientWidth), height: 220 });
    });
    let finished = false;
    return {
      finish(endedMs, cpuSeconds, memoryBytes) {
        if (finished) return;
        finished = true;
        const at = endedMs / 1000;
        if (t.length && at <= t[t.length - 1]) return;
        t.push(at);
        cpu.push(jw.cpuPercent(last, [at, cpuSeconds]));
        mem.push(memoryBytes === null ? null : memoryBytes / 1048576);
        limit.push(limitMiB);
        redraw();
      },
      add(samples) {
        if (finished) return;
        for (const [ms, cpuSeconds, bytes] of samples) {
          const at = ms / 1000;
          if (t.length && at <= t[t.length - 1]) continue;
          const point = [at, cpuSeconds];
          t.push(at);
          cpu.push(jw.cpuPercent(last, point));
          last = point;
          mem.push(bytes / 1048576);
          limit.push(limitMiB);
        }
        redraw();
      },
      limit(bytes) {
        limitMiB = bytes ? bytes / 1048576 : null;
        limit.fill(limitMiB);
        redraw();
      },
    };
  })();

  const statusEvents = new EventSource("/events/jobs/" + id);
  statusEvents.addEventListener("status", (e) => show(JSON.parse(e.data)));
  statusEvents.addEventListener("usage", (e) => charts.add(JSON.parse(e.data)));
  statusEvents.addEventListener("end", () => statusEvents.close());
  statusEvents.addEventListener("problem", (e) => {
    notice.textContent = JSON.parse(e.data).error;
    statusEvents.close();
  });

  // ------------------------------------------------------------------ output
  const pre = document.getElementById("output");
  const state = document.getElementById("output-state");
  const more = document.getElementById("more");
  const moreText = document.getElementById("more-text");
  const ansi = new AnsiText(pre, 0);
  let output = null;
  let moreAt = null;

  function follow(query, keep) {
    if (output) output.close();
    more.hidden = true;
    if (!keep) ansi.clear();
    // Following the tail keeps the last 20,000 pieces; a page from the start keeps all.
    ansi.maxNodes = query.startsWith("tail") ? 20000 : 0;
    state.textContent = "Following…";
    const chosen = streams.value ? "streams=" + streams.value : "";
    const params = [query, chosen].filter((p) => p).join("&");
    const source = new EventSource("/events/jobs/" + id + "/output" + (params ? "?" + params : ""));
    output = source;
    source.addEventListener("output", (e) => {
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      for (const [stream, text] of JSON.parse(e.data)) ansi.append(stream, text);
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    });
    source.addEventListener("more", (e) => {
      source.close();
      moreAt = JSON.parse(e.data).offset;
      moreText.textContent = "There is more output than one page.";
      more.hidden = false;
      state.textContent = "Paused after a page.";
    });
    source.addEventListener("end", () => {
      source.close();
      state.textContent = "The job has ended; this is all of its output.";
    });
    source.addEventListener("problem", (e) => {
      source.close();
      state.textContent = JSON.parse(e.data).error;
    });
  }

  document.getElementById("load-more").addEventListener("click", () => follow("offset=" + moreAt, true));
  document.getElementById("jump-end").addEventListener("click", () => follow("tail=1000", false));
  document.getElementById("tail").addEventListener("click", () => follow("tail=1000", false));
  document.getElementById("from-start").addEventListener("click", () => follow("", false));
  // Another stream choice starts over from the start: offsets of one selection are not
  // pages of another.
  const streams = document.getElementById("streams");
  streams.addEventListener("change", () => follow("", false));
  const wrap = document.getElementById("wrap");
  wrap.addEventListener("change", () => pre.classList.toggle("wrap", wrap.checked));
  follow("", false);
})();
