"""Sphinx settings for fastopt's documentation site; `./dev docs` (tools/docs.py) builds it from `_proc/`, the
processed copies of the notebooks, into `_docs/html/`."""
import os, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root))

import fastopt

project = 'fastopt'
author = 'fastopt developers'
release = version = fastopt.__version__
copyright = 'fastopt developers, Apache-2.0'

# MathJax is served from the site itself (sphinx-mathjax-offline ships it), not from a CDN: the site works offline,
# and so does the browser check, which has no network
extensions = ['myst_nb', 'sphinx.ext.viewcode', 'sphinx.ext.mathjax',
              'sphinx-mathjax-offline']
root_doc = 'index'
exclude_patterns = ['.jupyter_cache', 'jupyter_execute', '**.ipynb_checkpoints']
suppress_warnings = ['mystnb.unknown_mime_type']

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

html_theme = 'furo'
html_title = 'fastopt'
html_favicon = 'favicon.svg'   # a page without one makes the browser ask for /favicon.ico, a 404 in the console
html_static_path = []
html_copy_source = False
html_show_sourcelink = False
