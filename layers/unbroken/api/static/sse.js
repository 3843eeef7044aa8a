// A server-sent events parser (the WHATWG event-stream grammar) that is fed decoded text in arbitrary pieces:
// lines end with CRLF, LF or CR (a CR at the end of one piece may be followed by the LF in the next), a leading BOM
// is dropped, comment lines (`:` — heartbeats) are ignored, multi-line `data` is joined with "\n", a blank line
// dispatches the event. Only frames with data are dispatched.

/** @typedef {{ event: string, data: string, id: string | undefined }} SSEFrame */

export class SSEParser {
  constructor() {
    this.buffer = "";
    this.pendingCR = false; // the last piece ended with CR: a leading LF of the next piece belongs to that line end
    this.started = false;
    this.reset();
  }

  reset() {
    this.eventType = "";
    this.dataLines = [];
    this.lastId = undefined;
    this.sawData = false;
  }

  /**
   * Feed decoded text; returns the frames it completed.
   * @param {string} text
   * @returns {SSEFrame[]}
   */
  push(text) {
    /** @type {SSEFrame[]} */
    const out = [];
    if (!this.started && text.length > 0) {
      this.started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    if (this.pendingCR && text.startsWith("\n")) text = text.slice(1);
    this.pendingCR = false;
    this.buffer += text;
    let start = 0;
    const buf = this.buffer;
    for (let i = 0; i < buf.length; i++) {
      const c = buf.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      const line = buf.slice(start, i);
      if (c === 13) {
        if (i + 1 < buf.length) {
          if (buf.charCodeAt(i + 1) === 10) i++;
        } else {
          this.pendingCR = true;
        }
      }
      start = i + 1;
      const frame = this.line(line);
      if (frame) out.push(frame);
    }
    this.buffer = buf.slice(start);
    return out;
  }

  /**
   * The input ended: a frame without its closing blank line is dropped (the grammar says so, and a frame cut
   * mid-way must never be taken for a whole one).
   */
  end() {
    this.buffer = "";
    this.reset();
    return [];
  }

  /** @param {string} line @returns {SSEFrame | undefined} */
  line(line) {
    if (line === "") {
      if (!this.sawData) {
        this.reset();
        return undefined;
      }
      const frame = { event: this.eventType || "message", data: this.dataLines.join("\n"), id: this.lastId };
      this.reset();
      return frame;
    }
    if (line.charCodeAt(0) === 58) return undefined; // ":" comment (heartbeat)
    const colon = line.indexOf(":");
    let field = line;
    let value = "";
    if (colon !== -1) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.charCodeAt(0) === 32) value = value.slice(1);
    }
    switch (field) {
      case "event":
        this.eventType = value;
        break;
      case "data":
        this.dataLines.push(value);
        this.sawData = true;
        break;
      case "id":
        if (!value.includes("\0")) this.lastId = value;
        break;
      default: // "retry" and unknown fields: ignored
        break;
    }
    return undefined;
  }
}
