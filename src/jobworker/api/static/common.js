"use strict";
// Shared by the console's pages: formatting, and confirming actions before they are sent.
// Everything a job or its output says is put in the page as text (textContent), never as
// markup.

const jw = {
  bytes(n) {
    if (n === null || n === undefined) return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  },
  age(ms) {
    if (!ms) return "";
    const s = Math.max(0, (Date.now() - ms) / 1000);
    if (s < 60) return Math.floor(s) + "s";
    if (s < 3600) return Math.floor(s / 60) + "m";
    if (s < 86400) return Math.floor(s / 3600) + "h";
    return Math.floor(s / 86400) + "d";
  },
  time(ms) {
    return ms ? new Date(ms).toLocaleString() : "";
  },
  // CPU % of one core between two [seconds, CPU seconds] points; null without an earlier
  // one (the list and the job page's chart both count it so).
  cpuPercent(before, after) {
    if (!before || after[0] <= before[0]) return null;
    return Math.max(0, 100 * (after[1] - before[1]) / (after[0] - before[0]));
  },
  exit(job) {
    if (job.oom) return "OOM killed";
    if (job.signal !== null && job.signal !== undefined) return "signal " + job.signal;
    if (job.exit !== null && job.exit !== undefined) return String(job.exit);
    return "";
  },
  el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  },
  // Forms marked data-confirm ask in a dialog first; the answer sends the form as it was.
  confirmForms() {
    const dialog = document.getElementById("confirm");
    if (!dialog) return;
    for (const form of document.querySelectorAll("form[data-confirm]")) {
      form.addEventListener("submit", (event) => {
        if (form.dataset.confirmed === "yes") return;
        event.preventDefault();
        const submitter = event.submitter;
        document.getElementById("confirm-text").textContent = form.dataset.confirm;
        dialog.returnValue = "";
        dialog.addEventListener("close", () => {
          if (dialog.returnValue !== "ok") return;
          form.dataset.confirmed = "yes";
          form.requestSubmit(submitter);
        }, { once: true });
        dialog.showModal();
      });
    }
  },
};

document.addEventListener("DOMContentLoaded", () => jw.confirmForms());
