// amo-gateway: the callback's page inside the consent popup tells the console (same origin only) and closes.
(function () {
  "use strict";
  var data = document.body.dataset;
  var message = { source: "amo-gateway", ok: data.outcome === "connected", account: data.account || null, code: data.code || null };
  if (window.opener && !window.opener.closed) {
    window.opener.postMessage(message, window.location.origin);
    setTimeout(function () { window.close(); }, 400);
  }
})();
