// panva's oidc-provider (tests/e2e/node_modules) configured like our provider for the
// benchmark: one confidential client (client_secret_basic) with client_credentials,
// authorization_code (+PKCE S256) and refresh_token (rotated, single use), ES256 ID tokens,
// opaque access tokens, and either an in-memory adapter (a plain Map; see MapAdapter) or,
// given REDIS_URL, a Redis adapter (RedisAdapter), as our provider on Redis.
//
// Usage: node bench/oidc_provider.mjs PORT CLIENT_ID CLIENT_SECRET REDIRECT_URI [REDIS_URL]
// Besides the provider it answers POST /__bench/mint?kind=code|refresh&n=N&challenge=C with
// N codes / refresh tokens (one a line), minted through the provider's own models, so that
// the token endpoint can be loaded with single-use credentials exactly as ours is.
import { createRequire } from 'node:module';
import { generateKeyPairSync } from 'node:crypto';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, '..', 'tests', 'e2e', 'package.json'));
const { default: Provider } = await import(require.resolve('oidc-provider'));

const [port, clientId, clientSecret, redirectUri, redisUrl] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;
const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'bench-es256', alg: 'ES256', use: 'sig' };

// The default development adapter is an LRU of 1,000 entries: pre-minted codes would be
// evicted before use. This one is a plain Map with expiry: still in memory, no limit.
const stores = new Map();
class MapAdapter {
  constructor(name) {
    if (!stores.has(name)) stores.set(name, new Map());
    this.m = stores.get(name);
    this.name = name;
  }
  async upsert(id, payload, expiresIn) {
    this.m.set(id, { payload, exp: expiresIn ? Date.now() + expiresIn * 1000 : Infinity });
    if (payload.grantId && this.name !== 'Grant') {
      const g = stores.get('__byGrant') || new Map();
      stores.set('__byGrant', g);
      if (!g.has(payload.grantId)) g.set(payload.grantId, []);
      g.get(payload.grantId).push([this.m, id]);
    }
  }
  async find(id) {
    const e = this.m.get(id);
    if (!e) return undefined;
    if (e.exp < Date.now()) { this.m.delete(id); return undefined; }
    return e.payload;
  }
  async findByUid(uid) {
    for (const [, e] of this.m) if (e.payload.uid === uid) return e.payload;
    return undefined;
  }
  async findByUserCode(code) {
    for (const [, e] of this.m) if (e.payload.userCode === code) return e.payload;
    return undefined;
  }
  async consume(id) { const e = this.m.get(id); if (e) e.payload.consumed = Math.floor(Date.now() / 1000); }
  async destroy(id) { this.m.delete(id); }
  async revokeByGrantId(grantId) {
    const g = stores.get('__byGrant');
    for (const [m, id] of (g && g.get(grantId)) || []) m.delete(id);
    if (g) g.delete(grantId);
  }
}

// The layout of oidc-provider's example Redis adapter (example/adapters/redis.js in its
// repository): one key per model instance, codes and refresh tokens as hashes so that
// consume() sets one field, a list per grant of the keys to delete on revocation. Each
// upsert is one MULTI; the example also reads the grant list's TTL first, a round trip
// left out here, so this adapter is if anything faster than the one deployments start from.
const grantable = new Set(['AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode', 'BackchannelAuthenticationRequest']);
const consumable = new Set(['AuthorizationCode', 'RefreshToken', 'DeviceCode', 'BackchannelAuthenticationRequest']);
let redis;
class RedisAdapter {
  constructor(name) { this.name = name; }
  key(id) { return `oidc:${this.name}:${id}`; }
  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    const multi = redis.multi();
    if (consumable.has(this.name)) multi.hset(key, { payload: JSON.stringify(payload) });
    else multi.set(key, JSON.stringify(payload));
    if (expiresIn) multi.expire(key, expiresIn);
    if (grantable.has(this.name) && payload.grantId) {
      const grantKey = `oidc:grant:${payload.grantId}`;
      multi.rpush(grantKey, key);
      // a new list gets the TTL (NX), a list that would expire sooner is extended (GT)
      if (expiresIn) multi.expire(grantKey, expiresIn, 'NX').expire(grantKey, expiresIn, 'GT');
    }
    if (payload.userCode) multi.set(`oidc:userCode:${payload.userCode}`, id, 'EX', expiresIn);
    if (payload.uid) multi.set(`oidc:uid:${payload.uid}`, id, 'EX', expiresIn);
    await multi.exec();
  }
  async find(id) {
    if (!consumable.has(this.name)) {
      const data = await redis.get(this.key(id));
      return data ? JSON.parse(data) : undefined;
    }
    const { payload, ...rest } = await redis.hgetall(this.key(id));
    return payload ? { ...rest, ...JSON.parse(payload) } : undefined;
  }
  async findByUid(uid) { const id = await redis.get(`oidc:uid:${uid}`); return id ? this.find(id) : undefined; }
  async findByUserCode(code) { const id = await redis.get(`oidc:userCode:${code}`); return id ? this.find(id) : undefined; }
  async consume(id) { await redis.hset(this.key(id), 'consumed', Math.floor(Date.now() / 1000)); }
  async destroy(id) { await redis.del(this.key(id)); }
  async revokeByGrantId(grantId) {
    const grantKey = `oidc:grant:${grantId}`;
    const keys = await redis.lrange(grantKey, 0, -1);
    await redis.del(...keys, grantKey);
  }
}
if (redisUrl) {
  const { default: Redis } = await import(createRequire(path.join(here, 'package.json')).resolve('ioredis'));
  redis = new Redis(redisUrl);
}

const provider = new Provider(issuer, {
  adapter: redisUrl ? RedisAdapter : MapAdapter,
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    grant_types: ['client_credentials', 'authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: [redirectUri],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: 'ES256',
  }],
  jwks: { keys: [jwk] },
  features: { clientCredentials: { enabled: true }, devInteractions: { enabled: false } },
  pkce: { required: () => true },
  rotateRefreshToken: true,
  scopes: ['openid', 'offline_access', 'profile', 'email'],
  async findAccount(ctx, sub) {
    return { accountId: sub, async claims() { return { sub }; } };
  },
});
provider.proxy = true;

async function mint(kind, n, challenge) {
  const client = await provider.Client.find(clientId);
  const out = [];
  for (let i = 0; i < n; i += 1) {
    const accountId = `user${i % 200}`;
    const grant = new provider.Grant({ accountId, clientId });
    grant.addOIDCScope('openid offline_access');
    const grantId = await grant.save();
    const common = { accountId, client, grantId, scope: 'openid offline_access', authTime: Math.floor(Date.now() / 1000), acr: 'urn:bench' };
    if (kind === 'code') {
      out.push(await new provider.AuthorizationCode({ ...common, redirectUri, codeChallenge: challenge, codeChallengeMethod: 'S256' }).save());
    } else {
      out.push(await new provider.RefreshToken({ ...common, gty: 'authorization_code', iiat: Math.floor(Date.now() / 1000) }).save());
    }
  }
  return out;
}

const callback = provider.callback();
http.createServer(async (req, res) => {
  if (req.url.startsWith('/__bench/mint')) {
    const q = new URL(req.url, issuer).searchParams;
    try {
      const values = await mint(q.get('kind'), Number(q.get('n')), q.get('challenge'));
      res.writeHead(200, { 'content-type': 'text/plain' }).end(values.join('\n') + '\n');
    } catch (e) {
      res.writeHead(500).end(String(e.stack));
    }
    return;
  }
  callback(req, res);
}).listen(Number(port), '127.0.0.1', () => console.log(`oidc-provider ${issuer} ready`));
