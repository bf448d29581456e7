// The chat page: talks only to this server's /v1/chat/completions, streaming (SSE over fetch).
"use strict";
const $ = (id) => document.getElementById(id);
let history = [];       // [{role, content}] — answers only; earlier reasoning is not sent back
let controller = null;  // AbortController of the request in flight
let apiKey = localStorage.getItem("nanoseek-api-key") || "";  // for servers started with --api-key

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

fetch("/v1/models", { headers: headers() }).then((r) => r.json())
  .then((j) => { $("model").textContent = j.data[0].id; }).catch(() => {});

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text || "";
  $("log").appendChild(div);
  return div;
}

function assistantBubble() {
  const div = addMessage("assistant");
  const thinking = document.createElement("details");
  thinking.className = "thinking";
  thinking.open = true;
  thinking.hidden = true;
  thinking.innerHTML = "<summary>Thinking…</summary><div class='reasoning'></div>";
  const answer = document.createElement("div");
  answer.className = "answer";
  const usage = document.createElement("div");
  usage.className = "usage";
  div.append(thinking, answer, usage);
  return { div, thinking, reasoning: thinking.querySelector(".reasoning"), answer, usage };
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  const turns = history;  // "New chat" replaces `history`; this answer belongs to the old one
  turns.push({ role: "user", content: text });
  addMessage("user", text);
  const ui = assistantBubble();
  const body = {
    messages: turns, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let thinkingDone = false, answer = "", failed = false;
  const endThinking = () => {
    if (thinkingDone || ui.thinking.hidden) return;
    thinkingDone = true;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    ui.thinking.querySelector("summary").textContent = `Thought for ${seconds} s`;
    ui.thinking.open = false;
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (resp.status === 401) {
      apiKey = window.prompt("This server needs an API key:") || "";
      localStorage.setItem("nanoseek-api-key", apiKey);
    }
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : `HTTP ${resp.status}`);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) {
          const u = chunk.usage;
          ui.usage.textContent = `${u.prompt_tokens} prompt tokens (${u.prompt_cache_hit_tokens} cache hit, ` +
            `${u.prompt_cache_miss_tokens} miss) · ${u.completion_tokens} completion tokens ` +
            `(${u.completion_tokens_details.reasoning_tokens} reasoning)`;
        }
        for (const choice of chunk.choices) {
          const d = choice.delta || {};
          if (d.reasoning_content) {
            ui.thinking.hidden = false;
            ui.reasoning.textContent += d.reasoning_content;
          }
          if (d.content) {
            endThinking();
            answer += d.content;
            ui.answer.textContent = answer;
          }
          if (choice.finish_reason) endThinking();
        }
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      failed = true;
      const p = document.createElement("div");
      p.className = "error";
      p.textContent = e.message;
      ui.div.appendChild(p);
    }
  } finally {
    endThinking();
    // a request that failed before any answer (a bad setting, a wrong key) leaves the conversation as it was
    if (failed && !answer) turns.pop();
    else turns.push({ role: "assistant", content: answer });
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("log").replaceChildren();
});
