"""Demo relying parties that log in through the provider in ``idp/``."""
