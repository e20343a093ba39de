"""The report's stylesheet (inlined into the page; no external fonts or CSS)."""

CSS = """
:root { --fg: #1d1d1f; --muted: #5f6368; --line: #e3e3e3; --bg: #fafafa; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 20px 8px; }
h1 { font-size: 1.7em; margin: 0 0 12px; }
h2 { font-size: 1.25em; margin: 0 0 8px; }
header, section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 18px 20px;
                  margin-bottom: 18px; }
table { border-collapse: collapse; }
table.meta th { text-align: left; color: var(--muted); font-weight: 600; padding: 2px 16px 2px 0;
                vertical-align: top; white-space: nowrap; }
table.meta td { padding: 2px 0; }
nav { margin: 0 0 18px; font-size: 0.92em; color: var(--muted); }
nav a { color: #1a5fb4; text-decoration: none; }
nav a:hover { text-decoration: underline; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr)); gap: 14px; }
.card { border: 1px solid var(--line); border-top: 6px solid #555; border-radius: 8px; padding: 12px 14px; }
.card .claim { font-weight: 700; font-size: 1.05em; }
.card .claimtext { color: var(--muted); font-size: 0.92em; }
.card .verdict { font-size: 1.5em; font-weight: 800; text-transform: uppercase; letter-spacing: 0.03em;
                 margin: 6px 0 4px; }
.card p { margin: 0; font-size: 0.92em; }
p.explain { margin: 0 0 8px; max-width: 78em; }
p.facts { margin: 0 0 8px; color: var(--muted); font-size: 0.92em; }
p.note { margin: 0; padding: 8px 12px; background: #fff8e1; border-left: 4px solid #f0b400; }
.figure { width: 100%; }
table.gens { width: 100%; table-layout: fixed; font-size: 0.9em; }
table.gens th, table.gens td { border: 1px solid var(--line); padding: 6px 8px; vertical-align: top;
                               text-align: left; white-space: pre-wrap; overflow-wrap: anywhere; }
table.gens th { background: #f3f3f3; }
table.small td, table.small th { border-bottom: 1px solid var(--line); padding: 3px 18px 3px 0; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 700; }
details summary { cursor: pointer; color: #1a5fb4; margin-bottom: 6px; }
footer { max-width: 1180px; margin: 0 auto 24px; padding: 0 20px; color: var(--muted); font-size: 0.85em; }
"""
