// Live states: an element with data-live="URL" is re-fetched every 2 s and its content
// replaced, until the fetched content holds an element with data-done (nothing runs any more).
// A failed fetch (network, a restarting server, a 5xx) is tried again, 2 s, 4 s, … up to 30 s
// apart, with a note on the page; only a sign-out (a redirect, 401, 403) or a gone page (404)
// stops it. The pages work without this script; it only spares the reload.
(function () {
  "use strict";
  var PERIOD = 2000, MAX_WAIT = 30000;
  function Final(message) { this.message = message; }
  function checked(response) {
    if (response.redirected || [401, 403, 404].indexOf(response.status) >= 0) {
      throw new Final("signed out or gone");
    }
    if (!response.ok) { throw new Error("HTTP " + response.status); }
    return response;
  }
  // After a failure: the note says so, and the next try waits twice as long (up to 30 s).
  function retry(element, failures, again, error) {
    if (error instanceof Final) { return; }
    var wait = Math.min(PERIOD * Math.pow(2, failures), MAX_WAIT);
    var note = stale(element);
    note.textContent = "Live updates lost (" + error.message + "); trying again in " +
      Math.round(wait / 1000) + " s.";
    setTimeout(function () { again(element, failures + 1); }, wait);
  }
  function stale(element) {
    var id = element.id + "-stale", note = document.getElementById(id);
    if (!note) {
      note = document.createElement("p");
      note.id = id;
      note.className = "stale";
      note.setAttribute("role", "status");
      element.parentNode.insertBefore(note, element);
    }
    return note;
  }
  function recovered(element) {
    var note = document.getElementById(element.id + "-stale");
    if (note) { note.remove(); }
  }
  function refresh(element, failures) {
    var url = element.getAttribute("data-live");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(checked)
      .then(function (response) { return response.text(); })
      .then(function (html) {
        recovered(element);
        var holder = document.createElement(element.tagName === "TBODY" ? "tbody" : "div");
        holder.innerHTML = html;
        element.replaceChildren.apply(element, Array.prototype.slice.call(holder.childNodes));
        if (!element.querySelector("[data-done]")) { setTimeout(function () { refresh(element, 0); }, PERIOD); }
      })
      .catch(function (error) { retry(element, failures, refresh, error); });
  }
  // A running attempt's log: an element with data-follow="URL" gets what was written after
  // its data-offset, every second, until the attempt ends.
  function follow(element, failures) {
    var url = element.getAttribute("data-follow") + "&offset=" + element.getAttribute("data-offset");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(checked)
      .then(function (response) { return response.json(); })
      .then(function (part) {
        recovered(element);
        if (String(part.offset) !== element.getAttribute("data-offset")) {
          // output cut away on the server before this page saw it: start over from what is kept
          element.textContent = "… (output not kept: a log keeps its last MiB)\n";
        }
        element.appendChild(document.createTextNode(part.text));
        element.setAttribute("data-offset", String(part.next_offset));
        if (part.running) {
          setTimeout(function () { follow(element, 0); }, 1000);
        } else {
          var note = document.querySelector("[data-follow-state]");
          if (note) { note.textContent = "ended: " + part.state; }
        }
      })
      .catch(function (error) { retry(element, failures, follow, error); });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(function (element) {
      setTimeout(function () { refresh(element, 0); }, PERIOD);
    });
    document.querySelectorAll("[data-follow]").forEach(function (element) {
      setTimeout(function () { follow(element, 0); }, 1000);
    });
  });
})();
