"""Readable labels for tokens: byte-level BPE tokens are bytes, often a leading space, sometimes part of a
UTF-8 character, so their text alone hides what they hold.

    " the"   -> "␣the"        a space is shown as ␣ (U+2423), a newline as ↵, a tab as ⇥
    b"\\xe2"  -> "<E2>"        a byte that is not a whole character: its hex value in angle brackets
    <|im_end|>                 special tokens as their own names
"""

from __future__ import annotations

VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def token_label(tokenizer, token_id: int) -> str:
    """How to show token ``token_id`` in a table, a heat map or a page: never empty, never invisible."""
    data = tokenizer.bytes_of(token_id)
    if data and not tokenizer.bytes_of(token_id, skip_special=True):
        return tokenizer.id_to_token(token_id) or f"<special {token_id}>"
    if not data:
        return f"<id {token_id}>"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return _bytes_label(data)
    return "".join(VISIBLE.get(ch, f"<{ord(ch):02X}>" if not ch.isprintable() else ch) for ch in text)


def _bytes_label(data: bytes) -> str:
    """Decode what is valid UTF-8 and show the rest byte by byte: b" \\xe2\\x80" -> "␣<E2><80>"."""
    out, i = [], 0
    while i < len(data):
        for size in (4, 3, 2, 1):  # the longest whole character starting here
            try:
                ch = data[i:i + size].decode("utf-8")
            except UnicodeDecodeError:
                continue
            out.append(VISIBLE.get(ch, ch if ch.isprintable() else f"<{ord(ch):02X}>"))
            i += size
            break
        else:
            out.append(f"<{data[i]:02X}>")
            i += 1
    return "".join(out)
