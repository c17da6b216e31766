"""Sortable, searchable tables in the self-contained report page.

Why a hand-written script: the page must open offline from one file, and the table libraries of the
field (DataTables, List.js, Tabulator) would have to be vendored (tens of kB, a licence notice, a
version to keep up) for two features: click a header to sort, type to filter rows. The script below does
both in ~40 lines with no dependency. It only reads ``textContent`` and toggles ``style.display``, so
cell text (escaped by :func:`ffnkit.report.html.esc` when the page is written) is never parsed as HTML.
Jinja2 is not used for the same reason: the page is a handful of string joins with every value escaped.

Example:
    >>> "ffk-sort" in SCRIPT
    True
"""

from __future__ import annotations

__all__ = ["SCRIPT", "STYLE", "TABLE_CLASS"]

TABLE_CLASS = "ffk-sort"  # tables with this class get sorting and a search box

STYLE = """
table.ffk-sort th{cursor:pointer;user-select:none} table.ffk-sort th:after{content:' \\2195';color:#bbb}
table.ffk-sort th.asc:after{content:' \\2191';color:#333} table.ffk-sort th.desc:after{content:' \\2193';color:#333}
input.ffk-search{margin:.3em 0;padding:2px 6px;font-size:.85em;width:16em}
details.neuron{border:1px solid #ddd;border-radius:4px;margin:.4em 0;padding:.2em .6em}
details.neuron summary{cursor:pointer} .flag{font-size:.8em;padding:0 .4em;border-radius:3px}
.flag.match{background:#d8f0d8} .flag.partial{background:#fff0c0} .flag.weak{background:#f8d0d0}
.tok{font-family:monospace;background:#f4f4f4;padding:0 .2em;margin:0 .1em;white-space:pre}
"""

# Sorting: numbers compare as numbers (cells like "1.2e+03" or "42"), the rest as text; empty cells
# last. Search: a row stays visible when any of its cells contains the typed text (case-insensitive).
SCRIPT = """
(function(){
  function key(cell){
    var t=cell.textContent.trim(); var n=Number(t.replace(/,/g,''));
    return t===''?null:(isNaN(n)?t.toLowerCase():n);
  }
  function compare(a,b,asc){
    if(a===null) return b===null?0:1; if(b===null) return -1;  /* empty cells last either way */
    var c=typeof a===typeof b?(a<b?-1:(a>b?1:0)):(typeof a==='number'?-1:1);
    return asc?c:-c;
  }
  document.querySelectorAll('table.ffk-sort').forEach(function(table){
    var head=table.rows[0]; var heads=Array.prototype.slice.call(head.cells);
    heads.forEach(function(th,col){
      th.addEventListener('click',function(){
        var asc=!th.classList.contains('asc');
        heads.forEach(function(h){h.classList.remove('asc','desc');});
        th.classList.add(asc?'asc':'desc');
        var rows=Array.prototype.slice.call(table.rows,1);
        rows.sort(function(r1,r2){
          return compare(key(r1.cells[col]),key(r2.cells[col]),asc);
        });
        rows.forEach(function(r){r.parentNode.appendChild(r);});
      });
    });
    if(table.rows.length>6){
      var box=document.createElement('input');
      box.type='search'; box.className='ffk-search'; box.placeholder='search this table';
      box.addEventListener('input',function(){
        var q=box.value.toLowerCase();
        Array.prototype.slice.call(table.rows,1).forEach(function(r){
          r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';
        });
      });
      table.parentNode.insertBefore(box,table);
    }
  });
})();
"""
