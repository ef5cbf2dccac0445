"""Orchard inside other libraries' attention plug-in points.

* :mod:`orchard.integrations.transformers` — ``attn_implementation="orchard"`` for
  Hugging Face transformers models (importing it registers the name).

Submodules import their host library only when imported themselves.
"""
