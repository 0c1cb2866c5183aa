"""The documentation tools (tools/readme.py, tools/docs.py, tools/docs_check.py), without building the site: README
links made relative to the root, nbdev directives turned into myst-nb tags, API entries for exported names only, the
pages in filename order, and the link and browser checks catching what they are for."""
import json, shutil, sys
from pathlib import Path
import pytest

root = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root/'tools'))
import readme, docs, docs_check

def test_readme_relinks_pages_and_images_but_not_urls():
    md = '[Speed](95_bench.ipynb), ![p](../images/profile.png), [arXiv](https://arxiv.org/abs/1412.6980), [up](#use-it)'
    assert readme.relink(md) == ('[Speed](nbs/95_bench.ipynb), ![p](images/profile.png), '
                                 '[arXiv](https://arxiv.org/abs/1412.6980), [up](#use-it)')

def test_readme_in_step_with_index():
    assert (root/'README.md').read_text() == readme.render()

def test_readme_under_12000_bytes():
    assert len((root/'README.md').read_bytes()) <= 12_000

def test_directives():
    assert docs.directives('#| export\n#| eval: false\nx = 1') == ({'export': '', 'eval': 'false'}, 'x = 1')
    assert docs.directives('#| default_exp core\n')[0] == {'default_exp': 'core'}
    assert docs.directives('x = 1  #| not a directive')[0] == {}

def test_public_names_only_exported_top_level():
    src = 'def f(): pass\nclass C: pass\nA, _b = 1, 2\ndef _g(): pass\nif True:\n    def h(): pass'
    assert docs.public_names(src, {'f', 'C', 'A', 'h', '_g'}) == ['f', 'C', 'A', '_g']
    assert docs.public_names('def (', {'f'}) == []

def test_process_tags_cells_and_adds_api_entries(tmp_path):
    cells = [dict(cell_type='markdown', id='a', metadata={}, source='# T'),
             dict(cell_type='code', id='b', metadata={'execution': {'x': 1.0}}, outputs=[], execution_count=None,
                  source='#| default_exp adam'),
             dict(cell_type='code', id='c', metadata={}, outputs=[], execution_count=None, source='#| hide\nimport x'),
             dict(cell_type='code', id='d', metadata={}, outputs=[], execution_count=None,
                  source='#| export\ndef Adam(): pass\ndef _private(): pass'),
             dict(cell_type='code', id='e', metadata={}, outputs=[], execution_count=None, source='#| eval: false\nslow()')]
    p = tmp_path/'01_adam.ipynb'
    p.write_text(json.dumps(dict(cells=cells, metadata={}, nbformat=4, nbformat_minor=5)))
    out = docs.process(p)['cells']
    assert [c['metadata'].get('tags') for c in out if c['cell_type'] == 'code'] == [
        ['remove-cell'], ['remove-cell'], ['remove-input'], ['skip-execution']]
    assert out[3]['source'] == 'def Adam(): pass\ndef _private(): pass'
    entry = out[4]['source']   # the public name only, as a MyST py-domain entry
    assert entry.startswith('```{py:function} Adam(') and ':module: fastopt.adam' in entry and '_private' not in str(out[5:])
    assert all('execution' not in c['metadata'] for c in out)

def test_pages_in_filename_order_index_first():
    names = [p.name for p in docs.notebooks()]
    assert names[0] == 'index.ipynb'
    assert names[1:] == sorted(p.name for p in (root/'nbs').glob('*.ipynb') if p.name != 'index.ipynb')

def site(tmp_path, body):
    (tmp_path/'a.html').write_text(f'<html><body><h1 id="top">A</h1>{body}</body></html>')
    (tmp_path/'b.html').write_text('<html><body><p id="here">B</p></body></html>')
    return tmp_path

def test_links_pass_on_a_good_site(tmp_path):
    bad, n_ext = docs_check.check_links(site(tmp_path, '<a href="b.html#here">b</a><a href="#top">t</a>'
                                             '<a href="https://arxiv.org/abs/1">x</a>'))
    assert (bad, n_ext) == ([], 1)

def test_links_catch_missing_files_and_anchors(tmp_path):
    bad, _ = docs_check.check_links(site(tmp_path, '<a href="c.html">c</a><a href="b.html#gone">g</a><img src="p.png">'))
    assert len(bad) == 3
    assert any('c.html' in b and 'no such file' in b for b in bad)
    assert any('#gone' in b or '"gone"' in b for b in bad)
    assert any('p.png' in b for b in bad)

def test_readme_links_checked(tmp_path):
    (tmp_path/'nbs').mkdir(); (tmp_path/'nbs'/'x.ipynb').write_text('{}')
    (tmp_path/'README.md').write_text('[x](nbs/x.ipynb) [y](nbs/y.ipynb) [u](https://example.org) [a](#a)')
    assert docs_check.check_readme(tmp_path/'README.md') == ['README.md: (nbs/y.ipynb) (no such file)']

@pytest.mark.skipif(docs_check.find_chromium() is None,
                    reason='chromium is not installed (`./dev docs check` installs it as root; apt-get install chromium)')
def test_browser_check_catches_console_errors_broken_images_and_raw_math(tmp_path):
    good = '<p>fine</p>'
    bad = ('<script>console.error("boom")</script><img src="missing.png">'
           '<span class="math notranslate nohighlight">\\(x^2\\)</span>')
    (tmp_path/'good.html').write_text(f'<html><head><link rel="icon" href="data:,"></head><body>{good}</body></html>')
    (tmp_path/'bad.html').write_text(f'<html><head><link rel="icon" href="data:,"></head><body>{bad}</body></html>')
    (tmp_path/'search.html').write_text('<html><head><link rel="icon" href="data:,"></head><body>'
                                        '<ul class="search"><li>Lamb</li></ul></body></html>')
    problems, lines = docs_check.check_browser(tmp_path)
    assert all(p.startswith('bad.html') for p in problems), problems
    assert any('boom' in p for p in problems)
    assert any('missing.png' in p for p in problems)
    assert any('math not typeset' in p for p in problems)

def test_api_entry_shows_docstring_and_docments_not_the_appended_copy():
    e = docs.api_entry('fastopt.rectified', 'plot_rectifier')
    assert e.startswith('```{py:function} plot_rectifier(sqr_mom=0.999, length=1000, rho_min=5.0)\n:module: fastopt.rectified')
    assert "- `sqr_mom` (default `0.999`): β2" in e
    assert 'Parameters:' not in e   # fastopt's import-time copy of the docments in __doc__ is not shown twice
    assert docs.api_entry('fastopt.registry', 'registry') is None   # data: no entry
    assert '{py:method} step(' in docs.api_entry('fastopt.core', 'Optimizer')
