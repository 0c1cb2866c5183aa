"""Write README.md from nbs/index.ipynb (nbdev-readme needs Quarto, which cannot be installed here).
`python tools/readme.py --check` exits 1 when README.md is out of step with the notebook.

nbs/index.ipynb is also the documentation site's home page (tools/docs.py), so its links are relative to `nbs/`
(`[Speed](95_bench.ipynb)`); in README.md, at the repository's root, they point into `nbs/` instead."""
import json, os, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def relink(md:str) -> str:
    "Markdown links and images relative to nbs/, made relative to the repository's root"
    def fix(m):
        target = m.group(2)
        if re.match(r'[a-z][a-z0-9+.-]*:|#|/', target): return m.group(0)   # a URL, an anchor or an absolute path
        return f'{m.group(1)}({os.path.normpath("nbs/" + target)})'
    return re.sub(r'(!?\[[^\]]*\])\(([^)\s]+)\)', fix, md)

def render(nb_path=root/'nbs'/'index.ipynb') -> str:
    parts = []
    for cell in json.loads(nb_path.read_text())['cells']:
        src = ''.join(cell['source']).strip()
        if not src or src.startswith('#| hide'): continue
        parts.append(relink(src) if cell['cell_type'] == 'markdown' else f'```python\n{src}\n```')
    return '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    readme, txt = root/'README.md', render()
    if '--check' in sys.argv[1:]:
        if not readme.exists() or readme.read_text() != txt:
            sys.exit('README.md is out of step with nbs/index.ipynb: run python tools/readme.py')
    else: readme.write_text(txt)
