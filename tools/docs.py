"""Build the documentation site from the notebooks (nbdev-docs needs Quarto, which cannot be installed here).

`python tools/docs.py build` turns every notebook in `nbs/`, in filename order, into a page of a Sphinx site in
`_docs/html/`: myst-nb renders the markdown (math included) and the outputs, executing each notebook at build time
(jupyter-cache keeps the outputs in `_docs/.jupyter_cache`, so a notebook runs again only when its code changed);
nothing is written back into `nbs/`. `--no-exec` shows only the outputs stored in the notebooks. `python tools/docs.py
check` checks the built site (tools/docs_check.py): README's and the site's links, and every page in headless Chromium.

The notebooks are copied into `_proc/` first, with nbdev's cell directives turned into what myst-nb understands:
`#| hide` and `#| default_exp` cells run but are not shown, `#| export` cells are not shown either (nbdev's own
choice) and are followed by the API entries of the public names they define, from their docstrings and docments;
`#| exports` cells are shown; `#| eval: false` cells are shown but not run."""
from __future__ import annotations
import ast, json, os, re, shutil, subprocess, sys, time
from pathlib import Path

root = Path(__file__).resolve().parent.parent
nbs, proc, build_dir = root/'nbs', root/'_proc', root/'_docs'
out = build_dir/'html'   # beside it: .doctrees, .jupyter_cache (the outputs) and jupyter_execute (myst-nb's)

def notebooks() -> list:
    "The notebooks in `nbs/`, in filename order, `index.ipynb` (the home page) first"
    found = sorted(p for p in nbs.glob('*.ipynb') if not p.name.startswith(('.', '_')))
    return sorted(found, key=lambda p: p.name != 'index.ipynb')

def directives(src:str) -> tuple:
    "nbdev's `#| ` directives at the top of a cell, as {name: value}, and the source without them"
    found, lines = {}, src.splitlines()
    while lines and re.match(r'\s*#\|', lines[0]):
        d = lines.pop(0).split('|', 1)[1].strip()
        k, _, v = d.partition(':') if ':' in d.split()[0] else (d.split()[0], '', ' '.join(d.split()[1:]))
        found[k.strip()] = v.strip()
    return found, '\n'.join(lines)

def public_names(src:str, exported:set) -> list:
    "The names in `exported` that the top level of `src` defines, in order"
    try: tree = ast.parse(src)
    except SyntaxError: return []
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names += [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]
    return [n for n in dict.fromkeys(names) if n in exported]

def _doc(obj) -> str:
    "`obj`'s own docstring, without the parameter list fastopt appends at import (the entry shows its docments)"
    return (obj.__doc__ or '').split('\n\nParameters:\n')[0].strip()

def _params(obj) -> str:
    "A markdown list of `obj`'s documented parameters (its docments), with their defaults, and what it returns"
    import inspect
    from fastcore.docments import docments
    try: docs = docments(obj, full=True)
    except Exception: return ''
    rows = []
    for k, d in docs.items():
        if k in ('self', 'return') or not d.get('docment'): continue
        dflt = '' if d['default'] is inspect.Parameter.empty else f" (default `{d['default']!r}`)"
        rows.append(f"- `{k}`{dflt}: {d['docment']}")
    ret = (docs.get('return') or {}).get('docment')
    if ret: rows.append(f'- returns: {ret}')
    return '\n'.join(rows)

def _signature(obj) -> str:
    "`obj`'s parameters as a Python signature that Sphinx can parse: their names and short defaults"
    import inspect
    try: sig = inspect.signature(obj)
    except (TypeError, ValueError): return '()'
    parts, star = [], False
    for p in sig.parameters.values():
        if p.name == 'self': continue
        if p.kind is p.KEYWORD_ONLY and not star: parts.append('*'); star = True
        name = {p.VAR_POSITIONAL: '*', p.VAR_KEYWORD: '**'}.get(p.kind, '') + p.name
        star |= p.kind is p.VAR_POSITIONAL
        if p.default is not p.empty:
            r = repr(p.default)
            name += '=' + (r if len(r) <= 40 and not r.startswith('<') else '...')
        parts.append(name)
    return '(' + ', '.join(parts) + ')'

def api_entry(module:str, name:str) -> str|None:
    "The API entry of `module.name`, a function or a class with its public methods, in MyST; None for data"
    # written as MyST py-domain directives, whose content is markdown (autodoc writes reStructuredText, which MyST
    # can only take in eval-rst blocks: those made a page's parse quadratic in its length, minutes per build)
    import importlib, inspect
    obj = getattr(importlib.import_module(module), name)
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return f'```{{py:function}} {name}{_signature(obj)}\n:module: {module}\n\n{_doc(obj)}\n\n{_params(obj)}\n```'
    if not inspect.isclass(obj): return None   # a dict or a list: the page's prose says what it is
    methods = [f'```{{py:method}} {k}{_signature(v)}\n\n{_doc(v)}\n\n{_params(v)}\n```'
               for k, v in vars(obj).items() if inspect.isfunction(v) and not k.startswith('_')]
    body = '\n\n'.join([_doc(obj), _params(obj), *methods])
    return f'````{{py:class}} {name}{_signature(obj)}\n:module: {module}\n\n{body}\n````'

def md_cell(src:str, id:str) -> dict: return dict(cell_type='markdown', id=id, metadata={}, source=src)

def process(nb_path:Path, toc:list|None=None) -> dict:
    "The notebook at `nb_path` as myst-nb should render it (see the module's docstring)"
    import importlib
    nb = json.loads(nb_path.read_text())
    module, exported, cells, documented = None, set(), [], set()
    for cell in nb['cells']:
        # of a cell's metadata only its tags: what other tools wrote there can fail nbformat's schema
        cell = dict(cell, metadata={k: v for k,v in cell.get('metadata', {}).items() if k == 'tags'})
        if cell['cell_type'] != 'code': cells.append(cell); continue
        d, body = directives(''.join(cell['source']))
        tags = set(cell['metadata'].get('tags', []))
        if 'default_exp' in d:
            module = f"fastopt.{d['default_exp']}"
            try: exported = set(getattr(importlib.import_module(module), '__all__', []))
            except Exception as e: sys.exit(f'docs: {nb_path.name}: cannot import {module}: {e}')
        if 'hide' in d or 'default_exp' in d or 'exporti' in d: tags.add('remove-cell')
        if 'export' in d: tags.add('remove-input')
        if d.get('eval') == 'false': tags.add('skip-execution')
        if d.get('echo') == 'false': tags.add('remove-input')
        if d.get('output') == 'false': tags.add('remove-output')
        cell['source'], cell['metadata']['tags'] = body, sorted(tags)
        cells.append(cell)
        if ('export' in d or 'exports' in d) and module:
            for n in public_names(body, exported):
                if n not in documented and (e := api_entry(module, n)): cells.append(md_cell(e, f'api-{n}'[:64]))
                documented.add(n)
    if toc is not None:
        cells.append(md_cell('```{toctree}\n:hidden:\n:maxdepth: 1\n\n' + '\n'.join(toc) + '\n```', 'docs-toctree'))
    nb['cells'] = cells
    return nb

def nav_titles(pages:list) -> dict:
    "Each page's title in the navigation: its notebook's first heading, and its module where two titles are the same"
    titles, modules = {}, {}
    for p in pages:
        nb = json.loads(p.read_text())
        heads = [l[2:].strip() for c in nb['cells'] if c['cell_type'] == 'markdown'
                 for l in ''.join(c['source']).splitlines() if l.startswith('# ')]
        titles[p.stem] = heads[0] if heads else p.stem
        exp = [directives(''.join(c['source']))[0].get('default_exp') for c in nb['cells'] if c['cell_type'] == 'code']
        modules[p.stem] = next((e for e in exp if e), None)
    seen = [t for t in titles.values()]
    return {n: (f'{t} (fastopt.{modules[n]})' if seen.count(t) > 1 and modules[n] else t) for n,t in titles.items()}

def write_if_changed(path:Path, text:str):
    "Write `text` to `path` unless it is there already (so Sphinx rebuilds only the pages that changed)"
    if not path.exists() or path.read_text() != text: path.write_text(text)

def prepare() -> list:
    "Fill `_proc/` with the processed notebooks; return the page names in order"
    proc.mkdir(exist_ok=True)
    pages = notebooks()
    names = [p.stem for p in pages]
    if names[0] != 'index': sys.exit('docs: nbs/index.ipynb (the home page) is missing')
    toc = [f'{t} <{n}>' for n,t in nav_titles(pages[1:]).items()] + ['api']
    for p in pages:
        nb = process(p, toc=toc if p.stem == 'index' else None)
        write_if_changed(proc/p.name, json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    write_if_changed(proc/'api.md', api_page())
    for old in proc.glob('*.ipynb'):
        if old.stem not in names: old.unlink()
    return names

def api_page() -> str:
    "The API reference: every module of fastopt and what it exports, each linked to its entries in the pages"
    import importlib, pkgutil, fastopt
    lines = ['# API reference', '', 'Every public name of each module, documented on the page of the notebook that '
             'defines it (its parameters from the docments of its source).', '']
    for m in sorted(pkgutil.iter_modules(fastopt.__path__), key=lambda m: m.name):
        if m.name.startswith('_'): continue
        mod = importlib.import_module(f'fastopt.{m.name}')
        names = [n for n in getattr(mod, '__all__', []) if not n.startswith('_')]
        if not names: continue
        lines += [f'## `fastopt.{m.name}`', '', (mod.__doc__ or '').strip().split('\n')[0], '',
                  ', '.join(f'{{py:obj}}`~fastopt.{m.name}.{n}`' for n in names), '']
    return '\n'.join(lines) + '\n'

def build(execute:bool=True) -> float:
    "Build the site into `_docs/`; return the seconds it took"
    start = time.time()
    prepare()
    # viewcode rewrites a module's source page only when the module changed, not when the entries linking to it did
    shutil.rmtree(out/'_modules', ignore_errors=True)
    env = dict(os.environ, FASTOPT_DOCS_EXECUTE='cache' if execute else 'off', PYTHONWARNINGS='ignore')
    env.setdefault('OMP_NUM_THREADS', '1')
    cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-c', str(root/'docs'), '-d', str(build_dir/'.doctrees'), '-q',
           '--fail-on-warning', '--keep-going', str(proc), str(out)]
    rc = subprocess.call(cmd, env=env, cwd=root)
    if rc: sys.exit(f'docs: sphinx-build failed (exit {rc}); the messages above name the page and the problem')
    took = time.time() - start
    print(f'docs: {len(list(out.glob("*.html")))} HTML files in {out.relative_to(root)}/ ({took:.0f} s); '
          f'open {out.relative_to(root)}/index.html')
    return took

if __name__ == '__main__':
    args = sys.argv[1:] or ['build']
    if args[0] == 'build': build(execute='--no-exec' not in args)
    elif args[0] == 'check':
        sys.path.insert(0, str(root/'tools'))
        from docs_check import main as check
        sys.exit(check(out, args[1:]))
    else: sys.exit('usage: python tools/docs.py build [--no-exec] | check [links] [browser]')
