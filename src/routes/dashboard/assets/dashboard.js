// imagegate dashboard: sorts a table when its column heading is clicked (or activated with
// the keyboard). Cells carrying data-sort sort by that number, others by their text.
"use strict";

// A table whose rows are grouped (a request and its attempts, one tbody each) sorts its
// groups by their first row.
function sortTable(table, column, th) {
  if (table.tBodies.length > 1) {
    sortGroups(table, column, th);
    return;
  }
  const body = table.tBodies[0];
  const ascending = th.getAttribute("aria-sort") !== "ascending";
  for (const other of table.tHead.rows[0].cells) {
    other.removeAttribute("aria-sort");
  }
  th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  const key = (row) => {
    const cell = row.cells[column];
    const raw = cell.dataset.sort;
    return raw === undefined ? cell.textContent.trim().toLowerCase() : Number(raw);
  };
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = key(a);
    const y = key(b);
    const order = x < y ? -1 : x > y ? 1 : 0;
    return ascending ? order : -order;
  });
  for (const row of rows) {
    body.appendChild(row);
  }
}

function sortGroups(table, column, th) {
  const ascending = th.getAttribute("aria-sort") !== "ascending";
  for (const other of table.tHead.rows[0].cells) {
    other.removeAttribute("aria-sort");
  }
  th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  const key = (body) => {
    const cell = body.rows[0].cells[column];
    const raw = cell.dataset.sort;
    return raw === undefined ? cell.textContent.trim().toLowerCase() : Number(raw);
  };
  const bodies = Array.from(table.tBodies);
  bodies.sort((a, b) => {
    const x = key(a);
    const y = key(b);
    const order = x < y ? -1 : x > y ? 1 : 0;
    return ascending ? order : -order;
  });
  for (const body of bodies) {
    table.appendChild(body);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const table of document.querySelectorAll("table.sortable")) {
    Array.from(table.tHead.rows[0].cells).forEach((th, column) => {
      th.tabIndex = 0;
      th.title = "Sort by this column";
      th.addEventListener("click", () => sortTable(table, column, th));
      th.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          sortTable(table, column, th);
        }
      });
    });
  }
});
