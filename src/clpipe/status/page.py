"""``clpipe dicom status -html FILE``: one self-contained page, viewable offline.

Everything is inline: the style, the script and the chart (SVG), and the page's
Content-Security-Policy forbids loading anything else, so it opens the same from a laptop
with no network. The table is written in the HTML (one row per session, whatever the
browser runs); the script only sorts it (a click on a column's head), filters it by state
(the counts are buttons) and by text, and keeps the view in the address's ``#`` part
(``#state=partial&sort=bytes&desc``), so a view can be shared or bookmarked.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.units import format_duration
from ..console import human_bytes
from ..sync.sessions import STATES

if TYPE_CHECKING:
    from . import Status

#: state -> colour (the terminal's, on a light page)
COLOURS = {
    "complete": "#1a7f37",
    "converted": "#0969da",
    "arriving": "#9a6700",
    "partial": "#cf222e",
    "new": "#1b7c83",
    "removed": "#8250df",
}
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
.meta{color:#59636e;margin:2px 0}.meta code{color:#1f2328}
#counts button{font:inherit;border:1px solid #d0d7de;background:#f6f8fa;border-radius:16px;padding:3px 12px;
  margin:0 6px 6px 0;cursor:pointer}
#counts button[aria-pressed=true]{background:#1f2328;color:#fff;border-color:#1f2328}
#counts b{font-weight:600}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:6px;vertical-align:middle}
#filter{font:inherit;padding:3px 8px;border:1px solid #d0d7de;border-radius:6px;width:240px;margin-bottom:8px}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #d8dee4;padding:4px 8px;text-align:left;white-space:nowrap}
th{background:#f6f8fa;cursor:pointer;user-select:none;position:sticky;top:0}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.num,th.num{text-align:right}td.path{color:#59636e;font-size:12px;white-space:normal;word-break:break-all}
tr[hidden]{display:none}
.state{font-weight:600}
#chart text{font:11px system-ui,sans-serif;fill:#59636e}
#shown{color:#59636e;margin-top:6px}
"""

SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("sessions");
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var buttons = Array.prototype.slice.call(document.querySelectorAll("#counts button"));
  var filter = document.getElementById("filter");
  var view = {state: "all", sort: "", desc: false, text: ""};

  function readHash() {
    var parts = location.hash.replace(/^#/, "").split("&");
    parts.forEach(function (part) {
      var pair = part.split("=");
      var key = decodeURIComponent(pair[0] || ""), value = decodeURIComponent(pair[1] || "");
      if (key === "state") { view.state = value || "all"; }
      if (key === "sort") { view.sort = value; }
      if (key === "desc") { view.desc = true; }
      if (key === "q") { view.text = value; }
    });
  }
  function writeHash() {
    var parts = [];
    if (view.state !== "all") { parts.push("state=" + encodeURIComponent(view.state)); }
    if (view.sort) { parts.push("sort=" + encodeURIComponent(view.sort)); }
    if (view.desc) { parts.push("desc"); }
    if (view.text) { parts.push("q=" + encodeURIComponent(view.text)); }
    var hash = parts.length ? "#" + parts.join("&") : "";
    if (history.replaceState) { history.replaceState(null, "", hash || location.pathname); }
  }
  function value(row, index, numeric) {
    var cell = row.cells[index];
    var raw = cell.getAttribute("data-v");
    if (raw === null) { raw = cell.textContent; }
    return numeric ? parseFloat(raw) || 0 : raw.toLowerCase();
  }
  function apply() {
    var index = -1, numeric = false;
    heads.forEach(function (th, i) {
      var on = th.getAttribute("data-key") === view.sort;
      if (on) { index = i; numeric = th.classList.contains("num"); }
      if (on) { th.setAttribute("aria-sort", view.desc ? "descending" : "ascending"); } else { th.removeAttribute("aria-sort"); }
    });
    var ordered = rows.slice();
    if (index >= 0) {
      ordered.sort(function (a, b) {
        var x = value(a, index, numeric), y = value(b, index, numeric);
        var c = x < y ? -1 : (x > y ? 1 : 0);
        if (c === 0) { c = rows.indexOf(a) - rows.indexOf(b); return c; }
        return view.desc ? -c : c;
      });
    }
    var text = view.text.toLowerCase(), shown = 0;
    ordered.forEach(function (row) {
      var visible = (view.state === "all" || row.getAttribute("data-state") === view.state) &&
        (!text || row.textContent.toLowerCase().indexOf(text) >= 0);
      row.hidden = !visible;
      if (visible) { shown += 1; }
      body.appendChild(row);
    });
    buttons.forEach(function (b) { b.setAttribute("aria-pressed", String(b.getAttribute("data-state") === view.state)); });
    if (filter.value !== view.text) { filter.value = view.text; }
    document.getElementById("shown").textContent = shown + " of " + rows.length + " sessions shown";
  }
  heads.forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key");
      view.desc = view.sort === key ? !view.desc : false;
      view.sort = key;
      apply(); writeHash();
    });
  });
  buttons.forEach(function (b) {
    b.addEventListener("click", function () {
      var state = b.getAttribute("data-state");
      view.state = view.state === state ? "all" : state;
      apply(); writeHash();
    });
  });
  filter.addEventListener("input", function () { view.text = filter.value; apply(); writeHash(); });
  readHash();
  apply();
  document.body.setAttribute("data-ready", "1");
})();
"""


def render(status: Status) -> str:
    """The page of ``status`` (see the module's doc)."""
    counts = status.counts
    last = status.last_sync
    last_text = (
        f"run <code>{escape(last['run_id'])}</code> at {escape(last['time'] or '')}: <b>{escape(last['exit_state'])}</b> "
        f"({last['files']:,} files, {escape(human_bytes(last['bytes']))} transferred)"
        if last
        else "no run summary in the log folder yet"
    )
    buttons = [f'<button type="button" data-state="all" aria-pressed="true">all <b>{len(status.sessions)}</b></button>']
    for state in STATES:
        buttons.append(
            f'<button type="button" data-state="{state}" aria-pressed="false" class="state-{state}">'
            f'<span class="dot" style="background:{COLOURS[state]}"></span>{state} <b>{counts[state]}</b></button>'
        )
    columns = [
        ("subject", "subject", False),
        ("session", "session", False),
        ("state", "state", False),
        ("files", "files", True),
        ("bytes", "size", True),
        ("series", "series", True),
        ("last_synced", "last synced", False),
        ("last_change", "last change", False),
        ("failures", "failures", True),
        ("path", "path", False),
    ]
    if status.refreshed:
        columns.insert(3, ("change", "on the source", False))
    head = "".join(f'<th data-key="{key}"{" class=num" if num else ""} scope="col">{escape(label)}</th>' for key, label, num in columns)
    body = "\n".join(_row(row, status.refreshed) for row in status.sessions)
    refreshed = ""
    if status.refreshed:
        changes = status.changes
        refreshed = (
            '<p class="meta">listed the source just now: '
            + ", ".join(f"{n} {what}" for what, n in changes.items())
            + " sessions (nothing was downloaded)</p>"
        )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>clpipe status: {escape(status.project)}</title>",
        f"<style>{STYLE}</style></head>",
        '<body data-ready="0">',
        f"<h1>{escape(status.project)}: DICOM sessions</h1>",
        f'<p class="meta">source <code>{escape(status.source)}</code> &middot; dropoff <code>{escape(status.dropoff)}</code></p>',
        f'<p class="meta">last sync: {last_text} &middot; states as of {escape(_short(_stamp(status)))}, '
        f"StableAfter {escape(format_duration(status.stable_after))}</p>",
        refreshed,
        '<h2>Sessions per state</h2><div id="counts">' + "".join(buttons) + "</div>",
        "<h2>Sessions</h2>",
        '<input id="filter" type="search" placeholder="filter (subject, session, path...)" aria-label="filter the sessions">',
        f'<table id="sessions"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>',
        '<p id="shown"></p>',
        "<h2>Sync history</h2>",
        chart(status.history),
        f"<script>{SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


def _stamp(status: Status) -> str:
    from ..sync.sessions import iso

    return iso(status.now) or ""


def _row(row: dict, refreshed: bool) -> str:
    state = row["state"]
    failures = row["failures"]
    cells = [
        f"<td>{escape(row['subject'])}</td>",
        f"<td>{escape(row['session'])}</td>",
        f'<td class="state" style="color:{COLOURS.get(state, "inherit")}">{escape(state)}</td>',
        f'<td class="num" data-v="{row["files"]}">{row["files"]:,}</td>',
        f'<td class="num" data-v="{row["bytes"]}">{escape(human_bytes(row["bytes"]))}</td>',
        f'<td class="num">{row["series"]}</td>',
        f"<td>{escape(_short(row['last_synced']))}</td>",
        f"<td>{escape(_short(row['last_change']))}</td>",
        f'<td class="num" data-v="{len(failures)}" title="{escape(chr(10).join(failures))}">{len(failures) or ""}</td>',
        f'<td class="path">{escape(row["path"])}</td>',
    ]
    if refreshed:
        cells.insert(3, f"<td>{escape(row.get('change') or '')}</td>")
    return f'<tr data-state="{escape(state)}">' + "".join(cells) + "</tr>"


def _short(stamp: str | None) -> str:
    return stamp[:16].replace("T", " ") if stamp else "-"


# ----------------------------------------------------------------------------- the chart

WIDTH, PANEL, GAP, LEFT, BOTTOM = 760, 80, 36, 70, 22


def chart(history: list[dict]) -> str:
    """An inline SVG of the runs (oldest left): files transferred per run above, bytes
    below; a failed run's bars red. Each bar's tooltip names its run."""
    if not history:
        return '<svg id="chart" role="img" width="360" height="24"><text x="0" y="16">no run summaries yet</text></svg>'
    n = len(history)
    height = 22 + 2 * PANEL + GAP + BOTTOM
    step = (WIDTH - LEFT - 8) / n
    bar = max(1.0, min(step * 0.8, 40))
    out = [
        f'<svg id="chart" role="img" aria-label="files and bytes transferred per sync run" xmlns="http://www.w3.org/2000/svg" '
        f'width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}">'
    ]
    panels = (("files", "files transferred per run", lambda v: f"{v:,}"), ("bytes", "bytes transferred per run", human_bytes))
    for index, (key, label, show) in enumerate(panels):
        top = 22 + index * (PANEL + GAP)
        peak = max((run[key] for run in history), default=0) or 1
        out.append(f'<text x="0" y="{top - 8}" font-weight="600">{escape(label)}</text>')
        out.append(f'<text x="{LEFT - 6}" y="{top + 12}" text-anchor="end">{escape(show(peak))}</text>')
        out.append(f'<text x="{LEFT - 6}" y="{top + PANEL}" text-anchor="end">0</text>')
        out.append(f'<line x1="{LEFT}" y1="{top + PANEL}" x2="{WIDTH - 4}" y2="{top + PANEL}" stroke="#d0d7de"/>')
        for i, run in enumerate(history):
            h = PANEL - 8 if run[key] == peak else (PANEL - 8) * run[key] / peak
            x = LEFT + i * step + (step - bar) / 2
            colour = "#cf222e" if run["exit_state"] == "failed" else ("#8c959f" if run["exit_state"] == "dry run" else "#0969da")
            tip = (
                f"run {run['run_id']} ({run['time']}): {run['exit_state']}; {run['files']:,} files, {human_bytes(run['bytes'])} transferred"
            )
            out.append(
                f'<rect class="run" x="{x:.1f}" y="{top + PANEL - h:.1f}" width="{bar:.1f}" height="{max(h, 0.5):.1f}" fill="{colour}">'
                f"<title>{escape(tip)}</title></rect>"
            )
    base = 22 + 2 * PANEL + GAP + 14
    out.append(f'<text x="{LEFT}" y="{base}">{escape(_short(history[0]["time"]))}</text>')
    if n > 1:
        out.append(f'<text x="{WIDTH - 4}" y="{base}" text-anchor="end">{escape(_short(history[-1]["time"]))}</text>')
    out.append(f'<text x="{WIDTH / 2:.0f}" y="{base}" text-anchor="middle">{n} run{"s" if n > 1 else ""}</text>')
    out.append("</svg>")
    return "".join(out)


def write(status: Status, path: Path) -> None:
    """Write the page whole (a temporary file, then a rename)."""
    from ..sync.fileio import write_whole

    text = render(status)
    write_whole(path, lambda out: out.write(text))
