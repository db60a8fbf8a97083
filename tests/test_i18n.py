"""Every message exists in both languages (SPEC O2); every page compiles."""

from idp.web.i18n import CATALOGS
from idp.web.pages import compile_templates, env


def test_catalogs_have_the_same_keys():
    assert CATALOGS["zh-TW"].keys() == CATALOGS["en"].keys()
    assert all(CATALOGS["zh-TW"].values()) and all(CATALOGS["en"].values())


def test_every_template_compiles():
    """``idp serve`` compiles them all at start: a template with an error stops the server
    there, not on the first user who reaches a rarely shown page."""
    compile_templates()
    assert len(env.cache) == len(env.list_templates())
