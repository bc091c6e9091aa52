// aioevents panel: live figures, a self-refreshing page, select-all. No framework, no build.
"use strict";

function pollFigures(section) {
  const url = section.dataset.poll;
  const set = (id, text) => { const el = document.getElementById(id); if (el) el.textContent = text; };
  const refresh = async () => {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (!response.ok) return;
      const stats = await response.json();
      set("events-per-second", stats.events_per_second.toFixed(2));
      set("failures-per-second", stats.failures_per_second.toFixed(2));
      for (const [status, count] of Object.entries(stats.statuses)) set("status-" + status, String(count));
    } catch (error) {
      // The next poll tries again: a panel left open outlives a server restart.
    }
  };
  setInterval(refresh, 5000);
}

function selectAll(box) {
  const form = box.closest("form");
  box.addEventListener("change", () => {
    for (const item of form.querySelectorAll('input[type=checkbox][name="id"]')) item.checked = box.checked;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  for (const section of document.querySelectorAll("[data-poll]")) pollFigures(section);
  for (const box of document.querySelectorAll("#select-all")) selectAll(box);
  const live = document.body.dataset.live;
  if (live) setTimeout(() => window.location.reload(), Number(live));
});
