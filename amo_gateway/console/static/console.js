// amo-gateway console: opens amoCRM's consent window as a popup and reloads when it reports back.
(function () {
  "use strict";
  var WINDOW = "amo-consent";
  var popup = null;

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.getAttribute("target") !== WINDOW) return;
    var w = 560, h = 720;
    var left = window.screenX + Math.max((window.outerWidth - w) / 2, 0);
    popup = window.open("", WINDOW, "popup,width=" + w + ",height=" + h + ",left=" + left + ",top=" + (window.screenY + 40));
    if (!popup) {  // blocked: say so instead of opening a tab the console cannot hear from
      event.preventDefault();
      document.getElementById("popup-blocked").hidden = false;
      return;
    }
    var watch = setInterval(function () {  // closed without a word (the operator gave up): show the truth
      if (popup.closed) { clearInterval(watch); window.location.replace(window.location.pathname); }
    }, 1000);
  });

  window.addEventListener("message", function (event) {
    // Only the callback page, served from this very origin, may steer the console.
    if (event.origin !== window.location.origin || !event.data || event.data.source !== "amo-gateway") return;
    var query = event.data.ok
      ? "?notice=connected&account=" + encodeURIComponent(event.data.account || "")
      : "?during=connect&error=" + encodeURIComponent(event.data.code || "other");
    window.location.replace(window.location.pathname + query);
  });

  var refresh = document.body.getAttribute("data-refresh");
  if (refresh) {  // after an API-key exchange: amoCRM calls back within seconds, then show the new state
    setTimeout(function () { window.location.replace(window.location.pathname); }, Number(refresh) * 1000);
  }
})();
