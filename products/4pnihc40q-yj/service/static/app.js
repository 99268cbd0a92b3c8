// Static asset of product 4pnihc40q-yj, served by the API tier and cached long by the edge.
(function () {
  "use strict";
  async function loadSummary() {
    const response = await fetch("/v1/summary");
    const summary = await response.json();
    const target = document.getElementById("summary");
    if (target) {
      target.textContent = summary.items.count + " items, " + summary.job_results.count + " job results";
    }
  }
  window.addEventListener("DOMContentLoaded", loadSummary);
})();
