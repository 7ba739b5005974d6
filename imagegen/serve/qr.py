"""A QR code of a link, drawn in the terminal with block characters, for the iPad's camera.

Uses the `qrcode` package (pure Python, BSD, no dependencies; part of the `serve` extra).
Returns None when it is not installed: the link is printed anyway.
"""

from __future__ import annotations

import io


def terminal_qr(text: str) -> str | None:
    """`text` as a QR code of half-height block characters (dark on light), or None."""
    try:
        import qrcode
    except ImportError:
        return None
    code = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_M)
    code.add_data(text)
    code.make(fit=True)
    out = io.StringIO()
    code.print_ascii(out=out, invert=True)
    return out.getvalue().rstrip("\n")
