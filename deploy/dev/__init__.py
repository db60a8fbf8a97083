"""Stand-ins for outside services, for tests and the demo: a test PKI with the MOICA/XCA profile and its CRL/OCSP responders, and the mobile-ID service simulator."""
