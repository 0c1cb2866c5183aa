"""Sphinx settings for fastopt's documentation site; `./dev docs` (tools/docs.py) builds it from `_proc/`, the
processed copies of the notebooks, into `_docs/html/`."""
import os, re, sys, importlib, pkgutil
from pathlib import Path

root = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root))

import fastopt
# fastopt appends each function's docments to its __doc__ when it is imported (`_document_all`), but only for the
# modules imported by then: import every module first, then document them all
for m in pkgutil.iter_modules(fastopt.__path__):
    if not m.name.startswith('_'): importlib.import_module(f'fastopt.{m.name}')
fastopt._document_all()

project = 'fastopt'
author = 'fastopt developers'
release = version = fastopt.__version__
copyright = 'fastopt developers, Apache-2.0'

# MathJax is served from the site itself (sphinx-mathjax-offline ships it), not from a CDN: the site works offline,
# and so does the browser check, which has no network
extensions = ['myst_nb', 'sphinx.ext.autodoc', 'sphinx.ext.napoleon', 'sphinx.ext.viewcode', 'sphinx.ext.mathjax',
              'sphinx-mathjax-offline']
root_doc = 'index'
exclude_patterns = ['.jupyter_cache', 'jupyter_execute', '**.ipynb_checkpoints']
suppress_warnings = ['mystnb.unknown_mime_type']
# `x` in a docstring is code, as in the notebooks' markdown
default_role = 'literal'

# notebooks: executed at build time, their outputs cached by jupyter-cache in _docs/.jupyter_cache (keyed on the code, so an
# unchanged notebook is not run again); FASTOPT_DOCS_EXECUTE=off renders without running anything
nb_execution_mode = os.environ.get('FASTOPT_DOCS_EXECUTE', 'cache')
nb_execution_cache_path = str(root/'_docs'/'.jupyter_cache')
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_output_stderr = 'remove'
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'html_image']
myst_heading_anchors = 3

# the API entries: docstring, then the docments under "Parameters:" (napoleon reads them as Google style)
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
napoleon_google_docstring, napoleon_numpy_docstring = True, False

def _rst_safe(app, what, name, obj, options, lines):
    """fastopt's docstrings are markdown-flavoured plain text (`code`, |x| for a norm, a*b), not reStructuredText: after
    napoleon has made its field list, write `code` as an inline literal and escape what reST would read as markup"""
    def text(t):
        t = re.sub(r'([|*_\\])', r'\\\1', t)
        return re.sub(r'`([^`]+)`(?=(\w)?)', lambda m: f"``{m.group(1).replace(chr(92), '')}``" + ('\\ ' if m.group(2) else ''), t)
    for i, l in enumerate(lines):
        m = re.match(r'(\s*:[^:]+:)(.*)$', l)
        lines[i] = m.group(1) + text(m.group(2)) if m else text(l)

def _defaults_last(app, what, name, obj, options, lines):
    "`add_param_docs` writes `k (default: v): doc`, which napoleon would read as a type; make it `k: doc (default: v)`"
    for i, l in enumerate(lines):
        lines[i] = re.sub(r'^(\s+\**\w+) \(default: (.*?)\): (.*)$', r'\1: \3 (default: `\2`)', l)

def setup(app):
    app.connect('autodoc-process-docstring', _defaults_last, priority=100)   # before napoleon (500)
    app.connect('autodoc-process-docstring', _rst_safe, priority=900)        # after it

html_theme = 'furo'
html_title = 'fastopt'
html_favicon = 'favicon.svg'   # a page without one makes the browser ask for /favicon.ico, a 404 in the console
html_static_path = []
html_copy_source = False
html_show_sourcelink = False
