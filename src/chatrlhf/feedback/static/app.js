// Busy states for the forms, keyboard shortcuts for comparing and rating, and the chat page (answers streamed,
// stopped, rated inline).
"use strict";

function setBusy(form, text) {
  form.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  let note = form.querySelector(".busy");
  if (!note) {
    note = document.createElement("span");
    note.className = "busy";
    form.appendChild(note);
  }
  note.textContent = text;
  note.hidden = false;
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("form[data-busy]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      // The clicked button's name/value must still be sent: copy it before the buttons are disabled.
      const button = event.submitter;
      if (button && button.name) {
        const hidden = document.createElement("input");
        hidden.type = "hidden";
        hidden.name = button.name;
        hidden.value = button.value;
        form.appendChild(hidden);
      }
      setBusy(form, form.dataset.busy);
    });
  });

  const judge = document.querySelector("form.judge");
  if (judge && judge.querySelector("[name=choice]")) {
    document.addEventListener("keydown", (event) => {
      // A held key repeats: only a fresh press counts, so holding "1" never votes on the pages that follow.
      if (event.repeat || event.ctrlKey || event.metaKey || event.altKey) return;
      if (event.target.tagName === "TEXTAREA" || event.target.tagName === "INPUT") return;
      const id = { "1": "choose-a", "2": "choose-tie", "3": "choose-b", "s": "skip", "u": "undo" }[event.key];
      const button = id && document.getElementById(id);
      if (button && !button.disabled) button.click();
    });
  }

  // Answers are shown rendered (safe Markdown, made on the server); the toggle shows what the model wrote.
  const toggle = document.getElementById("raw-toggle");
  if (toggle) {
    toggle.addEventListener("click", () => {
      const raw = toggle.textContent.startsWith("Show the raw");
      document.querySelectorAll(".text.md").forEach((el) => { el.hidden = raw; });
      document.querySelectorAll(".text.raw").forEach((el) => { el.hidden = !raw; });
      toggle.textContent = raw ? "Show it rendered" : "Show the raw text";
    });
  }

  const rating = document.querySelector("form.rating");
  if (rating) setUpRatingKeys(rating);

  const chat = document.getElementById("chat-form");
  if (chat) setUpChat(chat);
});

// Rate with the keyboard: 1-5 score the highlighted dimension and move on, Backspace goes back, Enter saves
// (Ctrl+Enter or Cmd+Enter in the comment box), u undoes the last rating.
function setUpRatingKeys(form) {
  const rows = Array.from(form.querySelectorAll("tr[data-dim]"));
  let current = 0;
  function highlight() {
    rows.forEach((row, i) => row.classList.toggle("current", i === current));
  }
  highlight();
  rows.forEach((row, i) => row.addEventListener("change", () => { current = Math.min(i + 1, rows.length - 1); highlight(); }));
  function save() {
    if (!form.querySelector("button").disabled) form.requestSubmit();
  }
  document.addEventListener("keydown", (event) => {
    const inComment = event.target.tagName === "TEXTAREA" && form.contains(event.target);
    if (inComment && event.key === "Enter" && (event.ctrlKey || event.metaKey) && !event.altKey) {
      event.preventDefault();  // no new line; a held key saves once
      if (!event.repeat) save();
      return;
    }
    if (event.repeat || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.tagName === "TEXTAREA" || event.target.tagName === "INPUT" && event.target.type !== "radio") return;
    if (event.target.closest && event.target.closest("form.undo")) return;  // the focused Undo button: Enter undoes
    if (/^[1-5]$/.test(event.key)) {
      event.preventDefault();
      const input = document.getElementById(rows[current].dataset.dim + "-" + event.key);
      input.checked = true;
      current = Math.min(current + 1, rows.length - 1);
      highlight();
    } else if (event.key === "Backspace") {
      event.preventDefault();
      current = Math.max(current - 1, 0);
      highlight();
    } else if (event.key === "Enter") {
      event.preventDefault();
      save();
    } else if (event.key === "u") {
      const undo = document.getElementById("undo");
      if (undo && !undo.disabled) undo.click();
    }
  });
}

// Model text goes in as text (textContent), or as the HTML the server's safe Markdown renderer made of it
// (feedback/markdown.py: escaped first, no attributes), parsed by a <template>, which runs nothing.
function fill(body, html) {
  const template = document.createElement("template");
  template.innerHTML = html;
  body.replaceChildren(template.content);
}

function randomId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function postJson(url, payload, signal) {
  const response = await fetch(url, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload), signal: signal,
  });
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error || message; } catch (err) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// Server-sent events of one POST (EventSource only does GET): calls onEvent(name, data) for each.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const name = (frame.match(/^event: (.*)$/m) || [])[1];
      const data = (frame.match(/^data: (.*)$/m) || [])[1];
      if (name && data !== undefined) onEvent(name, JSON.parse(data));
    }
  }
}

// The rating form beside a chat answer (a clone of the page's template), saved as JSON to /rate.
function inlineRating(answerId) {
  const form = document.getElementById("inline-rating").content.firstElementChild.cloneNode(true);
  const status = form.querySelector(".inline-status");
  form.querySelector(".rate-page").href = "/rate?answer_id=" + encodeURIComponent(answerId);
  let requestId = randomId();  // one per attempt: a resubmitted save is not a second rating
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const payload = { request_id: requestId, answer_id: answerId, comment: form.elements.comment.value };
    form.querySelectorAll("tr[data-dim]").forEach((row) => {
      payload[row.dataset.dim] = form.elements[row.dataset.dim].value;
    });
    const save = form.querySelector(".save-inline");
    save.disabled = true;
    status.className = "inline-status busy";
    status.textContent = "Saving...";
    try {
      await postJson("/rate", payload);
      requestId = randomId();
      status.className = "inline-status saved";
      status.textContent = "Saved.";
    } catch (err) {
      status.className = "inline-status error";
      status.textContent = "Not saved: " + err.message;
    } finally {
      save.disabled = false;
    }
  });
  return form;
}

function setUpChat(form) {
  const log = document.getElementById("chat-log");
  const input = document.getElementById("chat-input");
  const busy = document.getElementById("chat-busy");
  const error = document.getElementById("chat-error");
  const send = document.getElementById("chat-send");
  const stopButton = document.getElementById("chat-stop");
  const toggle = document.getElementById("raw-toggle");
  // The conversation survives leaving the page (to rate an answer, say): kept in this tab's sessionStorage.
  let shown = [];
  try { shown = JSON.parse(sessionStorage.getItem("chatrlhf-chat") || "[]"); } catch (err) { shown = []; }
  if (!Array.isArray(shown)) shown = [];
  shown = shown.filter((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.text === "string");
  let messages = shown.map((m) => ({ role: m.role, content: m.text }));
  function keep() { sessionStorage.setItem("chatrlhf-chat", JSON.stringify(shown)); }

  function show(role, text) {
    const row = document.createElement("div");
    row.className = "msg " + role;
    const who = document.createElement("span");
    who.className = "role";
    who.textContent = role;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    row.append(who, body);
    log.appendChild(row);
    row.scrollIntoView({ block: "end" });
    return row;
  }
  // A finished answer: rendered Markdown and the raw text (the page's toggle), the cut note, its rating.
  function complete(row, m) {
    const body = row.querySelector(".text");
    body.className = "text md";
    fill(body, m.html);
    const raw = document.createElement("pre");
    raw.className = "text raw";
    raw.textContent = m.text;
    const showRaw = toggle.textContent.startsWith("Show it rendered");
    body.hidden = showRaw;
    raw.hidden = !showRaw;
    body.after(raw);
    if (m.finished === false) {
      const cut = document.createElement("p");
      cut.className = "cut";
      cut.textContent = m.stopped ? "(stopped)" : "(cut at the length limit)";
      row.appendChild(cut);
    }
    if (m.answerId !== undefined) {
      const rate = document.createElement("button");
      rate.type = "button";
      rate.className = "rate-link";
      rate.textContent = "Rate this answer";
      rate.addEventListener("click", () => {
        const open = row.querySelector("form.inline-rating");
        if (open) { open.remove(); return; }
        row.appendChild(inlineRating(m.answerId));
      });
      row.appendChild(rate);
    }
  }
  shown.forEach((m) => {
    const row = show(m.role, m.text);
    if (m.role === "assistant" && typeof m.html === "string") complete(row, m);
  });

  document.getElementById("chat-reset").addEventListener("click", () => {
    messages = [];
    shown = [];
    keep();
    log.replaceChildren();
    input.focus();
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  let streamId = null;
  let stopWanted = false;
  async function stop() {
    stopWanted = true;
    stopButton.disabled = true;
    if (streamId) await postJson("/api/chat/stop", { stream_id: streamId }).catch(() => {});
  }
  stopButton.addEventListener("click", stop);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !stopButton.hidden && !stopButton.disabled) stop();
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || send.disabled) return;
    error.hidden = true;
    const pending = messages.concat([{ role: "user", content: text }]);
    const userRow = show("user", text);
    const answerRow = show("assistant", "");
    input.value = "";
    send.disabled = true;
    busy.hidden = false;
    stopButton.hidden = false;
    stopButton.disabled = false;
    streamId = null;
    stopWanted = false;
    let result = null;
    try {
      const response = await postJson("/api/chat/stream",
        { model: Number(document.getElementById("chat-model").value), messages: pending });
      await readEvents(response, (name, data) => {
        if (name === "start") {
          streamId = data.stream_id;
          if (stopWanted) stop();
        } else if (name === "delta") {
          answerRow.querySelector(".text").textContent += data.text;
          answerRow.scrollIntoView({ block: "end" });
        } else if (name === "done") {
          result = data;
        } else if (name === "error") {
          throw new Error(data.error);
        }
      });
      if (!result) throw new Error("stopped before the model started");
      const m = { role: "assistant", text: result.text, html: result.html, answerId: result.answer_id,
                  finished: result.finished, stopped: result.stopped };
      messages = pending.concat([{ role: "assistant", content: result.text }]);
      answerRow.querySelector(".text").textContent = result.text;
      complete(answerRow, m);
      shown.push({ role: "user", text: text }, m);
      keep();
    } catch (err) {
      userRow.remove();
      answerRow.remove();
      input.value = text;
      error.textContent = "Not sent: " + err.message;
      error.hidden = false;
    } finally {
      send.disabled = false;
      busy.hidden = true;
      stopButton.hidden = true;
      streamId = null;
    }
  });
}
