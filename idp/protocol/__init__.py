"""OAuth 2.0 / OpenID Connect: authlib server, tokens, claims, keys, clients."""
