// picell's one script, optional (every page works without it): copy buttons, and live status
// parts of a page ([data-live] elements) refreshed from the server every few seconds.
"use strict";
document.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  try {
    await navigator.clipboard.writeText(source.value || source.textContent);
    button.textContent = "Copied";
  } catch (err) {
    source.select();
    button.textContent = "Press Ctrl+C to copy";
  }
});

async function refreshLive() {
  const url = document.body.dataset.refresh;
  const live = document.querySelectorAll("[data-live]");
  if (!url || !live.length || document.hidden) return;
  const response = await fetch(url, { credentials: "same-origin", headers: { "X-Live": "1" } });
  if (!response.ok || response.redirected) return;
  const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
  for (const element of live) {
    const replacement = fresh.getElementById(element.id);
    if (replacement) element.replaceWith(document.importNode(replacement, true));
  }
}
setInterval(() => refreshLive().catch(() => {}), 5000);
