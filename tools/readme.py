"""Write README.md from nbs/index.ipynb (nbdev-readme needs Quarto, which cannot be installed here).
`python tools/readme.py --check` exits 1 when README.md is out of step with the notebook."""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def render(nb_path=root/'nbs'/'index.ipynb') -> str:
    parts = []
    for cell in json.loads(nb_path.read_text())['cells']:
        src = ''.join(cell['source']).strip()
        if not src or src.startswith('#| hide'): continue
        parts.append(src if cell['cell_type'] == 'markdown' else f'```python\n{src}\n```')
    return '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    readme, txt = root/'README.md', render()
    if '--check' in sys.argv[1:]:
        if not readme.exists() or readme.read_text() != txt:
            sys.exit('README.md is out of step with nbs/index.ipynb: run python tools/readme.py')
    else: readme.write_text(txt)
