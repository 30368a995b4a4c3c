// Live states: an element with data-live="URL" is re-fetched every 2 s and its content
// replaced, until the fetched content holds an element with data-done (nothing runs any more).
// The pages work without this script; it only spares the reload.
(function () {
  "use strict";
  function refresh(element) {
    var url = element.getAttribute("data-live");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.redirected || !response.ok) { throw new Error("stopped"); }
        return response.text();
      })
      .then(function (html) {
        var holder = document.createElement(element.tagName === "TBODY" ? "tbody" : "div");
        holder.innerHTML = html;
        element.replaceChildren.apply(element, Array.prototype.slice.call(holder.childNodes));
        if (!element.querySelector("[data-done]")) { setTimeout(function () { refresh(element); }, 2000); }
      })
      .catch(function () { /* signed out or server away: the page stays as it is */ });
  }
  // A running attempt's log: an element with data-follow="URL" gets what was written after
  // its data-offset, every second, until the attempt ends.
  function follow(element) {
    var url = element.getAttribute("data-follow") + "&offset=" + element.getAttribute("data-offset");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) {
        if (response.redirected || !response.ok) { throw new Error("stopped"); }
        return response.json();
      })
      .then(function (part) {
        if (part.offset === 0 && element.getAttribute("data-offset") !== "0") {
          element.textContent = "";  // cut to its last part on the server: start over
        }
        element.appendChild(document.createTextNode(part.text));
        element.setAttribute("data-offset", String(part.next_offset));
        if (part.running) {
          setTimeout(function () { follow(element); }, 1000);
        } else {
          var note = document.querySelector("[data-follow-state]");
          if (note) { note.textContent = "ended: " + part.state; }
        }
      })
      .catch(function () { /* signed out or server away: the page stays as it is */ });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(function (element) {
      setTimeout(function () { refresh(element); }, 2000);
    });
    document.querySelectorAll("[data-follow]").forEach(function (element) {
      setTimeout(function () { follow(element); }, 1000);
    });
  });
})();
