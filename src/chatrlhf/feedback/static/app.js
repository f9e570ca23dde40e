// Busy states for the forms, keyboard shortcuts for comparing, and the chat page.
// Model text is only ever inserted with textContent: it is never parsed as HTML.
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
      const id = { "1": "choose-a", "2": "choose-tie", "3": "choose-b", "s": "skip" }[event.key];
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

// Rate with the keyboard: 1-5 score the highlighted dimension and move on, Backspace goes back, Enter saves.
function setUpRatingKeys(form) {
  const rows = Array.from(form.querySelectorAll("tr[data-dim]"));
  let current = 0;
  function highlight() {
    rows.forEach((row, i) => row.classList.toggle("current", i === current));
  }
  highlight();
  rows.forEach((row, i) => row.addEventListener("change", () => { current = Math.min(i + 1, rows.length - 1); highlight(); }));
  document.addEventListener("keydown", (event) => {
    if (event.repeat || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.tagName === "TEXTAREA" || event.target.tagName === "INPUT" && event.target.type !== "radio") return;
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
      if (!form.querySelector("button").disabled) form.requestSubmit();
    }
  });
}

function setUpChat(form) {
  const log = document.getElementById("chat-log");
  const input = document.getElementById("chat-input");
  const busy = document.getElementById("chat-busy");
  const error = document.getElementById("chat-error");
  const send = document.getElementById("chat-send");
  // The conversation survives leaving the page (to rate an answer, say): kept in this tab's sessionStorage.
  let shown = [];
  try { shown = JSON.parse(sessionStorage.getItem("chatrlhf-chat") || "[]"); } catch (err) { shown = []; }
  if (!Array.isArray(shown)) shown = [];
  shown = shown.filter((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.text === "string");
  let messages = shown.map((m) => ({ role: m.role, content: m.text }));
  function keep() { sessionStorage.setItem("chatrlhf-chat", JSON.stringify(shown)); }

  function show(role, text, answerId, finished) {
    const row = document.createElement("div");
    row.className = "msg " + role;
    const who = document.createElement("span");
    who.className = "role";
    who.textContent = role;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    row.append(who, body);
    if (finished === false) {
      const cut = document.createElement("p");
      cut.className = "cut";
      cut.textContent = "(cut at the length limit)";
      row.appendChild(cut);
    }
    if (answerId !== undefined) {
      const rate = document.createElement("a");
      rate.href = "/rate?answer_id=" + encodeURIComponent(answerId);
      rate.className = "rate-link";
      rate.textContent = "Rate this answer";
      row.appendChild(rate);
    }
    log.appendChild(row);
    row.scrollIntoView({ block: "end" });
  }
  shown.forEach((m) => show(m.role, m.text, m.answerId, m.finished));

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
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || send.disabled) return;
    error.hidden = true;
    const pending = messages.concat([{ role: "user", content: text }]);
    show("user", text);
    input.value = "";
    send.disabled = true;
    busy.hidden = false;
    try {
      const response = await fetch("/api/chat", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model: Number(document.getElementById("chat-model").value), messages: pending }),
      });
      const data = await response.json();
      if (!response.ok) throw new Error(data.error || response.statusText);
      messages = pending.concat([{ role: "assistant", content: data.text }]);
      show("assistant", data.text, data.answer_id, data.finished);
      shown.push({ role: "user", text: text }, { role: "assistant", text: data.text, answerId: data.answer_id,
                                                 finished: data.finished });
      keep();
    } catch (err) {
      log.lastChild.remove();
      input.value = text;
      error.textContent = "Not sent: " + err.message;
      error.hidden = false;
    } finally {
      send.disabled = false;
      busy.hidden = true;
    }
  });
}
