// The chat page: keeps the conversation, streams replies from /v1/chat/completions, renders them safely.
//
// Safety rule: model output (and every other text from the server) reaches the page only through
// textContent and createElement, never innerHTML, so "<script>" or "<img onerror=...>" in a reply is shown
// as the characters it is. The server also sends a Content-Security-Policy that forbids inline script.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], controller: null };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Markdown-lite: ``` fenced blocks become <pre><code>, `inline` spans become <code>; the rest stays text.
function renderContent(container, text) {
  container.replaceChildren();
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 1) {  // inside a fence: first line is the language
      const newline = part.indexOf("\n");
      const lang = newline >= 0 ? part.slice(0, newline).trim() : "";
      const code = newline >= 0 ? part.slice(newline + 1) : part;
      const pre = el("pre");
      if (lang) pre.append(el("span", "lang", lang));
      pre.append(el("code", null, code));
      container.append(pre);
    } else if (part) {
      const div = el("div", "text");
      part.split("`").forEach((piece, j) => div.append(j % 2 ? el("code", null, piece) : document.createTextNode(piece)));
      container.append(div);
    }
  });
}

function addMessage(role, text) {
  const box = el("div", `message ${role}`);
  box.append(el("div", "role", role));
  const body = el("div", "content");
  box.append(body);
  renderContent(body, text);
  $("messages").append(box);
  $("messages").scrollTop = $("messages").scrollHeight;
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function status(text) { $("status").textContent = text; }

async function errorText(response) {
  try {
    const data = await response.json();
    return (data.error && data.error.message) || response.statusText;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(await errorText(response));
    const data = await response.json();
    state.model = data.data[0].id;
    $("model").textContent = state.model;
    status("");
  } catch (e) {
    $("model").textContent = "not ready";
    status(`Cannot reach the model: ${e.message}. Retrying…`);
    setTimeout(loadModel, 2000);
  }
}

// Server-sent events over fetch: "data: {json}" records separated by blank lines, ending with [DONE].
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const record = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of record.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(text) {
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.history,
    [{ role: "user", content: text }]);
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const body = addMessage("assistant", "");
  const box = body.parentElement;
  box.classList.add("streaming");
  let reply = "";
  const tokens = [];  // logprobs entries of the reply: {token, logprob, top_logprobs: [{token, logprob}]}
  state.controller = new AbortController();
  setBusy(true);
  status("generating…");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: state.controller.signal,
      body: JSON.stringify({
        model: state.model, messages, stream: true,
        temperature: parseFloat($("temperature").value),
        max_tokens: parseInt($("max-tokens").value, 10) || 256,
        stream_options: { include_usage: true },
        logprobs: true, top_logprobs: 5,  // for the "why this token" view
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    let finish = null, usage = null;
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        if (choice.logprobs && choice.logprobs.content) tokens.push(...choice.logprobs.content);
        if (choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          renderContent(body, reply);
          $("messages").scrollTop = $("messages").scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    status(usage ? `${usage.completion_tokens} tokens (${finish})` : `done (${finish})`);
  } catch (e) {
    if (e.name === "AbortError") {
      status("stopped");
    } else {
      box.classList.add("error");
      renderContent(body, reply + (reply ? "\n" : "") + `Error: ${e.message}`);
      status("error");
    }
  } finally {
    box.classList.remove("streaming");
    if (tokens.length) addWhyButton(box, body, tokens);
    box.dataset.done = "true";
    // What was received stays in the conversation, even when stopped early.
    state.history.push({ role: "assistant", content: reply });
    state.controller = null;
    setBusy(false);
  }
}

// "Why this token": the reply as its tokens; clicking one shows the alternatives the model weighed for it
// (the top_logprobs the server returned). Token texts are shown with visible spaces and newlines.
function tokenLabel(text) { return text.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥") || "∅"; }
function percent(logprob) {
  const p = Math.exp(logprob);
  return (100 * p).toFixed(p < 0.001 ? 3 : 1) + "%";
}

function closePopover() { document.querySelectorAll(".token-popover").forEach((node) => node.remove()); }

function showPopover(span, entry) {
  closePopover();
  const pop = el("div", "token-popover");
  pop.append(el("div", "chosen", `chosen: ${tokenLabel(entry.token)}  ${percent(entry.logprob)}`));
  const list = el("ol");
  for (const alt of entry.top_logprobs || []) {
    const item = el("li", alt.token === entry.token ? "picked" : null);
    item.append(el("span", "alt", tokenLabel(alt.token)), el("span", "prob", percent(alt.logprob)));
    list.append(item);
  }
  pop.append(list);
  document.body.append(pop);
  const rect = span.getBoundingClientRect();
  pop.style.left = `${Math.min(rect.left + window.scrollX, window.innerWidth - pop.offsetWidth - 8)}px`;
  pop.style.top = `${rect.bottom + window.scrollY + 4}px`;
}

function addWhyButton(box, body, tokens) {
  const view = el("div", "token-view");
  tokens.forEach((entry) => {
    const span = el("span", "token", entry.token);
    span.title = `${percent(entry.logprob)}: click for the alternatives`;
    span.addEventListener("click", (event) => { event.stopPropagation(); showPopover(span, entry); });
    view.append(span);
  });
  view.hidden = true;
  const button = el("button", "why", "why this token?");
  button.type = "button";
  button.addEventListener("click", () => {
    view.hidden = !view.hidden;
    body.hidden = !view.hidden;
    button.textContent = view.hidden ? "why this token?" : "show the text";
    closePopover();
  });
  box.append(view, button);
}

function init() {
  document.addEventListener("click", closePopover);
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") closePopover(); });
  $("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("messages").replaceChildren();
    status("");
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
