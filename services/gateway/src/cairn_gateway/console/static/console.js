// The console's only script beside htmx: keeps the API key in the browser and sends it as the
// Authorization header of every htmx request (same origin only: htmx's selfRequestsOnly).
// The key never goes into a URL, a form field sent to the server, or the page.
(function () {
  "use strict";
  var KEY = "cairn.apiKey";

  function storedKey() {
    return sessionStorage.getItem(KEY) || localStorage.getItem(KEY);
  }

  function showState() {
    var state = document.getElementById("key-state");
    if (state) {
      var key = storedKey();
      // Only the key's id part (cairn_<id>_<secret>) is shown, never the secret.
      state.textContent = key ? "key " + key.split("_").slice(0, 2).join("_") : "no key";
      state.className = "key-state " + (key ? "set" : "unset");
    }
  }

  // 4xx/5xx fragments are swapped too: they say what the API answered (no key, scope, ...).
  htmx.config.responseHandling = [
    { code: "204", swap: false },
    { code: "[23]..", swap: true },
    { code: "[45]..", swap: true, error: false },
    { code: "...", swap: false },
  ];
  htmx.config.selfRequestsOnly = true;
  htmx.config.historyCacheSize = 0; // pages are not kept in localStorage
  htmx.config.allowEval = false; // no hx-on / js: expressions: the page runs this file and htmx only

  document.addEventListener("htmx:configRequest", function (event) {
    var key = storedKey();
    if (key) {
      event.detail.headers["Authorization"] = "Bearer " + key;
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    showState();
    // Filter forms only feed hx-include: Enter must not submit them as a page load.
    document.querySelectorAll("form.filters").forEach(function (filters) {
      filters.addEventListener("submit", function (event) {
        event.preventDefault();
      });
    });
    var form = document.getElementById("key-form");
    var input = document.getElementById("key-input");
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var key = input.value.trim();
      input.value = "";
      if (!key) {
        return;
      }
      sessionStorage.removeItem(KEY);
      localStorage.removeItem(KEY);
      (document.getElementById("key-remember").checked ? localStorage : sessionStorage).setItem(KEY, key);
      showState();
      htmx.trigger(document.body, "cairn:key");
    });
    document.getElementById("key-forget").addEventListener("click", function () {
      sessionStorage.removeItem(KEY);
      localStorage.removeItem(KEY);
      showState();
      htmx.trigger(document.body, "cairn:key");
    });
  });
})();
