// Auto-refresh: the runs table is rebuilt from /api/runs (same filters as the page); other
// pages that ask for it (data-refresh-s on <body>) reload. No framework, no CDN.
"use strict";

function fmtDuration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}h ${pad(m)}m` : m ? `${m}m ${pad(sec)}s` : `${sec}s`;
}

function fmtTime(ts) {
  // As the server renders it (local time), so a refresh does not change how times look.
  if (!ts) return "–";
  const d = new Date(ts * 1000), pad = (n) => String(n).padStart(2, "0");
  const zone = new Intl.DateTimeFormat([], {timeZoneName: "short"}).formatToParts(d)
    .find((p) => p.type === "timeZoneName");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}` + (zone ? ` ${zone.value}` : "");
}

function cell(tr, content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.appendChild(content); else td.textContent = content;
  tr.appendChild(td);
  return td;
}

function runRow(r) {
  const tr = document.createElement("tr");
  tr.dataset.runId = r.id;
  const a = document.createElement("a");
  a.href = `/runs/${r.id}`;
  a.textContent = r.id;
  cell(tr, a);
  cell(tr, r.name ? `${r.kind} ${r.name}` : r.kind);
  const badge = document.createElement("span");
  badge.className = `badge st-${r.state}`;
  badge.textContent = r.state;
  cell(tr, badge);
  const prog = cell(tr, "–");
  if (r.progress_fraction !== null) {
    prog.textContent = "";
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = r.progress_fraction;
    prog.appendChild(bar);
    prog.appendChild(document.createTextNode(
      ` ${r.progress.done}/${r.progress.total} ${r.progress.unit || ""}`));
  }
  cell(tr, fmtDuration(r.duration_s));
  cell(tr, r.tokens_per_s === null ? "–" : r.tokens_per_s.toFixed(1));
  cell(tr, fmtTime(r.submitted_at));
  cell(tr, r.schedule_id || "");
  cell(tr, r.reason).className = "reason";
  return tr;
}

async function refreshRuns(tbody) {
  try {
    const resp = await fetch("/api/runs" + window.location.search, {cache: "no-store"});
    if (!resp.ok) return;
    const runs = await resp.json();
    const rows = runs.map(runRow);
    if (!rows.length) {
      const tr = document.createElement("tr");
      cell(tr, "no runs match").colSpan = 9;
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
    document.body.dataset.refreshedAt = String(Date.now());
  } catch (err) {
    // The dashboard or the network went away: keep the last table, try again next time.
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const every = Number(document.body.dataset.refreshS || 0) * 1000;
  if (!every) return;
  const tbody = document.querySelector("table#runs tbody");
  if (tbody) {
    setInterval(() => refreshRuns(tbody), every);
  } else {
    setTimeout(() => window.location.reload(), every);
  }
});
