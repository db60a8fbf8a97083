"""The web layer: routes, pages, translations."""
