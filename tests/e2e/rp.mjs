#!/usr/bin/env node
// Relying-party driver for end-to-end tests: runs a full OpenID Connect
// authorization-code + PKCE flow against an OP with panva's openid-client v6
// (strict ID-token validation), logging in through the OP's HTML pages with
// plain fetch() and a tiny cookie jar.
//
// Usage: node rp.mjs < config.json
//   {"issuer", "client_id", "client_secret"?, "redirect_uri", "username",
//    "password", "scope"?, "extra_params"?, "captcha"?,
//    "token_endpoint_auth_method"? ("client_secret_basic" (default when a
//    secret is given) | "client_secret_post"),
//    "cookies"? ({name: value} for the OP's host: log in within a browser's
//    single sign-on session)}
// With "max_age" in extra_params, openid-client also checks the ID token's auth_time.
// Prints exactly one JSON line on stdout; exit code 0 on success, 1 on error.
// On success it carries "callback_via": "redirect" | "form_post", how the OP
// returned the authorization response.

import * as client from 'openid-client';

const MAX_STEPS = 15; // HTTP requests made while driving the login pages
const HTTP_TIMEOUT_MS = 15_000;
const TEXT_LIMIT = 500;

let step = 'config';
// RP_DEBUG=1 traces every request of the login dance on stderr.
const trace = process.env.RP_DEBUG ? (...a) => console.error('[rp]', ...a) : () => {};

class DriverError extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'DriverError';
    this.code = code;
    Object.assign(this, extra);
  }
}

// ---------------------------------------------------------------- helpers

function readStdin() {
  return new Promise((resolve, reject) => {
    const chunks = [];
    process.stdin.on('data', (c) => chunks.push(c));
    process.stdin.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    process.stdin.on('error', reject);
  });
}

const NAMED_ENTITIES = {
  amp: '&', lt: '<', gt: '>', quot: '"', apos: "'", nbsp: '\u00a0',
  sol: '/', equals: '=', colon: ':', num: '#', percnt: '%', plus: '+',
  quest: '?', semi: ';', lpar: '(', rpar: ')', comma: ',', period: '.',
};

function decodeEntities(s) {
  return s.replace(/&(#[xX][0-9a-fA-F]+|#[0-9]+|[a-zA-Z][a-zA-Z0-9]*);/g, (m, e) => {
    if (e[0] === '#') {
      const cp = e[1] === 'x' || e[1] === 'X' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10);
      try { return String.fromCodePoint(cp); } catch { return m; }
    }
    return Object.hasOwn(NAMED_ENTITIES, e) ? NAMED_ENTITIES[e] : m;
  });
}

// Attributes of one start tag (the text between the tag name and '>').
const ATTR_RE = /([^\s"'<>/=]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?/g;
function parseAttrs(s) {
  const attrs = {};
  for (const m of s.matchAll(ATTR_RE)) {
    const name = m[1].toLowerCase();
    if (Object.hasOwn(attrs, name)) continue; // first occurrence wins, as in browsers
    const raw = m[2] ?? m[3] ?? m[4];
    attrs[name] = raw === undefined ? '' : decodeEntities(raw);
  }
  return attrs;
}

// Visible text of an HTML page (for error messages).
function pageText(body, contentType) {
  if (!/html/i.test(contentType || '') && !/^\s*</.test(body)) return body.slice(0, TEXT_LIMIT);
  const text = body
    .replace(/<!--[\s\S]*?-->/g, ' ')
    .replace(/<(script|style|head)\b[^>]*>[\s\S]*?<\/\1\s*>/gi, ' ')
    .replace(/<[^>]*>/g, ' ');
  return decodeEntities(text).replace(/\s+/g, ' ').trim().slice(0, TEXT_LIMIT);
}

// A small regex-based form parser. Returns
//   [{ method, action: URL, id, attrs, controls: [{tag, name, type, value, attrs}] }]
// Controls outside a <form> but with form="id" are associated like browsers do.
const TOKEN_RE = new RegExp(
  [
    '<!--[\\s\\S]*?-->',
    '<(script|style)\\b(?:"[^"]*"|\'[^\']*\'|[^\'">])*>[\\s\\S]*?<\\/\\1\\s*>',
    '<\\/form\\s*>',
    '<textarea\\b((?:"[^"]*"|\'[^\']*\'|[^\'">])*)>([\\s\\S]*?)<\\/textarea\\s*>',
    '<select\\b((?:"[^"]*"|\'[^\']*\'|[^\'">])*)>([\\s\\S]*?)<\\/select\\s*>',
    '<(form|input|button)\\b((?:"[^"]*"|\'[^\']*\'|[^\'">])*)>',
  ].join('|'),
  'gi',
);
const OPTION_RE = /<option\b((?:"[^"]*"|'[^']*'|[^'">])*)>([^<]*)/gi;

function parseForms(html, pageUrl) {
  const forms = [];
  const byId = new Map();
  const orphans = []; // controls with a form="..." attribute
  let current = null;

  const addControl = (control) => {
    if (Object.hasOwn(control.attrs, 'form')) orphans.push(control);
    else if (current) current.controls.push(control);
  };

  for (const m of html.matchAll(TOKEN_RE)) {
    const tok = m[0];
    if (tok.startsWith('<!--') || m[1]) continue; // comment, script, style
    if (/^<\/form/i.test(tok)) { current = null; continue; }
    if (m[2] !== undefined) { // textarea
      const attrs = parseAttrs(m[2]);
      let value = decodeEntities(m[3]);
      if (value.startsWith('\n')) value = value.slice(1);
      addControl({ tag: 'textarea', name: attrs.name, type: 'textarea', value, attrs });
      continue;
    }
    if (m[4] !== undefined) { // select
      const attrs = parseAttrs(m[4]);
      const options = [...m[5].matchAll(OPTION_RE)].map((o) => {
        const oa = parseAttrs(o[1]);
        return { value: Object.hasOwn(oa, 'value') ? oa.value : decodeEntities(o[2]).trim(), selected: Object.hasOwn(oa, 'selected'), disabled: Object.hasOwn(oa, 'disabled') };
      });
      const chosen = options.find((o) => o.selected) ?? options.find((o) => !o.disabled);
      addControl({ tag: 'select', name: attrs.name, type: 'select', value: chosen ? chosen.value : null, attrs });
      continue;
    }
    const tag = m[6].toLowerCase();
    const attrs = parseAttrs(m[7]);
    if (tag === 'form') {
      if (current) continue; // nested <form> start tags are ignored by browsers
      let action;
      try {
        action = attrs.action ? new URL(attrs.action, pageUrl) : new URL(pageUrl);
      } catch {
        action = new URL(pageUrl);
      }
      current = {
        method: (attrs.method || 'get').toLowerCase(),
        action,
        id: attrs.id,
        attrs,
        controls: [],
      };
      forms.push(current);
      if (attrs.id && !byId.has(attrs.id)) byId.set(attrs.id, current);
      continue;
    }
    const type = (attrs.type || (tag === 'button' ? 'submit' : 'text')).toLowerCase();
    addControl({ tag, name: attrs.name, type, value: attrs.value, attrs });
  }
  for (const control of orphans) byId.get(control.attrs.form)?.controls.push(control);
  return forms;
}

const isSubmit = (c) => (c.tag === 'button' && c.type === 'submit') || (c.tag === 'input' && (c.type === 'submit' || c.type === 'image'));
const fieldNames = (form) => new Set(form.controls.filter((c) => c.name && !isSubmit(c) && c.tag !== 'button').map((c) => c.name));
const decisionAllow = (form) => form.controls.find((c) => c.tag === 'button' && c.name === 'decision' && c.value === 'allow' && !Object.hasOwn(c.attrs, 'disabled'));

// The form data set a browser would submit (without the submitter button).
function formData(form) {
  const params = new URLSearchParams();
  for (const c of form.controls) {
    if (!c.name || Object.hasOwn(c.attrs, 'disabled')) continue;
    if (c.tag === 'button' || isSubmit(c)) continue;
    if (c.tag === 'input') {
      if (['reset', 'file'].includes(c.type)) continue;
      if ((c.type === 'checkbox' || c.type === 'radio') && !Object.hasOwn(c.attrs, 'checked')) continue;
      const dflt = c.type === 'checkbox' || c.type === 'radio' ? 'on' : '';
      params.append(c.name, c.value ?? dflt);
    } else if (c.tag === 'select') {
      if (c.value !== null) params.append(c.name, c.value);
    } else {
      params.append(c.name, c.value ?? '');
    }
  }
  return params;
}

// Tiny cookie jar: name=value pairs per host name (ports are not isolated, as in browsers).
// Domain/Path/Secure attributes are ignored; Max-Age<=0 or a past Expires deletes.
class CookieJar {
  constructor() { this.hosts = new Map(); }

  store(url, setCookies) {
    const host = new URL(url).hostname;
    if (!this.hosts.has(host)) this.hosts.set(host, new Map());
    const jar = this.hosts.get(host);
    for (const header of setCookies) {
      const [pair, ...attrParts] = header.split(';');
      const eq = pair.indexOf('=');
      if (eq <= 0) continue;
      const name = pair.slice(0, eq).trim();
      const value = pair.slice(eq + 1).trim();
      let expired = false;
      for (const part of attrParts) {
        const [k, ...rest] = part.split('=');
        const key = k.trim().toLowerCase();
        const v = rest.join('=').trim();
        if (key === 'max-age' && Number(v) <= 0) expired = true;
        if (key === 'expires' && !Number.isNaN(Date.parse(v)) && Date.parse(v) < Date.now()) expired = true;
      }
      if (expired) jar.delete(name);
      else jar.set(name, value);
    }
  }

  header(url) {
    const jar = this.hosts.get(new URL(url).hostname);
    if (!jar || jar.size === 0) return undefined;
    return [...jar].map(([k, v]) => `${k}=${v}`).join('; ');
  }
}

// ---------------------------------------------------------------- login driver

function makeIsCallback(redirectUri) {
  const base = new URL(redirectUri);
  base.hash = '';
  const prefix = base.href;
  const seps = prefix.includes('?') ? ['', '&', '#'] : ['', '?', '#'];
  return (url) => {
    const href = url instanceof URL ? url.href : String(url);
    return href.startsWith(prefix) && seps.includes(href.slice(prefix.length, prefix.length + 1));
  };
}

// Follows redirects and submits the OP's forms until the OP sends the browser
// back to redirect_uri. Returns the callback URL (never fetched) and how the OP
// sent it: "redirect" (a 3xx Location) or "form_post" (an auto-submitting form).
async function driveLogin(authUrl, cfg) {
  const jar = new CookieJar();
  jar.store(authUrl, Object.entries(cfg.cookies ?? {}).map(([k, v]) => `${k}=${v}`));
  const isCallback = makeIsCallback(cfg.redirect_uri);
  let url = new URL(authUrl);
  let method = 'GET';
  let body;
  let lastSubmitted = null; // signature of the last credential form we posted

  for (let i = 0; i < MAX_STEPS; i++) {
    const headers = { accept: 'text/html,application/xhtml+xml;q=0.9,*/*;q=0.8', 'user-agent': 'idp-e2e-rp/1 (openid-client)' };
    const cookie = jar.header(url);
    if (cookie) headers.cookie = cookie;
    if (body !== undefined) headers['content-type'] = 'application/x-www-form-urlencoded';

    let res;
    try {
      res = await fetch(url, { method, headers, body, redirect: 'manual', signal: AbortSignal.timeout(HTTP_TIMEOUT_MS) });
    } catch (err) {
      throw new DriverError('fetch_failed', `${method} ${url.href}: ${err.cause?.message ?? err.message}`);
    }
    jar.store(url, res.headers.getSetCookie());
    trace(i + 1, method, url.href, '->', res.status, res.headers.get('location') ?? '');

    if (res.status >= 300 && res.status < 400) {
      await res.arrayBuffer().catch(() => {});
      const location = res.headers.get('location');
      if (!location) throw new DriverError('redirect_without_location', `${res.status} from ${url.href} has no Location header`);
      const next = new URL(location, url);
      if (isCallback(next)) return { url: next, via: 'redirect' };
      if (res.status !== 307 && res.status !== 308) { method = 'GET'; body = undefined; }
      url = next;
      continue;
    }

    const contentType = res.headers.get('content-type') || '';
    const text = await res.text();
    const forms = /html/i.test(contentType) || /<form\b/i.test(text) ? parseForms(text, url) : [];
    const postForms = forms.filter((f) => f.method === 'post');

    // response_mode=form_post: the OP returns an auto-submitting form that posts
    // the authorization response to redirect_uri. Instead of POSTing it we turn
    // its (hidden) inputs into query parameters: redirect_uri?code=...&state=...
    // openid-client treats that exactly like response_mode=query (its own
    // handling of a POST Request does the same conversion internally).
    const callbackForm = postForms.find((f) => isCallback(f.action));
    if (callbackForm) {
      const params = formData(callbackForm);
      const sep = cfg.redirect_uri.includes('?') ? '&' : '?';
      return { url: new URL(`${cfg.redirect_uri.split('#')[0]}${sep}${params}`), via: 'form_post' };
    }

    if (postForms.length === 0) {
      if (res.status >= 400) throw new DriverError(`http_${res.status}`, pageText(text, contentType), { status: res.status, url: url.href });
      throw new DriverError('unexpected_page', `${res.status} ${url.href} has no POST form: ${pageText(text, contentType)}`, { status: res.status, url: url.href });
    }

    const names = (f) => fieldNames(f);
    const form = postForms.find((f) => ['username', 'password', 'login'].some((n) => names(f).has(n)))
      ?? postForms.find((f) => decisionAllow(f))
      ?? postForms[0];

    // Same credential form again right after we posted it: the OP rejected the
    // login. Stop instead of hammering it (and tripping its lockout).
    // (Compared by field names only: a re-rendered page may post elsewhere.)
    const signature = [...names(form)].sort().join(',');
    if (lastSubmitted === signature) {
      throw new DriverError('login_rejected', `${res.status} ${url.href}: ${pageText(text, contentType)}`, { status: res.status, url: url.href });
    }

    const params = formData(form);
    const present = names(form);
    const fill = (name, value) => {
      if (value === undefined || value === null || !present.has(name)) return false;
      params.set(name, String(value));
      return true;
    };
    if (!fill('username', cfg.username)) fill('login', cfg.username); // oidc-provider devInteractions uses "login"
    fill('password', cfg.password);
    fill('captcha', cfg.captcha);

    // The submitter: the consent page's allow button, else the form's default
    // (first) submit button, as in a browser's implicit submission.
    const submitter = decisionAllow(form) ?? form.controls.find((c) => isSubmit(c) && !Object.hasOwn(c.attrs, 'disabled'));
    if (submitter?.name && submitter.type !== 'image') params.append(submitter.name, submitter.value ?? '');

    trace('  submit', form.action.href, [...params.keys()].join(','));
    lastSubmitted = present.has('password') ? signature : null;
    url = form.action;
    method = 'POST';
    body = params.toString();
  }
  throw new DriverError('too_many_steps', `no redirect to ${cfg.redirect_uri} after ${MAX_STEPS} requests (last: ${method} ${url.href})`);
}

// ---------------------------------------------------------------- main

function errorJson(err) {
  const out = {
    ok: false,
    error: err?.code ?? err?.name ?? 'Error',
    message: err?.message ?? String(err),
    step,
  };
  for (const k of ['error', 'error_description']) {
    if (typeof err?.[k] === 'string') out[`oauth_${k}`] = err[k];
  }
  if (typeof err?.status === 'number') out.status = err.status;
  if (err?.url) out.url = err.url;
  let cause = err?.cause;
  if (cause instanceof URLSearchParams) cause = Object.fromEntries(cause);
  if (Array.isArray(cause)) { // WWW-Authenticate challenges, e.g. invalid_client on a 401
    const params = cause.find((c) => c?.parameters?.error)?.parameters;
    if (params && !out.oauth_error) {
      out.oauth_error = params.error;
      if (params.error_description) out.oauth_error_description = params.error_description;
    }
  }
  if (cause && !out.oauth_error && typeof cause.error === 'string') {
    out.oauth_error = cause.error;
    if (typeof cause.error_description === 'string') out.oauth_error_description = cause.error_description;
  }
  if (cause instanceof Error) out.cause = cause.message;
  else if (cause && typeof cause === 'object') {
    try {
      const json = JSON.stringify(cause);
      out.cause = json.length <= 2000 ? JSON.parse(json) : `${json.slice(0, 2000)}...`;
    } catch { /* ignore */ }
  }
  return out;
}

async function main() {
  step = 'config';
  const raw = await readStdin();
  let cfg;
  try {
    cfg = JSON.parse(raw);
  } catch (err) {
    throw new DriverError('invalid_config', `stdin is not JSON: ${err.message}`);
  }
  for (const k of ['issuer', 'client_id', 'redirect_uri']) {
    if (typeof cfg?.[k] !== 'string' || !cfg[k]) throw new DriverError('invalid_config', `missing "${k}"`);
  }
  const scope = cfg.scope ?? 'openid profile email';
  const secret = cfg.client_secret ?? undefined;

  step = 'discovery';
  let auth;
  if (secret === undefined) auth = client.None();
  else if (cfg.token_endpoint_auth_method === 'client_secret_post') auth = client.ClientSecretPost(secret);
  else auth = client.ClientSecretBasic(secret);
  const issuer = new URL(cfg.issuer);
  const config = await client.discovery(issuer, cfg.client_id, secret, auth, {
    // plain http is only acceptable for local test servers (127.0.0.1 / localhost)
    execute: issuer.protocol === 'http:' ? [client.allowInsecureRequests] : [],
    timeout: HTTP_TIMEOUT_MS / 1000,
  });

  step = 'authorize';
  const pkceCodeVerifier = client.randomPKCECodeVerifier();
  const codeChallenge = await client.calculatePKCECodeChallenge(pkceCodeVerifier);
  const state = client.randomState();
  const nonce = client.randomNonce();
  const params = {
    redirect_uri: cfg.redirect_uri,
    scope,
    code_challenge: codeChallenge,
    code_challenge_method: 'S256',
    state,
    nonce,
  };
  for (const [k, v] of Object.entries(cfg.extra_params ?? {})) params[k] = String(v);
  const authUrl = client.buildAuthorizationUrl(config, params);

  step = 'login';
  const { url: callbackUrl, via: callbackVia } = await driveLogin(authUrl, cfg);

  // openid-client validates the authorization response (state, iss, error)
  // and redeems the code in one call; report OP-sent errors as step "callback".
  step = callbackUrl.searchParams.has('error') ? 'callback' : 'token';
  const tokens = await client.authorizationCodeGrant(config, callbackUrl, {
    pkceCodeVerifier,
    expectedState: state,
    expectedNonce: nonce,
    idTokenExpected: true,
    maxAge: params.max_age === undefined ? undefined : Number(params.max_age),
  });
  const claims = tokens.claims();

  step = 'userinfo';
  const userinfo = await client.fetchUserInfo(config, tokens.access_token, claims.sub);

  let refresh = null;
  if (tokens.refresh_token) {
    step = 'refresh';
    const refreshed = await client.refreshTokenGrant(config, tokens.refresh_token);
    refresh = { ok: true, claims: refreshed.claims() ?? null };
  }

  step = 'done';
  return {
    ok: true,
    callback_via: callbackVia,
    claims,
    userinfo,
    token_type: tokens.token_type ?? null,
    expires_in: tokens.expires_in ?? null,
    scope: tokens.scope ?? null,
    has_refresh_token: Boolean(tokens.refresh_token),
    refresh,
    id_token: tokens.id_token,
    access_token: tokens.access_token,
  };
}

try {
  const result = await main();
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exitCode = 0;
} catch (err) {
  process.stdout.write(`${JSON.stringify(errorJson(err))}\n`);
  process.exitCode = 1;
}
