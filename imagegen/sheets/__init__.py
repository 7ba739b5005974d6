"""Contact sheets: what a sheet shows (items), where it goes (layout), the JPEG pages
(drawing), the browsable index (html) and a run folder's sheets (run). No torch."""

from imagegen.sheets.drawing import write_sheets
from imagegen.sheets.html import INDEX_NAME, render_index_html, write_index_html
from imagegen.sheets.items import MISSING, SheetItem, axis_values, caption_for, list_sheets, sheet_name, varying_axes
from imagegen.sheets.run import sheet_items, write_run_sheets

__all__ = [
    "INDEX_NAME", "MISSING", "SheetItem", "axis_values", "caption_for", "list_sheets", "render_index_html",
    "sheet_items", "sheet_name", "varying_axes", "write_index_html", "write_run_sheets", "write_sheets",
]
