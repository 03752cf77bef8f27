// The Weft dashboard: a single page app on hash routes (#/, #/tasks,
// #/tasks/ID, #/jobs/ID, #/nodes/ID, #/login) over the coordinator's JSON API.
//
// Plain JavaScript, no framework, no build step, nothing from a CDN; the
// server sends a strict CSP, so there is no inline script or style anywhere.
// Every string from the server (task output above all, but also names,
// labels and errors) is untrusted: it enters the page as text
// (createTextNode / textContent), never as HTML. The token is sent once, to
// /api/login, and lives on only as the server's HttpOnly session cookie:
// nothing is kept in localStorage or sessionStorage.
'use strict';

(() => {
  const STATES = ['pending', 'queued', 'assigned', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out',
    'upstream_failed', 'skipped'];
  const FINAL = new Set(['succeeded', 'failed', 'cancelled', 'timed_out', 'upstream_failed', 'skipped']);
  const REFRESH_MS = 3000;
  const PAGE_SIZE = 50;
  // The most task output one page keeps; older text is dropped from the top.
  const OUTPUT_MAX_CHARS = 1000000;
  const SVG_NS = 'http://www.w3.org/2000/svg';

  const main = document.getElementById('main');

  // Who is logged in ({name, scopes}); null until /api/me answers.
  let me = null;
  // Where to go after logging in, and what the login page should say.
  let returnTo = '#/';
  let loginNote = '';
  // The page on screen: its timers and streams end when the route changes.
  let page = null;

  // ---------------------------------------------------------------- DOM

  function append(el, children) {
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      if (Array.isArray(child)) append(el, child);
      else if (child instanceof Node) el.appendChild(child);
      else el.appendChild(document.createTextNode(String(child)));
    }
  }

  function build(el, attrs, children) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith('on') && typeof value === 'function') {
        el.addEventListener(key.slice(2), value);
      } else {
        el.setAttribute(key, value === true ? '' : String(value));
      }
    }
    append(el, children);
    return el;
  }

  // An HTML element: h('a', {href: '#/'}, 'text', child, ...). Strings
  // become text nodes, never markup.
  function h(tag, attrs, ...children) {
    return build(document.createElement(tag), attrs, children);
  }

  // An SVG element, the same way.
  function svg(tag, attrs, ...children) {
    return build(document.createElementNS(SVG_NS, tag), attrs, children);
  }

  function badge(state, big) {
    const name = normState(state);
    return h('span', { class: `badge state-${name}${big ? ' big' : ''}` }, name.replace('_', ' '));
  }

  function chips(labels) {
    const entries = Object.entries(labels || {});
    if (entries.length === 0) return h('span', { class: 'muted' }, '—');
    return entries.map(([k, v]) => h('span', { class: 'chip' }, `${k}=${v}`));
  }

  function panel(title, ...children) {
    return h('section', { class: 'panel' }, title ? h('h2', {}, title) : null, ...children);
  }

  function fields(rows) {
    const dl = h('dl', { class: 'fields' });
    for (const [name, value] of rows) {
      if (value === null || value === undefined) continue;
      const field = name.toLowerCase().replace(/[^a-z0-9]+/g, '-');
      dl.append(h('dt', {}, name), h('dd', { 'data-field': field }, value));
    }
    return dl;
  }

  function banner(kind, text) {
    return h('div', { class: `banner ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, text);
  }

  // A slot for one page's current error: shown, replaced, or cleared.
  function errorSlot() {
    const slot = h('div', { class: 'error-slot' });
    return {
      el: slot,
      show(text) { slot.replaceChildren(banner('error', text)); },
      clear() { slot.replaceChildren(); },
    };
  }

  function pageHead(title, sub, ...right) {
    return h('div', { class: 'page-head' },
      h('div', {}, h('h1', {}, title), sub ? h('div', { class: 'sub' }, sub) : null),
      right.length ? h('div', { class: 'actions' }, ...right) : null);
  }

  function empty(text) {
    return h('div', { class: 'empty' }, prose(text));
  }

  // The page's own sentences with `code` in backticks. Only for strings
  // written here: server text is always plain text.
  function prose(text) {
    return String(text).split('`').map((part, i) => (i % 2 ? h('code', {}, part) : part));
  }

  // ---------------------------------------------------------------- formats

  function normState(state) {
    return String(state || 'unknown').toLowerCase().replace(/^(task_state_|node_state_)/, '');
  }

  function ago(seconds) {
    if (!Number.isFinite(seconds)) return '—';
    const s = Math.max(0, seconds);
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 90) return `${Math.round(s)} s`;
    if (s < 90 * 60) return `${Math.round(s / 60)} min`;
    if (s < 36 * 3600) return `${(s / 3600).toFixed(1)} h`;
    return `${(s / 86400).toFixed(1)} d`;
  }

  function when(iso) {
    const t = Date.parse(iso);
    if (!iso || Number.isNaN(t)) return h('span', { class: 'muted' }, '—');
    // Past ("2 min ago") or to come (a schedule's next fire, a start time).
    const since = (Date.now() - t) / 1000;
    return h('time', { datetime: iso, title: new Date(t).toLocaleString() },
      since >= 0 ? `${ago(since)} ago` : `in ${ago(-since)}`);
  }

  function clock(t) {
    return new Date(t).toLocaleTimeString([], { hour12: false });
  }

  function duration(ms) {
    if (!Number.isFinite(ms)) return '';
    return ago(ms / 1000);
  }

  function shellWord(word) {
    return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
  }

  function taskWhat(task) {
    if (Array.isArray(task.command) && task.command.length) return task.command.map(shellWord).join(' ');
    if (task.handler) return task.handler;
    return '';
  }

  function shortId(id) {
    return String(id || '');
  }

  function hasScope(scope) {
    return !!me && Array.isArray(me.scopes) && (me.scopes.includes(scope) || me.scopes.includes('admin'));
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
    // The server refuses every POST without this header: a cross-site form
    // cannot set it, so the session cookie alone never acts.
    if (method !== 'GET') init.headers['X-Weft-Csrf'] = '1';
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, `cannot reach the coordinator (${e.message})`);
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = null; }
    }
    if (!res.ok) {
      const message = data && typeof data.error === 'string' ? data.error : `${res.status} ${res.statusText}`;
      throw new ApiError(res.status, message);
    }
    return data;
  }

  // What to tell the user about a failed call made to `doing` something.
  function describe(err, doing) {
    switch (err.status) {
      case 0: return `Could not ${doing}: ${err.message}.`;
      case 401: return `Your session has ended: ${err.message}`;
      case 403: return `This token cannot ${doing}: ${err.message}`;
      case 404: return `Not found: ${err.message}`;
      case 429: return `Too many requests; try again shortly: ${err.message}`;
      case 503: return `The coordinator is shutting down: ${err.message}`;
      default: return `Could not ${doing}: ${err.message}`;
    }
  }

  // A 401 anywhere means the session is gone (logged out, revoked, expired):
  // back to the login page, then back here.
  function authLost(err) {
    if (!err || err.status !== 401) return false;
    me = null;
    loginNote = `Your session has ended (${err.message}). Log in again.`;
    if (!location.hash.startsWith('#/login')) returnTo = location.hash || '#/';
    location.hash = '#/login';
    return true;
  }

  // ---------------------------------------------------------------- routes

  function parseRoute() {
    const raw = location.hash.replace(/^#/, '') || '/';
    const q = raw.indexOf('?');
    const path = q < 0 ? raw : raw.slice(0, q);
    const params = new URLSearchParams(q < 0 ? '' : raw.slice(q + 1));
    let parts;
    try {
      parts = path.split('/').filter(Boolean).map(decodeURIComponent);
    } catch (_) {
      return { name: 'notfound' };
    }
    if (parts.length === 0) return { name: 'overview' };
    if (parts[0] === 'login' && parts.length === 1) return { name: 'login' };
    if (parts[0] === 'tasks' && parts.length === 1) return { name: 'tasks', params };
    if (parts[0] === 'tasks' && parts.length === 2) return { name: 'task', id: parts[1] };
    if (parts[0] === 'nodes' && parts.length === 2) return { name: 'node', id: parts[1] };
    if (parts[0] === 'jobs' && parts.length === 2) return { name: 'job', id: parts[1], params };
    return { name: 'notfound' };
  }

  function newPage() {
    const pg = {
      alive: true,
      timers: new Set(),
      closers: [],
      // Runs `fn` now and again `ms` after each run ends (never two at once).
      every(ms, fn) {
        const tick = async () => {
          if (!pg.alive) return;
          try { await fn(); } finally {
            if (pg.alive) {
              const t = setTimeout(() => { pg.timers.delete(t); tick(); }, ms);
              pg.timers.add(t);
            }
          }
        };
        tick();
      },
      later(ms, fn) {
        const t = setTimeout(() => { pg.timers.delete(t); if (pg.alive) fn(); }, ms);
        pg.timers.add(t);
      },
      onEnd(fn) { pg.closers.push(fn); },
    };
    return pg;
  }

  function endPage() {
    if (!page) return;
    page.alive = false;
    for (const t of page.timers) clearTimeout(t);
    for (const close of page.closers) {
      try { close(); } catch (_) { /* the page is going away anyway */ }
    }
    page = null;
  }

  function updateChrome(route) {
    const nav = document.getElementById('nav');
    const who = document.getElementById('who');
    nav.hidden = !me;
    who.hidden = !me;
    if (me) {
      document.getElementById('who-name').textContent =
        `${me.name} · ${(me.scopes || []).join(', ') || 'no scopes'}`;
    }
    const section = route.name === 'task' || route.name === 'job' ? 'tasks' : route.name;
    for (const a of nav.querySelectorAll('a')) {
      a.classList.toggle('current', a.dataset.route === section);
    }
  }

  async function render() {
    endPage();
    const pg = newPage();
    page = pg;
    const route = parseRoute();
    if (route.name !== 'login' && !me) {
      try {
        me = await api('GET', '/api/me');
      } catch (err) {
        if (!pg.alive) return;
        if (err.status === 401) {
          returnTo = location.hash || '#/';
          location.hash = '#/login';
          return;
        }
        updateChrome(route);
        main.replaceChildren(pageHead('Weft'), banner('error', describe(err, 'check the session')),
          h('button', { type: 'button', onclick: () => render() }, 'Try again'));
        return;
      }
      if (!pg.alive) return;
    }
    updateChrome(route);
    main.replaceChildren();
    switch (route.name) {
      case 'login': return loginPage(pg);
      case 'overview': return overviewPage(pg);
      case 'tasks': return tasksPage(pg, route.params);
      case 'task': return taskPage(pg, route.id);
      case 'node': return nodePage(pg, route.id);
      case 'job': return jobPage(pg, route.id, route.params);
      default:
        document.title = 'Weft · not found';
        main.append(pageHead('No such page'), panel(null, h('p', {}, 'Go to the ', h('a', { href: '#/' }, 'overview'), '.')));
    }
  }

  // ---------------------------------------------------------------- login

  function loginPage(pg) {
    document.title = 'Weft · log in';
    const note = loginNote;
    loginNote = '';
    const error = errorSlot();
    const input = h('input', {
      type: 'password', id: 'token', name: 'token', autocomplete: 'off', spellcheck: 'false',
      placeholder: 'weft_…', required: true, 'aria-label': 'Token',
    });
    const submit = h('button', { type: 'submit', id: 'login-submit' }, 'Log in');
    const form = h('form', { id: 'login-form' },
      h('label', { class: 'field', for: 'token' }, 'Token'), input, submit);
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const token = input.value.trim();
      if (!token) { error.show('Paste a token first.'); return; }
      submit.disabled = true;
      error.clear();
      try {
        me = await api('POST', '/api/login', { token });
        input.value = '';
        const next = returnTo && !returnTo.startsWith('#/login') ? returnTo : '#/';
        returnTo = '#/';
        if (location.hash === next) render(); else location.hash = next;
      } catch (err) {
        if (!pg.alive) return;
        input.value = '';
        error.show(err.status === 401
          ? `That token was not accepted: ${err.message}`
          : describe(err, 'log in'));
        submit.disabled = false;
        input.focus();
      }
    });
    main.append(h('div', { class: 'login panel' },
      h('h1', {}, 'Log in to Weft'),
      h('p', {}, prose('Paste a client token (from `weft token create`, or the admin token the coordinator wrote at its first start). ' +
        'It is kept only as this browser\'s session cookie.')),
      note ? banner('info', note) : null,
      error.el,
      form));
    input.focus();
  }

  async function logout() {
    try { await api('POST', '/api/logout'); } catch (_) { /* the session is being dropped anyway */ }
    me = null;
    returnTo = '#/';
    loginNote = 'You have logged out.';
    if (location.hash === '#/login') render(); else location.hash = '#/login';
  }

  // ---------------------------------------------------------------- overview

  function overviewPage(pg) {
    document.title = 'Weft · overview';
    const sub = h('span', {}, '');
    const error = errorSlot();
    const body = h('div', { id: 'overview' }, h('p', { class: 'muted' }, 'Loading…'));
    main.append(pageHead('Overview', sub), error.el, body);
    pg.every(REFRESH_MS, async () => {
      try {
        const o = await api('GET', '/api/overview');
        // Limits and schedules are extras: a coordinator without them
        // (or a caller who may not read them) still gets its overview.
        const [limits, schedules] = await Promise.all([
          api('GET', '/api/limits').catch(() => null),
          api('GET', '/api/schedules').catch(() => null),
        ]);
        if (!pg.alive) return;
        error.clear();
        sub.textContent = `Weft ${o.version || ''} · up ${ago(o.uptime_seconds)} · refreshes every ${REFRESH_MS / 1000} s`;
        body.replaceChildren(...overviewBody(o), ...policyPanels(limits, schedules));
      } catch (err) {
        if (!pg.alive || authLost(err)) return;
        error.show(describe(err, 'read the overview'));
      }
    });
  }

  function overviewBody(o) {
    const nodes = Array.isArray(o.nodes) ? o.nodes : [];
    const byState = o.tasks_by_state || {};
    const slots = Number(o.slots) || 0;
    const free = Number(o.slots_free) || 0;
    const draining = nodes.filter((n) => normState(n.state) === 'draining').length;
    const series = o.series || {};
    const interval = Number(series.interval_seconds) || 5;
    const queue = Array.isArray(series.queue_depth) ? series.queue_depth.map(Number) : [];
    const rate = Array.isArray(series.throughput) ? series.throughput.map(Number) : [];

    const card = (label, value, small, id) => h('div', { class: 'card', id },
      h('div', { class: 'label' }, label), h('div', { class: 'value' }, String(value), small ? h('small', {}, ` ${small}`) : null));

    const counts = h('div', { class: 'counts', id: 'task-counts' });
    const known = STATES.concat(Object.keys(byState).filter((s) => !STATES.includes(s)));
    for (const state of known) {
      const n = Number(byState[state]) || 0;
      counts.append(h('div', { class: 'count', 'data-state': state },
        h('a', { href: `#/tasks?state=${encodeURIComponent(state)}` }, badge(state), h('span', { class: 'n' }, String(n)))));
    }

    return [
      h('div', { class: 'cards' },
        card('Nodes', nodes.length, draining ? `${draining} draining` : '', 'card-nodes'),
        card('Slots in use', slots - free, `of ${slots}`, 'card-slots'),
        card('Queued', Number(byState.queued) || 0,
          Number(byState.assigned) ? `+ ${Number(byState.assigned)} sent to nodes` : '', 'card-queued'),
        card('Running', Number(byState.running) || 0, '', 'card-running')),
      panel('Tasks by state', counts),
      panel('Nodes', nodesTable(nodes)),
      h('div', { class: 'grid' },
        panel(null, chart('Queue depth', queue, interval, 'queue', (v) => String(Math.round(v)), 'tasks waiting')),
        panel(null, chart('Throughput', rate, interval, 'throughput', (v) => v.toFixed(2), 'tasks finished per second'))),
    ];
  }

  // The limits (ListLimits) and schedules (ListSchedules), read-only.
  function policyPanels(limits, schedules) {
    const out = [];
    const ls = limits && Array.isArray(limits.limits) ? limits.limits : null;
    if (ls) out.push(panel('Limits', limitsTable(ls)));
    const ss = schedules && Array.isArray(schedules.schedules) ? schedules.schedules : null;
    if (ss) out.push(panel('Schedules', schedulesTable(ss)));
    return out;
  }

  function limitsTable(list) {
    if (list.length === 0) return empty('No limits. Set one with `weft limit set api 100/s`.');
    const rows = list.map((l) => {
      const rate = l.rate || {};
      const what = l.kind === 'rate'
        ? `${rate.units} per ${ago(Number(rate.period_seconds) || 0)}${rate.burst ? `, burst ${rate.burst}` : ''}`
        : `at most ${l.max_running} running`;
      const now = l.kind === 'rate' ? `${l.available} available` : `${l.running} running`;
      return h('tr', { 'data-limit': l.name },
        h('td', { class: 'mono' }, l.name), h('td', {}, l.kind), h('td', {}, what), h('td', {}, now),
        h('td', { class: 'num' }, String(l.waiting ?? 0)));
    });
    return h('div', { class: 'table-wrap' }, h('table', { id: 'limits-table' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'Kind'), h('th', {}, 'Limit'), h('th', {}, 'Now'),
        h('th', { class: 'num' }, 'Waiting'))),
      h('tbody', {}, rows)));
  }

  function schedulesTable(list) {
    if (list.length === 0) return empty('No schedules. Create one with `weft schedule create NAME --cron "*/5 * * * *" -- CMD`.');
    const rows = list.map((s) => h('tr', { 'data-schedule': s.name },
      h('td', { class: 'mono' }, s.name), h('td', { class: 'mono' }, s.cron || ''),
      h('td', {}, s.time_zone || 'UTC'), h('td', {}, s.paused ? 'paused' : 'active'),
      h('td', {}, (s.overlap || '').replace('_', ' ')), h('td', { class: 'nowrap' }, s.next_fire ? when(s.next_fire) : '—'),
      h('td', { class: 'nowrap' }, s.last_fire ? when(s.last_fire) : '—'),
      h('td', {}, s.last_task_id ? h('a', { class: 'mono', href: `#/tasks/${encodeURIComponent(s.last_task_id)}` }, shortId(s.last_task_id)) : '—')));
    return h('div', { class: 'table-wrap' }, h('table', { id: 'schedules-table' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'Cron'), h('th', {}, 'Time zone'), h('th', {}, 'Status'),
        h('th', {}, 'Overlap'), h('th', {}, 'Next fire'), h('th', {}, 'Last fire'), h('th', {}, 'Last task'))),
      h('tbody', {}, rows)));
  }

  // A line chart of `values` (oldest first, one per `interval` seconds),
  // drawn as SVG with no text inside (it stretches to the panel's width);
  // the labels are HTML around it.
  function chart(title, values, interval, cls, format, unit) {
    const W = 600;
    const H = 150;
    const n = values.length;
    const last = n ? values[n - 1] : 0;
    const peak = n ? Math.max(...values.filter(Number.isFinite), 0) : 0;
    const top = niceCeil(peak);
    const figure = svg('svg', {
      class: `chart ${cls}`, viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img',
      'aria-label': `${title}: ${format(last)} ${unit} now, peak ${format(peak)}`,
    });
    for (const f of [0.25, 0.5, 0.75]) {
      figure.append(svg('line', { class: 'grid-line', x1: 0, x2: W, y1: H * f, y2: H * f }));
    }
    figure.append(svg('line', { class: 'grid-line', x1: 0, x2: W, y1: H - 0.5, y2: H - 0.5 }));
    if (n > 0) {
      const x = (i) => (n === 1 ? W : (i / (n - 1)) * W);
      const y = (v) => H - 2 - (Math.max(0, Number.isFinite(v) ? v : 0) / top) * (H - 6);
      const points = values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`);
      if (n === 1) points.unshift(`0,${y(values[0]).toFixed(1)}`);
      figure.append(svg('path', { class: 'area', d: `M0,${H} L${points.join(' L')} L${W},${H} Z` }));
      figure.append(svg('polyline', { class: 'line', points: points.join(' ') }));
    }
    const span = n * interval;
    return [
      h('div', { class: 'chart-head' }, h('h2', {}, title), h('span', { class: 'now' }, `${format(last)} `, h('span', { class: 'muted' }, unit))),
      figure,
      h('div', { class: 'chart-legend' },
        h('span', {}, n ? `${ago(span)} ago` : 'no samples yet'),
        h('span', {}, `scale 0–${format(top)}`),
        h('span', {}, 'now')),
    ];
  }

  function niceCeil(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function nodesTable(nodes) {
    if (nodes.length === 0) {
      return empty('No nodes are connected. Start one with `weft-node --join TOKEN` (a join token from `weft token create --role node`).');
    }
    const rows = nodes.slice().sort((a, b) => String(a.name).localeCompare(String(b.name))).map((n) => {
      const slots = Number(n.slots) || 0;
      const used = Number(n.slots_used) || 0;
      const free = n.slots_free !== undefined ? Number(n.slots_free) : slots - used;
      const href = `#/nodes/${encodeURIComponent(n.id)}`;
      return h('tr', { class: 'link', 'data-node': n.name, onclick: (ev) => { if (!ev.target.closest('a')) location.hash = href; } },
        h('td', { class: 'nowrap' }, h('a', { href }, n.name || n.id)),
        h('td', {}, badge(n.state)),
        h('td', {}, slotMeter(used, slots, free)),
        h('td', {}, chips(n.labels)),
        h('td', { class: 'hide-narrow' }, (n.handlers || []).length ? (n.handlers || []).map((x) => h('span', { class: 'chip' }, x)) : h('span', { class: 'muted' }, '—')),
        h('td', { class: 'num nowrap' }, heartbeat(n)));
    });
    return h('div', { class: 'table-wrap' }, h('table', { id: 'nodes-table' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'State'), h('th', {}, 'Slots'),
        h('th', {}, 'Labels'), h('th', { class: 'hide-narrow' }, 'Handlers'), h('th', { class: 'num' }, 'Heartbeat'))),
      h('tbody', {}, rows)));
  }

  function heartbeat(n) {
    const age = n.heartbeat_age_seconds;
    return age === null || age === undefined || !Number.isFinite(Number(age)) ? '—' : `${ago(Number(age))} ago`;
  }

  function slotMeter(used, slots, free) {
    const w = 70;
    const part = slots > 0 ? Math.min(1, used / slots) * w : 0;
    return h('div', { class: 'slots' },
      svg('svg', { class: 'meter', viewBox: `0 0 ${w} 8`, 'aria-hidden': 'true' },
        svg('rect', { class: 'free', x: 0, y: 0, width: w, height: 8, rx: 4 }),
        svg('rect', { class: 'used', x: 0, y: 0, width: part.toFixed(1), height: 8, rx: 4 })),
      h('span', { class: 'slot-text nowrap' }, `${used} used · ${free} free`));
  }

  // ---------------------------------------------------------------- tasks

  function tasksPage(pg, params) {
    document.title = 'Weft · tasks';
    const filters = {
      state: params.get('state') || '',
      label: params.get('label') || '',
      name: params.get('name') || '',
      node: params.get('node') || '',
    };
    // `#/tasks?limit=N` picks the page size (1 to 500; the server caps it too).
    const limit = Math.min(500, Math.max(1, Number(params.get('limit')) || PAGE_SIZE));
    const error = errorSlot();
    const stateSelect = h('select', { id: 'filter-state', name: 'state' },
      h('option', { value: '' }, 'any state'),
      STATES.map((s) => h('option', { value: s, selected: s === filters.state }, s.replace('_', ' '))));
    const labelInput = h('input', { id: 'filter-label', name: 'label', placeholder: 'key=value', value: filters.label, size: 16 });
    const nameInput = h('input', { id: 'filter-name', name: 'name', placeholder: 'part of a name', value: filters.name, size: 16 });
    const nodeInput = h('input', { id: 'filter-node', name: 'node', placeholder: 'node name or id', value: filters.node, size: 16 });
    const filterForm = h('form', { class: 'filters', id: 'task-filters' },
      h('label', { class: 'field' }, 'State', stateSelect),
      h('label', { class: 'field' }, 'Label', labelInput),
      h('label', { class: 'field' }, 'Name', nameInput),
      h('label', { class: 'field' }, 'Node', nodeInput),
      h('button', { type: 'submit', id: 'filter-apply' }, 'Filter'),
      h('button', { type: 'button', class: 'secondary', id: 'filter-clear', onclick: () => { location.hash = '#/tasks'; } }, 'Clear'));
    filterForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const q = new URLSearchParams();
      if (stateSelect.value) q.set('state', stateSelect.value);
      if (labelInput.value.trim()) q.set('label', labelInput.value.trim());
      if (nameInput.value.trim()) q.set('name', nameInput.value.trim());
      if (nodeInput.value.trim()) q.set('node', nodeInput.value.trim());
      if (limit !== PAGE_SIZE) q.set('limit', String(limit));
      const next = q.toString() ? `#/tasks?${q}` : '#/tasks';
      if (location.hash === next) load(''); else location.hash = next;
    });

    const findInput = h('input', { id: 'find-id', name: 'id', placeholder: 'task id', size: 28, class: 'mono' });
    const findForm = h('form', { class: 'filters', id: 'task-find' },
      h('label', { class: 'field' }, 'Find by id', findInput),
      h('button', { type: 'submit', class: 'secondary' }, 'Open'));
    findForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const id = findInput.value.trim();
      if (id) location.hash = `#/tasks/${encodeURIComponent(id)}`;
    });

    const list = h('div', { id: 'task-list' }, h('p', { class: 'muted' }, 'Loading…'));
    const prev = h('button', { type: 'button', class: 'secondary', id: 'page-prev', disabled: true }, '← Newer');
    const next = h('button', { type: 'button', class: 'secondary', id: 'page-next', disabled: true }, 'Older →');
    const where = h('span', { class: 'muted', id: 'page-where' }, '');
    const refresh = h('button', { type: 'button', class: 'secondary', id: 'tasks-refresh' }, 'Refresh');

    const pages = pager(prev, next, (token) => load(token));

    async function load(token) {
      const q = new URLSearchParams();
      if (filters.state) q.set('state', filters.state);
      if (filters.label) q.set('label', filters.label);
      if (filters.name) q.set('name', filters.name);
      if (filters.node) q.set('node', filters.node);
      q.set('limit', String(limit));
      if (token) q.set('page_token', token);
      try {
        const data = await api('GET', `/api/tasks?${q}`);
        if (!pg.alive) return;
        error.clear();
        const tasks = Array.isArray(data.tasks) ? data.tasks : [];
        list.replaceChildren(tasksTable(tasks, filters));
        pages.got(data.next_page_token);
        where.textContent = `page ${pages.number()}`;
      } catch (err) {
        if (!pg.alive || authLost(err)) return;
        error.show(describe(err, 'list tasks'));
      }
    }
    refresh.addEventListener('click', () => load(pages.current()));

    const active = [filters.state && `state ${filters.state}`, filters.label && `label ${filters.label}`,
      filters.name && `name containing “${filters.name}”`].filter(Boolean);
    main.append(
      pageHead('Tasks', active.length ? `Showing ${active.join(', ')}; newest first` : 'All tasks, newest first', refresh),
      panel(null, h('div', { class: 'toolbar' }, filterForm, findForm)),
      error.el,
      panel(null, list, h('div', { class: 'pager' }, where, prev, next)));
    load('');
  }

  function tasksTable(tasks, filters) {
    if (tasks.length === 0) {
      if (filters.job) return empty('This page of the job has no tasks.');
      const filtered = filters.state || filters.label || filters.name || filters.node;
      return empty(filtered ? 'No tasks match these filters.' : 'No tasks yet. Submit one with `weft submit -- echo hello`.');
    }
    const rows = tasks.map((t) => {
      const href = `#/tasks/${encodeURIComponent(t.id)}`;
      return h('tr', { class: 'link', 'data-task': t.id, onclick: (ev) => { if (!ev.target.closest('a')) location.hash = href; } },
        h('td', {}, h('a', { class: 'mono', href }, shortId(t.id))),
        h('td', {}, t.name || h('span', { class: 'muted' }, '—')),
        h('td', {}, badge(t.state)),
        h('td', { class: 'hide-narrow mono' }, taskWhat(t)),
        h('td', { class: 'hide-narrow' }, t.node_name || h('span', { class: 'muted' }, '—')),
        h('td', { class: 'num hide-narrow' }, String(t.attempt ?? '')),
        h('td', { class: 'nowrap' }, when(t.created_at)));
    });
    return h('div', { class: 'table-wrap' }, h('table', { id: 'tasks-table' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Id'), h('th', {}, 'Name'), h('th', {}, 'State'),
        h('th', { class: 'hide-narrow' }, 'What'), h('th', { class: 'hide-narrow' }, 'Node'),
        h('th', { class: 'num hide-narrow' }, 'Attempt'), h('th', {}, 'Created'))),
      h('tbody', {}, rows)));
  }

  // ---------------------------------------------------------------- a task

  function taskPage(pg, id) {
    document.title = `Weft · task ${id}`;
    const error = errorSlot();
    const title = h('h1', {}, `Task ${id}`);
    const stateBadge = h('span', { id: 'task-state' });
    const actions = h('div', { class: 'actions', id: 'task-actions' });
    const summary = h('div', { id: 'task-summary' }, h('p', { class: 'muted' }, 'Loading…'));
    const attemptsBox = h('div', { id: 'task-attempts' });
    const progressBox = h('div', { id: 'task-progress', hidden: true });
    const streamStatus = h('span', { class: 'stream-status', id: 'stream-status' }, 'connecting…');
    const output = h('pre', { class: 'output', id: 'output', 'aria-live': 'off' });
    const outputEmpty = h('p', { class: 'muted', id: 'output-empty' }, 'No output yet.');
    main.append(
      h('div', { class: 'page-head' },
        h('div', {}, title, h('div', { class: 'sub' }, h('a', { href: '#/tasks' }, '← all tasks'))),
        h('div', { class: 'actions' }, stateBadge, actions)),
      error.el,
      h('div', { class: 'split' },
        panel('Spec', summary),
        h('div', {},
          panel('Attempts', attemptsBox),
          panel(null, h('div', { class: 'output-head' }, h('h2', {}, 'Output'), streamStatus), progressBox, outputEmpty, output))));

    let task = null;
    // The attempt timeline built from the events' state changes, for a
    // server whose task JSON has no `attempts` yet.
    const seen = new Map();
    let outputChars = 0;
    let outputAttempt = 0;
    let confirming = false;
    // The seq after the newest event shown: a task snapshot whose next_seq
    // is below it is older than what the page shows (a Cancel's answer
    // that arrives after the stream said "cancelled") and does not take
    // the page back; the refresh after the events brings a newer one.
    let shownSeq = 0;

    function show(t) {
      if (Number(t.next_seq) < shownSeq) {
        renderActions();
        return;
      }
      task = t;
      const state = normState(t.state);
      title.textContent = t.name ? `${t.name}` : `Task ${t.id}`;
      stateBadge.replaceChildren(badge(state, true));
      summary.replaceChildren(taskFields(t));
      renderAttempts();
      renderActions();
    }

    function renderActions() {
      if (confirming) return;
      const wanted = task && !FINAL.has(normState(task.state)) && hasScope('cancel');
      // Keep the button that is there (a click may be on its way to it).
      if (wanted && actions.querySelector('#cancel')) return;
      actions.replaceChildren();
      if (!wanted) return;
      actions.append(h('button', { type: 'button', class: 'danger', id: 'cancel', onclick: askCancel }, 'Cancel task'));
    }

    function askCancel() {
      confirming = true;
      const yes = h('button', { type: 'button', class: 'danger', id: 'cancel-confirm' }, 'Yes, cancel it');
      const no = h('button', { type: 'button', class: 'secondary', id: 'cancel-keep' }, 'Keep it');
      no.addEventListener('click', () => { confirming = false; renderActions(); });
      yes.addEventListener('click', async () => {
        yes.disabled = true;
        no.disabled = true;
        try {
          const data = await api('POST', `/api/tasks/${encodeURIComponent(id)}/cancel`);
          if (!pg.alive) return;
          error.clear();
          confirming = false;
          if (data && data.task) show(data.task); else renderActions();
        } catch (err) {
          if (!pg.alive || authLost(err)) return;
          confirming = false;
          renderActions();
          error.show(describe(err, 'cancel this task'));
        }
      });
      actions.replaceChildren(h('div', { class: 'confirm' }, 'Cancel this task? Its running attempt is stopped.', yes, no));
    }

    function renderAttempts() {
      const fromServer = task && Array.isArray(task.attempts) ? task.attempts.map(serverAttempt) : null;
      const list = fromServer || Array.from(seen.values()).sort((a, b) => a.attempt - b.attempt);
      attemptsBox.replaceChildren(...[].concat(timeline(list, task)));
    }

    function onState(ev, seq) {
      if (seq) shownSeq = Math.max(shownSeq, seq + 1);
      const state = normState(ev.state);
      const n = Number(ev.attempt) || 0;
      const t = Date.parse(ev.time);
      const at = Number.isNaN(t) ? Date.now() : t;
      if (state === 'assigned' || state === 'running') {
        // A new attempt closes any earlier one still open (its node was lost).
        for (const a of seen.values()) {
          if (a.attempt < n && !a.end) { a.end = at; a.outcome = 'lost'; }
        }
        const a = seen.get(n) || { attempt: n, node: '', start: at, end: null, outcome: state, reason: '' };
        a.node = ev.node_name || a.node;
        a.outcome = state;
        seen.set(n, a);
      } else {
        // Queued again (a retry) or final: the open attempt ended.
        for (const a of seen.values()) {
          if (!a.end) {
            a.end = at;
            a.outcome = FINAL.has(state) ? state : (/lost/i.test(ev.reason || '') ? 'lost' : 'failed');
            a.reason = ev.reason || '';
          }
        }
      }
      if (task) {
        task.state = state;
        if (n) task.attempt = n;
        if (ev.node_name !== undefined) task.node_name = ev.node_name;
        stateBadge.replaceChildren(badge(state, true));
        renderAttempts();
        renderActions();
      }
      // The task's other fields (exit code, error) come with it: fetch it
      // once the burst of events settles.
      scheduleRefresh();
    }

    let refreshQueued = false;
    function scheduleRefresh() {
      if (refreshQueued) return;
      refreshQueued = true;
      pg.later(250, async () => {
        refreshQueued = false;
        try {
          const data = await api('GET', `/api/tasks/${encodeURIComponent(id)}`);
          if (pg.alive && data && data.task) show(data.task);
        } catch (err) {
          if (pg.alive) authLost(err);
        }
      });
    }

    function onOutput(ev) {
      const text = typeof ev.text === 'string' ? ev.text : '';
      if (!text) return;
      outputEmpty.hidden = true;
      const n = Number(ev.attempt) || 0;
      const stick = output.scrollTop + output.clientHeight >= output.scrollHeight - 8;
      if (n && outputAttempt && n !== outputAttempt) {
        output.append(h('span', { class: 'muted attempt-mark' }, `\n── attempt ${n} ──\n`));
      }
      if (n) outputAttempt = n;
      // Text nodes only: task output is untrusted and never parsed as HTML.
      output.append(ev.stream === 'stderr' ? h('span', { class: 'stderr' }, text) : document.createTextNode(text));
      outputChars += text.length;
      while (outputChars > OUTPUT_MAX_CHARS && output.firstChild) {
        outputChars -= (output.firstChild.textContent || '').length;
        output.firstChild.remove();
      }
      if (stick) output.scrollTop = output.scrollHeight;
    }

    function onProgress(ev) {
      // A negative fraction (or none) means "amount unknown": a bar with no
      // value (indeterminate) and no percentage.
      const fraction = ev.fraction === null || ev.fraction === undefined ? NaN : Number(ev.fraction);
      const known = Number.isFinite(fraction) && fraction >= 0;
      const done = known ? Math.min(1, fraction) : 0;
      progressBox.hidden = false;
      progressBox.replaceChildren(
        known ? h('progress', { max: 1, value: done }) : h('progress', {}),
        h('div', { class: 'muted' }, known ? `${Math.round(done * 100)} %` : 'working',
          ev.message ? ` · ${ev.message}` : ''));
    }

    function onFinished(ev) {
      if (ev && ev.task) show(ev.task);
    }

    (async () => {
      try {
        const data = await api('GET', `/api/tasks/${encodeURIComponent(id)}`);
        if (!pg.alive) return;
        show(data.task);
      } catch (err) {
        if (!pg.alive || authLost(err)) return;
        summary.replaceChildren(empty(err.status === 404 ? `No task with id ${id}.`
          : err.status === 400 ? `“${id}” is not a task id: ${err.message}` : 'The task could not be read.'));
        streamStatus.textContent = '';
        error.show(describe(err, 'read this task'));
        return;
      }
      follow(pg, id, {
        state: onState, output: onOutput, progress: onProgress, finished: onFinished,
        status(kind, text) {
          streamStatus.textContent = text;
          streamStatus.classList.toggle('live', kind === 'live');
        },
        error(err) {
          if (!authLost(err)) error.show(describe(err, 'follow this task\'s events'));
        },
        ok() { error.clear(); },
        opened(n) { streamStatus.dataset.opens = String(n); },
      });
    })();
  }

  // Follows a task's events stream: history, then live. The browser's
  // EventSource reconnects by itself and sends Last-Event-ID, so the server
  // resumes right after the last event seen; when the server refuses a
  // reconnect (EventSource then gives up) this retries with ?from_seq.
  // Events at or below the last seq seen are dropped, so a resume never
  // shows a line twice. Seqs start at 0: -1 is "none seen yet".
  function follow(pg, id, on) {
    let lastSeq = -1;
    let finished = false;
    let source = null;
    let failures = 0;
    let opens = 0;
    pg.onEnd(() => { if (source) source.close(); });

    function connect() {
      const from = lastSeq >= 0 ? `?from_seq=${lastSeq + 1}` : '';
      source = new EventSource(`/api/tasks/${encodeURIComponent(id)}/events${from}`);
      const es = source;
      es.onopen = () => {
        failures = 0;
        // How often the stream (re)opened: shown nowhere, read by tests.
        opens += 1;
        on.opened(opens);
        on.ok();
        on.status('live', 'live');
      };
      for (const type of ['state', 'output', 'progress', 'finished']) {
        es.addEventListener(type, (msg) => {
          if (!pg.alive || es !== source) return;
          // Every event the server sends has its seq as its id.
          let seq = msg.lastEventId === '' ? NaN : Number(msg.lastEventId);
          if (Number.isInteger(seq) && seq >= 0) {
            if (seq <= lastSeq) return;
            lastSeq = seq;
          } else {
            seq = 0;
          }
          let data;
          try { data = JSON.parse(msg.data); } catch (_) { return; }
          if (type === 'finished') {
            finished = true;
            es.close();
            on.status('ended', 'finished');
          }
          on[type](data || {}, seq);
        });
      }
      es.onerror = (ev) => {
        if (!pg.alive || finished || es !== source) return;
        // An `error` event the server sent (it then ends the stream, and
        // the browser reconnects from the last id it had): say why.
        if (ev && typeof ev.data === 'string') {
          let why = ev.data;
          try { why = JSON.parse(ev.data).error || why; } catch (_) { /* plain text */ }
          on.error(new ApiError(0, why));
          on.status('retry', 'reconnecting…');
          return;
        }
        if (es.readyState === EventSource.CONNECTING) {
          on.status('retry', 'reconnecting…');
          return;
        }
        // Closed for good: find out why (a 401 sends us to login), then
        // try again with a growing pause.
        es.close();
        failures += 1;
        on.status('retry', 'disconnected; retrying…');
        api('GET', `/api/tasks/${encodeURIComponent(id)}`).then((data) => {
          if (!pg.alive) return;
          // Ended while we were away (the server answers 204 past a
          // task's end, which closes an EventSource): show it, stop.
          if (data && data.task && FINAL.has(normState(data.task.state))) {
            finished = true;
            on.status('ended', 'finished');
            on.finished({ task: data.task });
            return;
          }
          pg.later(Math.min(10000, 500 * 2 ** failures), connect);
        }, (err) => {
          if (!pg.alive) return;
          on.error(err);
          if (err.status !== 401 && err.status !== 404) pg.later(Math.min(10000, 500 * 2 ** failures), connect);
        });
      };
    }
    connect();
  }

  function taskFields(t) {
    const env = Object.entries(t.env || {});
    const envRows = env.map(([k, v]) => h('div', { class: 'mono' }, `${k}=${v}`));
    const kind = t.kind || (t.handler ? 'call' : 'exec');
    return fields([
      ['Id', h('span', { class: 'mono' }, t.id)],
      ['Name', t.name || null],
      ['Kind', kind],
      [kind === 'call' ? 'Handler' : 'Command', h('span', { class: 'mono' }, taskWhat(t) || '—')],
      ['State', badge(t.state)],
      ['Node', t.node_id ? h('a', { href: `#/nodes/${encodeURIComponent(t.node_id)}` }, t.node_name || t.node_id) : (t.node_name || null)],
      ['Attempt', t.attempt ? `${t.attempt}${t.max_attempts ? ` of at most ${t.max_attempts}` : ''}` : null],
      ['Exit code', t.exit_code !== undefined && t.exit_code !== null ? String(t.exit_code) : null],
      ['Error', t.error ? h('span', { class: 'mono' }, t.error) : null],
      ['Last outcome', t.last_outcome ? t.last_outcome.replace('_', ' ') : null],
      ['Waiting because', t.pending_reason || null],
      ['Job', t.job_id && t.job_id !== t.id ? taskLinkTo('jobs', t.job_id)
        : (t.job_id ? h('span', {}, taskLinkTo('jobs', t.job_id), h('span', { class: 'muted' }, ' (its first task)')) : null)],
      ['Ref', t.ref ? h('span', { class: 'mono' }, t.ref) : null],
      ['After', Array.isArray(t.after) && t.after.length ? linkList(t.after) : null],
      ['After rule', Array.isArray(t.after) && t.after.length ? (t.after_rule || 'all_succeeded').replace(/_/g, ' ') : null],
      ['Waiting for', Array.isArray(t.waiting_for) && t.waiting_for.length ? linkList(t.waiting_for) : null],
      ['Not before', t.not_before ? when(t.not_before) : null],
      ['Priority', t.priority !== undefined && t.priority !== null ? String(t.priority) : null],
      ['Fair key', t.fair_key ? `${t.fair_key} (weight ${t.fair_weight || 1})` : null],
      ['Concurrency key', t.concurrency ? `${t.concurrency.key}${t.concurrency.max_running ? `, at most ${t.concurrency.max_running}` : ''}, over the limit: ${String(t.concurrency.on_limit || 'queue').replace('_', ' ')}` : null],
      ['Rate limits', Array.isArray(t.rate_limits) && t.rate_limits.length
        ? t.rate_limits.map((r) => h('span', { class: 'chip' }, `${r.name} × ${r.units}`)) : null],
      ['Resources', t.resources && Object.keys(t.resources).length ? chips(t.resources) : null],
      ['Labels', chips(t.labels)],
      ['Environment', envRows.length ? envRows : h('span', { class: 'muted' }, '—')],
      ['Timeout', t.timeout_seconds ? ago(Number(t.timeout_seconds)) : 'none'],
      ['Failures', t.failures ? String(t.failures) : null],
      ['Node losses', t.node_losses ? String(t.node_losses) : null],
      ['Created', when(t.created_at)],
      ['Updated', when(t.updated_at)],
      // A call's result: text, like all output (untrusted).
      ['Result', typeof t.output === 'string' && t.output
        ? h('pre', { class: 'output result' }, t.output, t.output_truncated ? h('span', { class: 'muted' }, '\n… (cut)') : null)
        : null],
    ]);
  }

  // A link to `#/KIND/ID` showing the short id.
  function taskLinkTo(kind, id) {
    return h('a', { class: 'mono', href: `#/${kind}/${encodeURIComponent(id)}` }, shortId(id));
  }

  function linkList(ids) {
    return ids.map((id) => h('span', { class: 'chip' }, taskLinkTo('tasks', id)));
  }

  // ---------------------------------------------------------------- a job

  // A job: its tasks (oldest first, a page at a time) and how many are in
  // each state; Cancel job (cancel scope) cancels every live task of it.
  function jobPage(pg, id, params) {
    document.title = `Weft · job ${id}`;
    const limit = Math.min(500, Math.max(1, Number(params && params.get('limit')) || PAGE_SIZE));
    const error = errorSlot();
    const actions = h('div', { class: 'actions', id: 'job-actions' });
    const counts = h('div', { class: 'counts', id: 'job-counts' }, h('p', { class: 'muted' }, 'Loading…'));
    const list = h('div', { id: 'job-tasks' });
    const info = h('div', { id: 'job-info' });
    const prev = h('button', { type: 'button', class: 'secondary', id: 'job-page-prev', disabled: true }, '← Earlier');
    const next = h('button', { type: 'button', class: 'secondary', id: 'job-page-next', disabled: true }, 'Later →');
    main.append(
      h('div', { class: 'page-head' },
        h('div', {}, h('h1', {}, `Job ${id}`), h('div', { class: 'sub' }, h('a', { href: '#/tasks' }, '← all tasks'))),
        actions),
      error.el, info,
      panel('Tasks by state', counts),
      panel('Tasks, in submission order', list, h('div', { class: 'pager' }, prev, next)));
    const pages = pager(prev, next, (token) => load(token));
    let live = false;
    let confirming = false;

    function renderActions() {
      if (confirming) return;
      const wanted = live && hasScope('cancel');
      if (wanted && actions.querySelector('#cancel-job')) return;
      actions.replaceChildren();
      if (wanted) actions.append(h('button', { type: 'button', class: 'danger', id: 'cancel-job', onclick: askCancel }, 'Cancel job'));
    }

    function askCancel() {
      confirming = true;
      const yes = h('button', { type: 'button', class: 'danger', id: 'cancel-job-confirm' }, 'Yes, cancel the job');
      const no = h('button', { type: 'button', class: 'secondary', id: 'cancel-job-keep' }, 'Keep it');
      no.addEventListener('click', () => { confirming = false; renderActions(); });
      yes.addEventListener('click', async () => {
        yes.disabled = true;
        no.disabled = true;
        try {
          const data = await api('POST', `/api/jobs/${encodeURIComponent(id)}/cancel`);
          if (!pg.alive) return;
          error.clear();
          confirming = false;
          info.replaceChildren(banner('info', `Job cancelled: ${Number(data.cancelled) || 0} task(s) cancelled, ${Number(data.already_final) || 0} already finished.`));
          load(pages.current());
        } catch (err) {
          if (!pg.alive || authLost(err)) return;
          confirming = false;
          renderActions();
          error.show(describe(err, 'cancel this job'));
        }
      });
      actions.replaceChildren(h('div', { class: 'confirm' }, 'Cancel every task of this job that has not finished?', yes, no));
    }

    async function load(token) {
      const q = new URLSearchParams();
      q.set('limit', String(limit));
      if (token) q.set('page_token', token);
      try {
        const data = await api('GET', `/api/jobs/${encodeURIComponent(id)}?${q}`);
        if (!pg.alive) return;
        error.clear();
        const byState = data.counts || {};
        live = Object.entries(byState).some(([state, n]) => !FINAL.has(state) && Number(n) > 0);
        counts.replaceChildren(...STATES.filter((s) => Number(byState[s]) > 0).map((state) =>
          h('div', { class: 'count', 'data-state': state }, badge(state), h('span', { class: 'n' }, String(Number(byState[state]))))),
        data.counts_complete === false ? h('span', { class: 'muted' }, ` (first ${data.counted} tasks counted)`) : null);
        const tasks = Array.isArray(data.tasks) ? data.tasks : [];
        list.replaceChildren(tasksTable(tasks, { job: id }));
        pages.got(data.next_page_token);
        renderActions();
      } catch (err) {
        if (!pg.alive || authLost(err)) return;
        if (err.status === 404) {
          counts.replaceChildren(empty('No such job: no task has this job id (or its tasks were swept).'));
          return;
        }
        error.show(describe(err, 'read this job'));
      }
    }
    pg.every(REFRESH_MS, () => load(pages.current()));
  }

  // Paging by token for a list page: the tokens of the pages seen so far
  // ([0] is the first page, ''), so "back" walks back without asking the
  // server for a reverse page. `load(token)` fetches a page and then calls
  // `got(next_page_token)`.
  function pager(prev, next, load) {
    const tokens = [''];
    let at = 0;
    let nextToken = '';
    next.addEventListener('click', () => {
      if (!nextToken) return;
      at += 1;
      tokens[at] = nextToken;
      tokens.length = at + 1;
      load(nextToken);
    });
    prev.addEventListener('click', () => {
      if (at === 0) return;
      at -= 1;
      load(tokens[at]);
    });
    return {
      current: () => tokens[at],
      number: () => at + 1,
      got(token) {
        nextToken = token || '';
        prev.disabled = at === 0;
        next.disabled = !nextToken;
      },
    };
  }

  // One attempt from the server's attempt history, whatever the exact
  // field names turn out to be.
  function serverAttempt(a) {
    const time = (...keys) => {
      for (const k of keys) {
        const t = Date.parse(a[k]);
        if (!Number.isNaN(t)) return t;
      }
      return null;
    };
    const start = time('started_at', 'assigned_at', 'start');
    return {
      attempt: Number(a.number ?? a.attempt) || 0,
      node: a.node_name || a.node || a.node_id || '',
      start: start ?? time('ended_at'),
      end: time('ended_at', 'finished_at', 'end'),
      outcome: normState(a.outcome || a.state || (a.ended_at ? 'ended' : 'running')),
      reason: [a.exit_code !== undefined && a.exit_code !== null ? `exit code ${a.exit_code}` : '', a.reason || a.error || '']
        .filter(Boolean).join(' · '),
    };
  }

  // The attempts on one time axis: a row per attempt with its node, a bar
  // from start to end (to now while it runs), and its outcome.
  function timeline(list, task) {
    if (list.length === 0) {
      const state = task ? normState(task.state) : '';
      return empty(state === 'queued' ? 'No attempt yet: the task is waiting for a node.' : 'No attempts seen yet.');
    }
    const now = Date.now();
    const starts = list.map((a) => a.start).filter((t) => t !== null);
    const ends = list.map((a) => a.end ?? now);
    const t0 = starts.length ? Math.min(...starts) : now;
    const t1 = Math.max(t0 + 1, ...ends);
    const W = 1000;
    const rows = list.map((a) => {
      const s = a.start ?? t0;
      const e = a.end ?? now;
      const x = ((s - t0) / (t1 - t0)) * W;
      const w = Math.max(4, ((e - s) / (t1 - t0)) * W);
      const outcome = a.end ? a.outcome : (a.outcome === 'assigned' ? 'assigned' : 'running');
      return h('li', { class: 'attempt', 'data-attempt': a.attempt },
        h('div', {}, h('strong', {}, `#${a.attempt}`), ' on ', a.node ? h('span', { class: 'mono' }, a.node) : h('span', { class: 'muted' }, 'unknown node'),
          ' · ', badge(outcome), ' ', h('span', { class: 'muted' },
            `${clock(s)}${a.end ? ` → ${clock(e)}` : ' → now'} (${duration(e - s)})`),
          a.reason ? h('div', { class: 'muted mono' }, a.reason) : null),
        svg('svg', { class: 'timeline', viewBox: `0 0 ${W} 10`, preserveAspectRatio: 'none', height: 10, 'aria-hidden': 'true' },
          svg('rect', { class: 'track', x: 0, y: 0, width: W, height: 10, rx: 3 }),
          svg('rect', { class: `seg out-${outcome}`, x: x.toFixed(1), y: 0, width: Math.min(W - x, w).toFixed(1), height: 10, rx: 3 })));
    });
    return [h('ol', { class: 'attempt-list' }, rows),
      h('div', { class: 'chart-legend' }, h('span', {}, clock(t0)), h('span', {}, clock(t1)))];
  }

  // ---------------------------------------------------------------- a node

  function nodePage(pg, id) {
    document.title = 'Weft · node';
    const error = errorSlot();
    const title = h('h1', {}, `Node ${id}`);
    const stateBadge = h('span', { id: 'node-state' });
    const actions = h('div', { class: 'actions', id: 'node-actions' });
    const info = h('div', { id: 'node-info' }, h('p', { class: 'muted' }, 'Loading…'));
    const running = h('div', { id: 'node-running' });
    main.append(
      h('div', { class: 'page-head' },
        h('div', {}, title, h('div', { class: 'sub' }, h('a', { href: '#/' }, '← overview'))),
        h('div', { class: 'actions' }, stateBadge, actions)),
      error.el,
      h('div', { class: 'grid' }, panel('Node', info), panel('Running attempts', running)));

    let node = null;
    let confirming = false;
    let gone = false;

    function renderActions() {
      if (confirming) return;
      const draining = node && normState(node.state) === 'draining';
      const key = !node || gone || !hasScope('admin') ? '' : draining ? 'revoke' : 'drain+revoke';
      // Keep the buttons that are there (a click may be on its way to them).
      if (key && actions.dataset.key === key && actions.firstChild) return;
      actions.dataset.key = key;
      actions.replaceChildren();
      if (!key) return;
      if (!draining) {
        actions.append(h('button', { type: 'button', class: 'secondary', id: 'drain', onclick: () => ask('drain') }, 'Drain'));
      }
      actions.append(h('button', { type: 'button', class: 'danger', id: 'revoke', onclick: () => ask('revoke') }, 'Revoke'));
    }

    function ask(what) {
      confirming = true;
      const text = what === 'drain'
        ? 'Drain this node? It takes no new work and leaves once its running attempts finish.'
        : 'Revoke this node? It is disconnected at once, its attempts are requeued, and it must join again with a new token.';
      const yes = h('button', { type: 'button', class: 'danger', id: `${what}-confirm` }, what === 'drain' ? 'Yes, drain' : 'Yes, revoke');
      const no = h('button', { type: 'button', class: 'secondary', id: `${what}-keep` }, 'No');
      no.addEventListener('click', () => { confirming = false; renderActions(); });
      yes.addEventListener('click', async () => {
        yes.disabled = true;
        no.disabled = true;
        try {
          const data = await api('POST', `/api/nodes/${encodeURIComponent(id)}/${what}`);
          if (!pg.alive) return;
          confirming = false;
          error.clear();
          if (what === 'revoke') {
            gone = true;
            const requeued = data && Number.isFinite(Number(data.requeued)) ? ` ${Number(data.requeued)} running attempt(s) requeued.` : '';
            info.replaceChildren(banner('info', `Node revoked: it is disconnected and must join again with a new join token.${requeued}`));
            running.replaceChildren(empty('None: the node is gone.'));
            stateBadge.replaceChildren(badge('revoked', true));
            renderActions();
          } else if (data && data.node) {
            node = data.node;
            showNode();
          } else {
            renderActions();
          }
        } catch (err) {
          if (!pg.alive || authLost(err)) return;
          confirming = false;
          renderActions();
          error.show(describe(err, `${what} this node`));
        }
      });
      actions.replaceChildren(h('div', { class: 'confirm' }, text, yes, no));
    }

    function showNode() {
      const n = node;
      title.textContent = `Node ${n.name || n.id}`;
      document.title = `Weft · node ${n.name || n.id}`;
      stateBadge.replaceChildren(badge(n.state, true));
      const slots = Number(n.slots) || 0;
      const used = Number(n.slots_used) || 0;
      info.replaceChildren(fields([
        ['Name', n.name],
        ['Id', h('span', { class: 'mono' }, n.id)],
        ['State', badge(n.state)],
        ['Slots', slotMeter(used, slots, n.slots_free !== undefined ? Number(n.slots_free) : slots - used)],
        ['Resources', resourceRows(n)],
        ['Labels', chips(n.labels)],
        ['Handlers', (n.handlers || []).length ? n.handlers.map((x) => h('span', { class: 'chip' }, x)) : h('span', { class: 'muted' }, '—')],
        ['Address', n.address ? h('span', { class: 'mono' }, n.address) : null],
        ['Connected', n.connected_since ? when(n.connected_since) : null],
        ['Heartbeat', heartbeat(n)],
        ['Running', n.running !== undefined ? String(n.running) : null],
        ['Finished here', n.finished !== undefined ? String(n.finished) : null],
      ]));
      renderActions();
    }

    pg.every(REFRESH_MS, async () => {
      if (gone) return;
      try {
        const data = await api('GET', `/api/nodes/${encodeURIComponent(id)}`);
        if (!pg.alive) return;
        error.clear();
        node = data.node;
        showNode();
        running.replaceChildren(runningTable(Array.isArray(data.running) ? data.running : []));
      } catch (err) {
        if (!pg.alive || authLost(err)) return;
        if (err.status === 404) {
          gone = true;
          info.replaceChildren(empty('This node is not connected: it left, was revoked, or the id is wrong.'));
          running.replaceChildren();
          renderActions();
          return;
        }
        error.show(describe(err, 'read this node'));
      }
    });
  }

  // Each declared resource: used of total, and free (bytes as bytes).
  function resourceRows(n) {
    const total = n.resources || {};
    const free = n.resources_free || {};
    const names = Object.keys(total);
    if (names.length === 0) return null;
    return names.map((name) => {
      const all = Number(total[name]) || 0;
      const left = free[name] !== undefined ? Number(free[name]) : all;
      return h('div', { class: 'mono', 'data-resource': name }, `${name}: ${all - left} used of ${all}, ${left} free`);
    });
  }

  function runningTable(list) {
    if (list.length === 0) return empty('No attempts are running on this node.');
    const rows = list.map((r) => {
      const href = `#/tasks/${encodeURIComponent(r.task_id)}`;
      return h('tr', { class: 'link', 'data-task': r.task_id, onclick: (ev) => { if (!ev.target.closest('a')) location.hash = href; } },
        h('td', {}, h('a', { class: 'mono', href }, shortId(r.task_id))),
        h('td', {}, r.name || h('span', { class: 'muted' }, '—')),
        h('td', { class: 'num' }, String(r.attempt ?? '')),
        h('td', {}, badge(r.state)),
        h('td', { class: 'nowrap' }, when(r.started_at)));
    });
    return h('div', { class: 'table-wrap' }, h('table', { id: 'running-table' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Task'), h('th', {}, 'Name'), h('th', { class: 'num' }, 'Attempt'),
        h('th', {}, 'State'), h('th', {}, 'Started'))),
      h('tbody', {}, rows)));
  }

  // ---------------------------------------------------------------- start

  document.getElementById('logout').addEventListener('click', logout);
  window.addEventListener('hashchange', render);
  render();
})();
