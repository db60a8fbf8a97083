// panva's oidc-provider as the stand-in for Google in tests/test_federation.py (SPEC A6).
// Usage: node tests/e2e/upstream_op.mjs PORT CLIENT_ID CLIENT_SECRET REDIRECT_URI...
// devInteractions: any `login` (it becomes the `sub`) with any `password`, then a consent page.
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, 'package.json'));
const { default: Provider } = await import(require.resolve('oidc-provider'));

const [port, clientId, clientSecret, ...redirectUris] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    redirect_uris: redirectUris,
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  features: { devInteractions: { enabled: true } },
  pkce: { required: () => true },
  scopes: ['openid', 'email', 'profile'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'] },
  async findAccount(ctx, sub) {
    return { accountId: sub, async claims() { return { sub, email: `${sub}@gmail.test`, email_verified: true }; } };
  },
});
provider.listen(Number(port), '127.0.0.1', () => console.log(`upstream ${issuer} ready`));
