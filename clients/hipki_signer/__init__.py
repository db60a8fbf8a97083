"""A HiPKI-compatible local signer (the MOICA cross-platform web component's
endpoints and JSON, PROTOCOLS 1) over any PKCS#11 card: SoftHSM2 in the tests,
the card's own library on a desktop. See README.md."""
