"""Development helpers: a test PKI with the MOICA/XCA profile and its local CRL/OCSP responders."""
