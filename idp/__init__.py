"""OpenID Connect provider for Taiwan's public-sector portals."""
