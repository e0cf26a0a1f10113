"""Text from outside that people will read: refuse characters that change how it is displayed.

Intent context values and approval reasons are shown to approvers (console, approvals API, webhook)
and recorded in the ledger that auditors read. A value such as ``"c-42\\u202e001-dnuf"`` *displays*
as something else than it *is* (the Trojan Source attack, CVE-2021-42574), so an approver could
approve what they did not read. :func:`unsafe_character` names the first character that must not
reach a person:

- C0 and C1 control characters and DEL (U+0000-U+001F, U+007F-U+009F);
- Unicode bidirectional formatting characters: embeddings and overrides U+202A-U+202E, isolates
  U+2066-U+2069, and the implicit marks U+200E, U+200F and U+061C (Unicode UAX #9);
- line and paragraph separators U+2028 and U+2029 (a value is one line);
- unpaired UTF-16 surrogates U+D800-U+DFFF (they cannot be encoded as UTF-8).

Callers turn a finding into their own precise protocol error.
"""

from __future__ import annotations

import re

__all__ = ["UNSAFE_TEXT_RE", "unsafe_character"]

#: The characters :func:`unsafe_character` refuses (see the module docstring).
UNSAFE_TEXT_RE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def unsafe_character(text: str) -> str | None:
    """``U+XXXX`` of the first character of ``text`` that must not be shown to people, or ``None``."""
    found = UNSAFE_TEXT_RE.search(text)
    return None if found is None else f"U+{ord(found.group()):04X}"
