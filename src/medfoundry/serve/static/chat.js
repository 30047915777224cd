// medfoundry chat: a page for the server's OpenAI-compatible API, with no dependencies.
//
// Asks /v1/models for the model's name, keeps the conversation in memory, and streams answers from
// /v1/chat/completions (server-sent events read from fetch's body stream). A model without a chat
// template gets plain /v1/completions of a Question/Answer transcript instead. Stop aborts the fetch;
// the server notices the closed connection and frees the request's slot. Model and server text is only
// ever inserted as text (textContent / text nodes), never parsed as HTML.
"use strict";

const KEY_STORAGE = "medfoundry-api-key"; // sessionStorage: gone when the tab closes
const NO_TEMPLATE = "no chat template"; // in the server's 400 for chat with a model that has none
const TRANSCRIPT_STOP = "\nQuestion:"; // a base model continuing the transcript would ask the next question

const state = {
  model: null, // the id /v1/models announces
  maxModelLen: null,
  apiKey: sessionStorage.getItem(KEY_STORAGE) || "",
  mode: "chat", // "completion" once the server says the model has no chat template
  history: [], // finished turns: {role, content}
  controller: null, // the AbortController of the answer being streamed
};

let els;

// ---- server-sent events

// A parser fed with decoded text in arbitrary pieces; calls onData with the data of each complete event.
// Lines may end in "\n", "\r\n" or "\r" (a "\r" ending a piece may be the first half of "\r\n", so it
// waits for the next piece); multi-line data is joined with "\n"; comments and other fields are skipped.
function createSSEParser(onData) {
  let pending = ""; // the unfinished last line
  let data = []; // the data lines of the event being read
  return function push(piece) {
    let text = pending + piece;
    let held = "";
    if (text.endsWith("\r")) {
      held = "\r";
      text = text.slice(0, -1);
    }
    const lines = text.split(/\r\n|\r|\n/);
    pending = lines.pop() + held;
    for (const line of lines) {
      if (line === "") {
        if (data.length) {
          const event = data.join("\n");
          data = [];
          onData(event);
        }
        continue;
      }
      const colon = line.indexOf(":");
      if ((colon < 0 ? line : line.slice(0, colon)) !== "data") continue;
      const value = colon < 0 ? "" : line.slice(colon + 1);
      data.push(value.startsWith(" ") ? value.slice(1) : value);
    }
  };
}

// ---- HTTP

class HTTPError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, body, signal) {
  const headers = body === undefined ? {} : { "Content-Type": "application/json" };
  if (state.apiKey) headers.Authorization = "Bearer " + state.apiKey;
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
  });
  if (!response.ok) {
    let message = response.statusText || "request failed";
    try {
      message = (await response.json()).error.message || message;
    } catch {
      // not the server's JSON error: keep the status text
    }
    throw new HTTPError(response.status, message);
  }
  return response;
}

function describe(error) {
  if (error.status === 401) return "This server needs an API key: enter it under Settings. (" + error.message + ")";
  if (error.status === 429) return "The server is busy: try again in a moment. (" + error.message + ")";
  if (error.status) return "Error " + error.status + ": " + error.message;
  return "No answer from the server: " + error.message;
}

// Streams one answer into `answer`; returns the finish reason ("stop", "length").
async function stream(path, body, deltaOf, answer, signal) {
  const response = await api(path, { ...body, stream: true }, signal);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let finish = null;
  let done = false;
  const push = createSSEParser((data) => {
    if (data === "[DONE]") {
      done = true;
      return;
    }
    const chunk = JSON.parse(data);
    if (chunk.error) throw new HTTPError(500, chunk.error.message);
    for (const choice of chunk.choices || []) {
      const delta = deltaOf(choice);
      if (delta) answer.append(delta);
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  });
  try {
    for (;;) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      push(value);
    }
  } catch (error) {
    reader.cancel().catch(() => {}); // closes the connection, so the server frees the slot
    throw error;
  }
  if (!done) throw new Error("the answer stream ended early");
  return finish;
}

function sampling() {
  const params = { max_tokens: parseInt(els.maxTokens.value, 10) || defaultMaxTokens() };
  const temperature = parseFloat(els.temperature.value);
  if (Number.isFinite(temperature)) params.temperature = temperature;
  return params;
}

function defaultMaxTokens() {
  return Math.max(1, Math.min(256, Math.floor((state.maxModelLen || 512) / 2)));
}

// The prompt for a model without a chat template: the conversation as a Question/Answer transcript.
function transcript(messages) {
  return messages.map((m) => (m.role === "user" ? "Question: " + m.content + "\n" : "Answer:" + m.content + "\n\n"))
    .join("") + "Answer:";
}

async function generate(messages, answer, signal) {
  if (state.mode === "chat") {
    try {
      return await stream("v1/chat/completions", { model: state.model, messages, ...sampling() },
        (choice) => choice.delta && choice.delta.content, answer, signal);
    } catch (error) {
      if (!(error.status === 400 && error.message.includes(NO_TEMPLATE))) throw error;
      state.mode = "completion";
      els.modeNote.textContent = "(no chat template: answers continue a Question/Answer transcript)";
      els.modeNote.hidden = false;
    }
  }
  return stream("v1/completions", { model: state.model, prompt: transcript(messages), stop: [TRANSCRIPT_STOP], ...sampling() },
    (choice) => choice.text, answer, signal);
}

// ---- page

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = "message " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : state.model || "Model";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  const status = document.createElement("span");
  status.className = "status";
  item.append(label, content, status);
  els.messages.append(item);
  scrollToEnd(true);
  return {
    item,
    text,
    append(delta) {
      const follow = nearEnd();
      this.text += delta;
      content.append(delta); // a text node
      scrollToEnd(follow);
    },
    finish(stateName, note) {
      item.dataset.state = stateName;
      status.textContent = note;
    },
  };
}

function nearEnd() {
  return window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
}

function scrollToEnd(follow) {
  if (follow) window.scrollTo(0, document.body.scrollHeight);
}

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
}

function hideError() {
  els.error.hidden = true;
  els.error.textContent = "";
}

function setBusy(busy) {
  els.send.disabled = busy || !state.model;
  els.stop.disabled = !busy;
  els.messages.setAttribute("aria-busy", String(busy)); // screen readers hear the answer once, when done
}

async function connect() {
  hideError();
  state.model = null;
  els.modelName.textContent = "connecting…";
  setBusy(false);
  try {
    const card = (await (await api("v1/models")).json()).data[0];
    state.model = card.id;
    state.maxModelLen = card.max_model_len || null;
    els.modelName.textContent = card.id;
    document.title = card.id + " · medfoundry chat";
    if (!els.maxTokens.value) els.maxTokens.value = defaultMaxTokens();
  } catch (error) {
    els.modelName.textContent = "not connected";
    showError(describe(error));
    if (error.status === 401) {
      els.settings.open = true;
      els.apiKey.focus();
    }
  }
  setBusy(false);
}

async function send(text) {
  hideError();
  const question = { role: "user", content: text };
  const history = state.history; // "New chat" replaces it, so a turn still streaming then lands in the old one
  const asked = addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.item.dataset.state = "streaming";
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  try {
    const finish = await generate([...history, question], answer, controller.signal);
    answer.finish("done", finish === "length" ? "Cut at the max-tokens limit." : "");
    history.push(question, { role: "assistant", content: answer.text });
  } catch (error) {
    const stopped = controller.signal.aborted;
    if (stopped && answer.text) {
      answer.finish("stopped", "Stopped.");
      history.push(question, { role: "assistant", content: answer.text });
    } else if (state.history === history) {
      // nothing to keep: take the turn back and give the question back for another try
      asked.item.remove();
      answer.item.remove();
      if (!els.prompt.value) els.prompt.value = text;
      if (!stopped) showError(describe(error));
      if (error.status === 401) els.settings.open = true;
    }
  } finally {
    if (state.controller === controller) state.controller = null;
    setBusy(false);
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  els.messages.replaceChildren();
  hideError();
  els.prompt.focus();
}

document.addEventListener("DOMContentLoaded", () => {
  els = {
    modelName: document.getElementById("model-name"),
    modeNote: document.getElementById("mode-note"),
    settings: document.getElementById("settings"),
    apiKey: document.getElementById("api-key"),
    temperature: document.getElementById("temperature"),
    maxTokens: document.getElementById("max-tokens"),
    messages: document.getElementById("messages"),
    error: document.getElementById("error"),
    prompt: document.getElementById("prompt"),
    send: document.getElementById("send"),
    stop: document.getElementById("stop"),
  };
  els.apiKey.value = state.apiKey;

  document.getElementById("settings-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.apiKey = els.apiKey.value.trim();
    if (state.apiKey) sessionStorage.setItem(KEY_STORAGE, state.apiKey);
    else sessionStorage.removeItem(KEY_STORAGE);
    connect();
  });
  document.getElementById("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = els.prompt.value.trim();
    if (!text || !state.model || state.controller) return;
    els.prompt.value = "";
    send(text);
  });
  els.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      event.target.form.requestSubmit();
    }
  });
  els.stop.addEventListener("click", () => state.controller && state.controller.abort());
  document.getElementById("new-chat").addEventListener("click", newChat);
  connect();
});
