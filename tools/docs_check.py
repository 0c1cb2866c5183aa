"""Checks of the built documentation site (`python tools/docs.py check [links] [browser] [readme]`; all by default).

- `readme`: every relative link and image in README.md names a file of the repository.
- `links`: every link, image, script and stylesheet of every built page that stays inside the site names a file the
  build wrote, and every `#anchor` in it an element of that page. Links that leave the site (arXiv, GitHub) are
  counted, not fetched: this machine and CI reach only package registries. `--external` runs Sphinx's linkcheck
  builder for them where there is a network.
- `browser`: headless Chromium (Debian's `chromium`) loads every page from a local HTTP server and fails a page with a
  console error, an uncaught exception or a failed request, math that MathJax did not typeset (or typeset as an
  error), or an image that did not decode; it also searches the site and expects results. It drives Chromium over the
  DevTools protocol on a pipe (`--remote-debugging-pipe`), so it needs nothing but Python. Without Chromium it installs
  it with apt-get where it can (as root), and otherwise fails, saying so; FASTOPT_DOCS_NO_BROWSER=1 skips it, saying so.
  `--screenshot=PAGE[#ID]=FILE.png` (repeatable) saves a 1280×2000 screenshot of a page, scrolled to an element."""
from __future__ import annotations
import functools, http.server, json, os, re, shutil, subprocess, sys, threading, time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

root = Path(__file__).resolve().parent.parent

class _Refs(HTMLParser):
    "The ids and the outgoing references (tag, attribute, value) of one HTML page"
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids, self.refs = set(), []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ('id', 'name'):
            if a.get(k): self.ids.add(a[k])
        for k in ('href', 'src'):
            if a.get(k) is not None and not (tag == 'link' and a.get('rel') in ('preconnect', 'dns-prefetch')):
                self.refs.append((tag, k, a[k]))

def _parse(path:Path) -> _Refs:
    p = _Refs(); p.feed(path.read_text(errors='replace')); return p

def _external(url:str) -> bool: return bool(re.match(r'[a-zA-Z][a-zA-Z0-9+.-]*:', url))

def check_links(site:Path) -> tuple:
    "Broken references inside the built site, as 'page: reference (why)' lines, and the number of external links"
    pages = sorted(site.rglob('*.html'))
    if not pages: return [f'{site}: no HTML pages: build the site first (./dev docs)'], 0
    parsed = {p: _parse(p) for p in pages}
    bad, external = [], set()
    for page, refs in parsed.items():
        for tag, attr, url in refs.refs:
            if url.startswith(('mailto:', 'javascript:', 'data:')) or url == '': continue
            if _external(url): external.add(url); continue
            path, frag = urldefrag(url)
            path = unquote(urlsplit(path).path)
            target = page if not path else (page.parent/path).resolve()
            if target.is_dir(): target = target/'index.html'
            where = f'{page.relative_to(site)}: <{tag} {attr}="{url}">'
            if not target.exists(): bad.append(f'{where} (no such file)'); continue
            if frag and target.suffix == '.html':
                ids = parsed[target].ids if target in parsed else _parse(target).ids
                if unquote(frag) not in ids: bad.append(f'{where} (no element with id "{frag}")')
    return bad, len(external)

def check_readme(readme:Path=root/'README.md') -> list:
    "Relative links and images of README.md that name no file of the repository"
    bad = []
    for m in re.finditer(r'!?\[[^\]]*\]\(([^)\s]+)\)', readme.read_text()):
        url = m.group(1)
        if _external(url) or url.startswith('#'): continue
        if not (readme.parent/unquote(urldefrag(url)[0])).exists(): bad.append(f'README.md: ({url}) (no such file)')
    return bad

# ---- the browser ----

def find_chromium() -> str|None:
    for name in ('chromium', 'chromium-browser', 'google-chrome', 'chrome'):
        if shutil.which(name): return shutil.which(name)
    return None

def ensure_chromium() -> str|None:
    "Chromium's path; installs Debian's `chromium` with apt-get when it is missing and this runs as root"
    found = find_chromium()
    if found or not (shutil.which('apt-get') and os.geteuid() == 0): return found
    print('docs check: chromium is not installed; installing Debian\'s chromium with apt-get', flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    for cmd in (['apt-get', 'update', '-qq'], ['apt-get', 'install', '-y', '-qq', '--no-install-recommends', 'chromium']):
        if subprocess.call(cmd, env=env, stdout=subprocess.DEVNULL) != 0: return None
    return find_chromium()

class Chromium:
    "Headless Chromium driven over the DevTools protocol on a pipe: messages are JSON, each ended by a NUL byte"
    def __init__(self, exe:str):
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()
        def fds():   # the child reads commands on fd 3 and writes answers and events on fd 4
            a, b = os.dup(to_child), os.dup(from_child)
            os.dup2(a, 3); os.dup2(b, 4)
        args = [exe, '--headless', '--remote-debugging-pipe', '--no-sandbox', '--disable-gpu', '--no-first-run',
                '--disable-dev-shm-usage', '--disable-extensions', '--hide-scrollbars', '--mute-audio',
                f'--user-data-dir={root/"_docs"/".chromium"}', 'about:blank']
        # close_fds=False keeps the inheritable fds 3 and 4 made in `fds`; every other fd of this process is
        # non-inheritable (PEP 446) and closes at exec
        self.proc = subprocess.Popen(args, preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_child); os.close(from_child)
        self._buf, self._id, self.events = b'', 0, []
        target = self.send('Target.createTarget', url='about:blank')['targetId']
        self.session = self.send('Target.attachToTarget', targetId=target, flatten=True)['sessionId']
        for domain in ('Page', 'Runtime', 'Log', 'Network'): self.send(f'{domain}.enable', session=True)

    def _read(self, timeout:float) -> dict:
        import select
        while b'\0' not in self._buf:
            ready, _, _ = select.select([self._r], [], [], timeout)
            if not ready: raise TimeoutError('chromium did not answer')
            chunk = os.read(self._r, 1 << 20)
            if not chunk: raise RuntimeError('chromium closed the pipe')
            self._buf += chunk
        msg, self._buf = self._buf.split(b'\0', 1)
        return json.loads(msg)

    def send(self, method:str, session:bool=False, timeout:float=60, **params) -> dict:
        self._id += 1
        msg = dict(id=self._id, method=method, params=params)
        if session: msg['sessionId'] = self.session
        os.write(self._w, json.dumps(msg).encode() + b'\0')
        while True:
            m = self._read(timeout)
            if m.get('id') == self._id:
                if 'error' in m: raise RuntimeError(f'{method}: {m["error"]}')
                return m.get('result', {})
            self.events.append(m)

    def wait_for(self, method:str, timeout:float=60) -> dict:
        "The first event named `method` received from now on (earlier ones are kept in `events`)"
        end = time.time() + timeout
        seen = len(self.events)
        while True:
            for m in self.events[seen:]:
                if m.get('method') == method: return m
            seen = len(self.events)
            left = end - time.time()
            if left <= 0: raise TimeoutError(f'no {method} within {timeout} s')
            self.events.append(self._read(left))

    def js(self, expr:str, timeout:float=60):
        r = self.send('Runtime.evaluate', session=True, timeout=timeout, expression=expr, awaitPromise=True,
                      returnByValue=True)
        if 'exceptionDetails' in r: raise RuntimeError(f'{expr[:60]}...: {r["exceptionDetails"]}')
        return r['result'].get('value')

    def close(self):
        try: self.send('Browser.close', timeout=10)
        except Exception: pass
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill()
        os.close(self._w); os.close(self._r)

_page_state = '''(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  await Promise.all([...document.images].map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })));
  const math = [...document.querySelectorAll('.math')];
  return {
    math: math.length,
    untypeset: math.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 60)),
    math_errors: [...document.querySelectorAll('mjx-merror')].map(m => m.getAttribute('data-mjx-error') || m.textContent),
    images: document.images.length,
    broken_images: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    title: document.title,
  };
})()'''

def _problems(events:list) -> list:
    "Console errors, uncaught exceptions and failed requests among DevTools events"
    out = []
    for e in events:
        m, p = e.get('method'), e.get('params', {})
        if m == 'Runtime.consoleAPICalled' and p.get('type') in ('error', 'assert'):
            out.append('console.error: ' + ' '.join(str(a.get('value', a.get('description', ''))) for a in p.get('args', [])))
        elif m == 'Runtime.exceptionThrown':
            d = p.get('exceptionDetails', {})
            out.append('uncaught: ' + str(d.get('exception', {}).get('description', d.get('text'))))
        elif m == 'Log.entryAdded' and p.get('entry', {}).get('level') == 'error':
            out.append(f"console: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif m == 'Network.loadingFailed' and not p.get('canceled'):
            out.append(f"request failed: {p.get('errorText')}")
        elif m == 'Network.responseReceived' and p.get('response', {}).get('status', 200) >= 400:
            out.append(f"HTTP {p['response']['status']}: {p['response'].get('url')}")
    return out

def _serve(site:Path):
    "A local HTTP server of `site` on a free loopback port, in a thread: (server, base URL)"
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f'http://127.0.0.1:{srv.server_address[1]}/'

def check_browser(site:Path, screenshots:dict|None=None) -> tuple:
    "Problems found loading every page of `site` in headless Chromium, and a one-line summary per page"
    exe = ensure_chromium()
    if exe is None:
        return ['chromium is not installed and could not be installed here (apt-get needs root): install Debian\'s '
                '`chromium` package, or set FASTOPT_DOCS_NO_BROWSER=1 to skip this check knowingly'], []
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob('*.html') if '_modules' not in p.parts)
    srv, base = _serve(site)
    bad, lines = [], []
    br = Chromium(exe)
    try:
        br.send('Emulation.setDeviceMetricsOverride', session=True, width=1280, height=2000, deviceScaleFactor=1, mobile=False)
        for page in pages:
            br.events.clear()
            br.send('Page.navigate', session=True, url=base + page)
            br.wait_for('Page.loadEventFired')
            st = br.js(_page_state)
            found = _problems(br.events)
            found += [f'math not typeset: {t!r}' for t in st['untypeset']]
            found += [f'math error: {t!r}' for t in st['math_errors']]
            found += [f'image did not load: {s}' for s in st['broken_images']]
            bad += [f'{page}: {f}' for f in found]
            lines.append(f"{page}: {st['math']} math, {st['images']} images{'' if not found else f', {len(found)} problems'}")
            for key, f in (screenshots or {}).items():
                if key.split('#')[0] != page: continue
                import base64
                frag = key.partition('#')[2]   # PAGE#id: scrolled to that element first
                br.js(f"window.scrollTo({{top: 0, behavior: 'instant'}}); {json.dumps(frag)} && "   # instant: the theme scrolls smoothly
                      f"document.getElementById({json.dumps(frag)}).scrollIntoView({{behavior: 'instant'}})")
                time.sleep(0.3)
                Path(f).write_bytes(base64.b64decode(br.send('Page.captureScreenshot', session=True, format='png')['data']))
                lines.append(f'  screenshot of {key}: {f}')
        # search: the index loads and finds a word every optimizer page has
        br.events.clear()
        br.send('Page.navigate', session=True, url=base + 'search.html?q=Lamb')
        br.wait_for('Page.loadEventFired')
        hits = br.js('''new Promise(r => { const t0 = Date.now(); let last = -1, since = Date.now(); (function poll() {
            const n = document.querySelectorAll('#search-results li, ul.search li').length;
            if (n !== last) { last = n; since = Date.now(); }
            if ((n && Date.now() - since > 1500) || Date.now() - t0 > 20000) r(n); else setTimeout(poll, 200); })(); })''')
        bad += [f'search.html: {f}' for f in _problems(br.events)]
        if not hits: bad.append('search.html?q=Lamb: no results')
        lines.append(f'search for "Lamb": {hits} results')
    finally:
        br.close(); srv.shutdown()
    return bad, lines

def main(site:Path, args:list) -> int:
    flags = {a for a in args if not a.startswith('--')}
    what = flags & {'links', 'browser', 'readme'} or {'links', 'browser', 'readme'}
    shots = {}
    for a in args:
        if a.startswith('--screenshot='):
            page, _, f = a.split('=', 1)[1].partition('=')
            shots[page] = f
    failed = False
    if 'readme' in what:
        bad = check_readme()
        print(f'docs check readme: {len(bad)} broken links in README.md'); print(*bad, sep='\n') if bad else None
        failed |= bool(bad)
    if 'links' in what:
        bad, n_ext = check_links(site)
        print(f'docs check links: {len(bad)} broken references in {site.relative_to(root)}; {n_ext} external links '
              'not fetched (no network beyond the package registries; --external runs Sphinx linkcheck)')
        if bad: print(*bad, sep='\n')
        failed |= bool(bad)
        if '--external' in args:
            failed |= subprocess.call([sys.executable, '-m', 'sphinx', '-b', 'linkcheck', '-q', '-c', str(root/'docs'),
                                       '-d', str(root/'_docs'/'.doctrees'), str(root/'_proc'), str(root/'_docs'/'linkcheck')],
                                      env=dict(os.environ, FASTOPT_DOCS_EXECUTE='off')) != 0
    if 'browser' in what:
        if os.environ.get('FASTOPT_DOCS_NO_BROWSER'):
            print('docs check browser: SKIPPED, because FASTOPT_DOCS_NO_BROWSER is set: no page was loaded')
        else:
            start = time.time()
            bad, lines = check_browser(site, shots)
            print(*lines, sep='\n')
            print(f'docs check browser: {len(bad)} problems in {sum(1 for l in lines if ": " in l and "math" in l)} pages '
                  f'({time.time() - start:.0f} s)')
            if bad: print(*bad, sep='\n')
            failed |= bool(bad)
    return 1 if failed else 0
