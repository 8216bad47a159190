"""Which HTTP parser aiohttp uses: the C one (llhttp) unless the extension is missing or
``AIOHTTP_NO_EXTENSIONS`` is set, in which case aiohttp quietly falls back to pure Python.

The fallback is slower and, more to the point, not the parser whose behaviour on hostile input
the smuggling tests pin down (``tests/e2e/test_smuggling.py``); the two disagree on details
such as ``chunked`` appearing twice or an oversized chunk size. So ``serve`` refuses to start on
it unless ``server.allow_python_parser`` says the operator chose it knowingly. Kept apart from
``proxy.connection`` so that ``proxy.settings`` can ask without importing the web stack.
"""

from __future__ import annotations

import importlib

from aiohttp import http_parser


def c_parser_in_use() -> bool:
    try:
        # importlib: the compiled module has no type stubs for a static import.
        compiled = importlib.import_module("aiohttp._http_parser")
    except ImportError:
        return False
    return bool(http_parser.HttpRequestParser is compiled.HttpRequestParser)
