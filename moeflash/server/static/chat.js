// moeflash's chat page: plain JavaScript, no build step, no CDN. It talks to the server's own
// OpenAI-compatible API (/v1/models, streamed /v1/chat/completions) like any other client.
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];  // the conversation sent with every request
let model = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "assistant") {
    div.innerHTML = '<div class="reasoning"></div><div class="content"></div><div class="meta"></div>';
    div.querySelector(".content").textContent = text || "";
  } else {
    div.textContent = text;
  }
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    model = body.data[0].id;
    $("model").textContent = model;
  } catch (e) {
    $("model").textContent = "not connected: " + e.message;
  }
}

async function send(text) {
  if (!model) await loadModel();
  history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  out.classList.add("streaming");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  if ($("thinking").checked) body.thinking = { type: "enabled" };
  const counts = [];  // [layer][expert] uses by this reply's tokens (return_experts)
  if ($("experts").checked) body.return_experts = true;
  let content = "", reasoning = "", tokens = 0, first = null, usage = null, finish = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : r.status + " " + r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices || []) {
          const d = c.delta || {};
          if (d.content || d.reasoning_content) {
            tokens += 1;  // one step's token per chunk
            if (first === null) first = performance.now();
          }
          if (d.reasoning_content) reasoning += d.reasoning_content;
          if (d.content) content += d.content;
          if (c.finish_reason) finish = c.finish_reason;
          for (const token of c.experts || []) {
            token.forEach((ids, layer) => {
              counts[layer] = counts[layer] || [];
              for (const e of ids) counts[layer][e] = (counts[layer][e] || 0) + 1;
            });
          }
          if (c.experts) drawExperts(counts);
        }
        out.querySelector(".reasoning").textContent = reasoning;
        out.querySelector(".content").textContent = content;
        if (first !== null && tokens > 1) {
          $("speed").textContent = ((tokens - 1) / ((performance.now() - first) / 1000)).toFixed(1) + " tok/s";
        }
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
    history.push({ role: "assistant", content });
    const meta = [finish ? "finish: " + finish : ""];
    if (usage) {
      const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
      $("cache").textContent = "cache " + cached + "/" + usage.prompt_tokens;
      meta.push(usage.prompt_tokens + " prompt tokens (" + cached + " cached), " + usage.completion_tokens + " generated");
    }
    out.querySelector(".meta").textContent = meta.filter(Boolean).join(" · ");
    out.dataset.done = "1";
  } catch (e) {
    history.pop();
    out.classList.add("error");
    out.querySelector(".content").textContent = "Error: " + e.message;
    out.dataset.done = "1";
  } finally {
    out.classList.remove("streaming");
  }
}

// The experts the reply's tokens used: one row per MoE layer, one cell per expert, darker = more used.
function drawExperts(counts) {
  const canvas = $("expert_map");
  canvas.hidden = false;
  const layers = counts.length;
  const experts = Math.max(1, ...counts.map((row) => (row ? row.length : 0)));
  canvas.width = experts;
  canvas.height = layers;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, experts, layers);
  counts.forEach((row, layer) => {
    const max = Math.max(1, ...(row || []).map((v) => v || 0));
    (row || []).forEach((v, e) => {
      if (!v) return;
      ctx.fillStyle = `rgba(37, 99, 235, ${0.15 + 0.85 * v / max})`;
      ctx.fillRect(e, layer, 1, 1);
    });
  });
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("clear").addEventListener("click", () => { history.length = 0; $("log").innerHTML = ""; });
$("api_key").value = localStorage.getItem("moeflash_api_key") || "";
$("api_key").addEventListener("change", () => { localStorage.setItem("moeflash_api_key", $("api_key").value); loadModel(); });
loadModel();
