"use strict";
// Output with ANSI colours, as text. Written here rather than taken from a library: the
// ones that exist (ansi_up, ansi-to-html) build an HTML string to assign to innerHTML, and
// the console never turns a job's bytes into markup. This one makes <span> elements whose
// textContent is the output, keeps SGR colour and weight per stream, and drops every other
// control sequence (cursor moves, titles), even one split across two chunks.

class AnsiText {
  constructor(pre, maxNodes) {
    this.pre = pre;
    this.maxNodes = maxNodes;
    this.state = {};    // stream letter -> {fg, bg, bold, italic, underline}
    this.pending = {};  // stream letter -> an escape sequence cut by the chunk's end
  }

  clear() {
    this.pre.replaceChildren();
    this.state = {};
    this.pending = {};
  }

  append(stream, text) {
    text = (this.pending[stream] || "") + text;
    this.pending[stream] = "";
    const st = this.state[stream] || (this.state[stream] = {});
    const out = document.createDocumentFragment();
    let plain = "";
    let i = 0;
    const flush = () => {
      if (!plain) return;
      out.appendChild(this.span(stream, st, plain));
      plain = "";
    };
    while (i < text.length) {
      const ch = text[i];
      if (ch === "\r") {
        // A lone CR (a progress bar redrawing its line) starts a new line here.
        plain += text[i + 1] === "\n" ? "" : "\n";
        i += 1;
        continue;
      }
      if (ch !== "\x1b") {
        const next = text.indexOf("\x1b", i);
        const cr = text.indexOf("\r", i);
        let end = next < 0 ? text.length : next;
        if (cr >= 0 && cr < end) end = cr;
        plain += text.slice(i, end);
        i = end;
        continue;
      }
      const seq = this.sequence(text, i);
      if (seq === null) {  // cut off: keep it for the next chunk
        this.pending[stream] = text.slice(i);
        break;
      }
      if (seq.sgr !== undefined) {
        flush();
        this.sgr(st, seq.sgr);
      }
      i = seq.end;
    }
    flush();
    this.pre.appendChild(out);
    while (this.maxNodes && this.pre.childNodes.length > this.maxNodes) {
      this.pre.removeChild(this.pre.firstChild);
    }
  }

  // The escape sequence at text[i] ("\x1b"): its end, and its parameters if it is SGR;
  // null if the text ends inside it.
  sequence(text, i) {
    const kind = text[i + 1];
    if (kind === undefined) return null;
    if (kind === "[") {
      let j = i + 2;
      while (j < text.length) {
        const code = text.charCodeAt(j);
        if (code >= 0x40 && code <= 0x7e) {
          return text[j] === "m" ? { end: j + 1, sgr: text.slice(i + 2, j) } : { end: j + 1 };
        }
        j += 1;
      }
      return null;
    }
    if (kind === "]") {  // OSC: up to BEL or ST
      for (let j = i + 2; j < text.length; j += 1) {
        if (text[j] === "\x07") return { end: j + 1 };
        if (text[j] === "\x1b" && text[j + 1] === "\\") return { end: j + 2 };
      }
      return null;
    }
    return { end: i + 2 };
  }

  sgr(st, params) {
    const codes = params === "" ? [0] : params.split(";").map((p) => parseInt(p || "0", 10));
    for (let k = 0; k < codes.length; k += 1) {
      const c = codes[k];
      if (c === 0) { st.fg = st.bg = undefined; st.bold = st.italic = st.underline = false; }
      else if (c === 1) st.bold = true;
      else if (c === 3) st.italic = true;
      else if (c === 4) st.underline = true;
      else if (c === 22) st.bold = false;
      else if (c === 23) st.italic = false;
      else if (c === 24) st.underline = false;
      else if ((c >= 30 && c <= 37) || (c >= 90 && c <= 97)) st.fg = c;
      else if (c === 39) st.fg = undefined;
      else if (c >= 40 && c <= 47) st.bg = c;
      else if (c >= 100 && c <= 107) st.bg = c - 60;
      else if (c === 49) st.bg = undefined;
      else if (c === 38 || c === 48) k += codes[k + 1] === 5 ? 2 : 4;  // 256/true colour: skipped
    }
  }

  span(stream, st, text) {
    const classes = [];
    if (stream === "e") classes.push("err");
    if (stream === "x") classes.push("sys");
    if (st.fg) classes.push("f" + st.fg);
    if (st.bg) classes.push("g" + st.bg);
    if (st.bold) classes.push("b");
    if (st.italic) classes.push("i");
    if (st.underline) classes.push("u");
    const span = document.createElement("span");
    if (classes.length) span.className = classes.join(" ");
    span.textContent = text;
    return span;
  }
}
