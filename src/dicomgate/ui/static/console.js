// dicomgate console: live refresh of polled sections and confirmation of destructive forms.
// Everything works without it; it only adds comfort.
"use strict";

function pollSection(element) {
  const url = element.dataset.poll;
  const seconds = Number(element.dataset.interval || "5");
  const refresh = async () => {
    if (document.hidden) return;
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.ok) element.innerHTML = await response.text();
    } catch (error) {
      // The gateway may be restarting: keep the last view and try again later.
    }
  };
  window.setInterval(refresh, seconds * 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-poll]").forEach(pollSection);
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
});
