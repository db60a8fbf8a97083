"""Every message exists in both languages (SPEC O2)."""

from idp.web.i18n import CATALOGS


def test_catalogs_have_the_same_keys():
    assert CATALOGS["zh-TW"].keys() == CATALOGS["en"].keys()
    assert all(CATALOGS["zh-TW"].values()) and all(CATALOGS["en"].values())
