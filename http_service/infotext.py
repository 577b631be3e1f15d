"""The A1111 infotext (a PNG's `parameters` chunk) read back into fields, as /sdapi/v1/png-info answers: the prompt,
the negative prompt, and each `Key: value` of the last line, with `WxH` values split into `Key-1` and `Key-2`."""

from __future__ import annotations

import json
import re

# `Key: value` pairs; a value is a JSON-quoted string or runs to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
# A last line with fewer pairs than this is part of the prompt, not the parameters.
_MIN_PARAMS = 3


def parse_infotext(text: str) -> dict[str, str]:
    """{"Prompt": ..., "Negative prompt": ..., "Steps": "25", "Size-1": "1024", ...}; values are strings."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    if lines and len(_PARAM.findall(lines[-1])) >= _MIN_PARAMS:
        for key, value in _PARAM.findall(lines.pop()):
            value = value.strip()
            if value.startswith('"') and value.endswith('"'):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            if size := _SIZE.match(value):
                params[f"{key}-1"], params[f"{key}-2"] = size.group(1), size.group(2)
            else:
                params[key] = value
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **params}
