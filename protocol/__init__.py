"""The text protocol shared by every part of subq: prompts (``prompts``), parsers (``parse``) and
numeric answer extraction (``answers``). Pure text in, text/records out: stdlib only, no Ray, no torch."""
